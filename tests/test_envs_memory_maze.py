"""Memory Maze family: ``memory_maze/<size>``. Slow env (~5 s to build, ~2 s per reset, ~45
steps/s), so one env is shared and episodes are cut short."""

from __future__ import annotations

import math

import numpy as np
import pytest
from gymnasium import spaces

pytest.importorskip("memory_maze")
pytest.importorskip("gym")  # memory_maze imports it even for its dm_env API

import envs  # noqa: E402
from envs.memory_maze_env import EPISODE_STEPS, MAZE_SIZES  # noqa: E402
from worldmodels import spaces as agent_spaces  # noqa: E402


def _composer_env(gym_env):
    """The dm_control composer.Environment under the wrappers."""
    from dm_control import composer

    env = gym_env.dm_env
    while not isinstance(env, composer.Environment):
        env = env.env
    return env


@pytest.fixture(scope="module")
def maze():
    env = envs.make("memory_maze/9x9", seed=0, episode_length=3)
    yield env
    env.close()


def test_unknown_size_and_bad_length_raise_before_building():
    with pytest.raises(ValueError) as err:
        envs.make("memory_maze/7x7")
    assert all(size in str(err.value) for size in MAZE_SIZES)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        envs.make("memory_maze/9x9", episode_length=1001)


def test_spaces_and_first_observation(maze):
    assert maze.observation_space == spaces.Dict(
        {"image": spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    assert maze.action_space.n == 6
    assert agent_spaces.obs_spec(maze.observation_space) == {"image": ((64, 64, 3), "uint8")}
    assert agent_spaces.action_spec(maze.action_space).dim == 6
    obs, info = maze.reset()
    assert maze.observation_space.contains(obs) and info == {}
    assert obs["image"].std() > 10  # a rendered maze, not a blank frame


def test_episode_length_truncates_and_next_episode_runs(maze):
    for _ in range(2):
        maze.reset()
        for t in range(1, 4):
            obs, reward, terminated, truncated, info = maze.step(1)  # forward
            assert maze.observation_space.contains(obs) and reward in (0.0, 1.0)
            assert not terminated and truncated == (t == 3) and info["discount"] == 1.0


def test_the_mazes_own_time_limit_is_a_truncation(maze):
    """Shorten the package's time limit (seconds) to 2 control steps: LAST with discount 1."""
    composer_env = _composer_env(maze)
    # The package's episode length at 4 Hz is what EPISODE_STEPS says.
    steps = composer_env._time_limit / composer_env.control_timestep()
    assert math.ceil(steps) == EPISODE_STEPS["9x9"]
    saved = composer_env._time_limit
    composer_env._time_limit = 2 * composer_env.control_timestep() - 1e-3
    try:
        maze.reset()
        first = maze.step(0)
        second = maze.step(0)
    finally:
        composer_env._time_limit = saved
    assert first[2:4] == (False, False)
    assert second[2:4] == (False, True) and second[4]["discount"] == 1.0


def test_seeds_reproduce_the_maze(maze):
    reseeded = maze.reset(seed=0)[0]["image"]  # rebuilds with seed 0, as make did
    again = envs.make("memory_maze/9x9", seed=0).reset()[0]["image"]
    other = envs.make("memory_maze/9x9", seed=1).reset()[0]["image"]
    np.testing.assert_array_equal(reseeded, again)
    assert not np.array_equal(again, other)
