"""DMC families: ``dmc/<domain>-<task>`` (proprio) and ``dmc-vision/<domain>-<task>``."""

from __future__ import annotations

import os
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

pytest.importorskip("dm_control")

import envs  # noqa: E402
from envs.dmc import DEFAULT_CAMERAS, DMC_TASKS, make_dmc  # noqa: E402
from worldmodels import spaces as agent_spaces  # noqa: E402


def _rollout(env: gymnasium.Env, actions: np.ndarray, seed: int | None = None):
    """Observations (list) and rewards (array) of `actions` from a reset with `seed`."""
    obs, _ = env.reset(seed=seed)
    observations, rewards = [obs], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        assert not (terminated or truncated)
    return observations, np.asarray(rewards)


def _actions(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, dim)).astype(np.float32)


def test_task_list_matches_the_installed_suite():
    from dm_control import suite

    assert DMC_TASKS == tuple(suite.ALL_TASKS)


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        envs.make("dmc/walker-fly")
    assert "walker-fly" in str(err.value) and "walker-walk" in str(err.value)
    with pytest.raises(ValueError, match="cartpole-swingup"):
        envs.make("dmc-vision/cartpole")


def test_proprio_spaces_and_dtypes():
    env = envs.make("dmc/walker-walk", seed=0)
    obs_space = env.observation_space
    assert isinstance(obs_space, spaces.Dict)
    assert {k: s.shape for k, s in obs_space.items()} == {
        "orientations": (14,), "height": (1,), "velocity": (9,)}
    assert all(s.dtype == np.float32 for s in obs_space.values())
    assert env.action_space == spaces.Box(-1.0, 1.0, (6,), np.float32)
    obs, info = env.reset()
    assert obs_space.contains(obs) and info == {}
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    assert obs_space.contains(obs) and isinstance(reward, float)
    assert (terminated, truncated, info["discount"]) == (False, False, 1.0)
    # The agent reads these spaces as they are.
    assert agent_spaces.obs_spec(obs_space)["height"] == ((1,), "float32")
    assert agent_spaces.action_spec(env.action_space).dim == 6


def test_default_episode_is_500_steps_and_truncated():
    """1000 control steps with action repeat 2; the suite's time limit is a truncation."""
    env = envs.make("dmc/cartpole-balance", seed=0)
    env.reset()
    for t in range(1, 501):
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        assert 0.0 <= reward <= 2.0  # two control steps of reward in [0, 1]
        assert not terminated
        if truncated:
            break
    assert (t, truncated, info["discount"]) == (500, True, 1.0)
    # A new episode starts cleanly after the reset.
    env.reset()
    assert env.step(env.action_space.sample())[3] is False


@pytest.mark.parametrize("repeat, length, steps", [(2, 10, 5), (1, 7, 7), (3, 7, 3)])
def test_episode_length_counts_control_steps(repeat, length, steps):
    env = envs.make("dmc/cartpole-swingup", seed=0, action_repeat=repeat, episode_length=length)
    env.reset()
    for t in range(1, 100):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            break
    assert (t, terminated, truncated) == (steps, False, True)


def test_action_repeat_sums_rewards():
    actions = _actions(12, 1)
    once = envs.make("dmc/cartpole-swingup", seed=4, action_repeat=1)
    twice = envs.make("dmc/cartpole-swingup", seed=4)  # default repeat 2
    obs1, rewards1 = _rollout(once, np.repeat(actions, 2, axis=0))
    obs2, rewards2 = _rollout(twice, actions)
    np.testing.assert_allclose(rewards2, rewards1.reshape(-1, 2).sum(1), rtol=1e-6)
    for a, b in zip(obs1[::2], obs2):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-6)
    assert rewards2.max() > 0  # the check compared real rewards, not zeros


def test_seeds_reproduce():
    actions = _actions(10, 6)
    first = _rollout(envs.make("dmc/walker-walk", seed=3), actions)
    again = _rollout(envs.make("dmc/walker-walk", seed=3), actions)
    other = _rollout(envs.make("dmc/walker-walk", seed=4), actions)
    for a, b in zip(first[0], again[0]):
        np.testing.assert_array_equal(a["orientations"], b["orientations"])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0][0]["orientations"], other[0][0]["orientations"])

    # A seeded reset rebuilds the task with that seed.
    env = envs.make("dmc/walker-walk", seed=0)
    reseeded = _rollout(env, actions, seed=3)
    np.testing.assert_array_equal(reseeded[1], first[1])


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is.*")
def test_check_env_proprio():
    # Passes; the checker only warns that proprio vectors are unbounded, which they are.
    check_env(envs.make("dmc/cartpole-balance", seed=0), skip_render_check=True)


def test_vision_observations():
    env = envs.make("dmc-vision/cartpole-swingup", seed=0, episode_length=6)
    assert env.observation_space == spaces.Dict(
        {"image": spaces.Box(0, 255, (64, 64, 3), np.uint8)})
    assert env.action_space == spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert agent_spaces.obs_spec(env.observation_space) == {"image": ((64, 64, 3), "uint8")}
    observations, _ = _rollout(env, np.ones((2, 1), np.float32))
    images = [o["image"] for o in observations]
    for image in images:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert image.std() > 10  # a rendered scene, not a blank frame
    assert not np.array_equal(images[0], images[-1])  # the cart moved
    # episode_length 6 with repeat 2: the third step truncates.
    _, _, terminated, truncated, info = env.step(np.ones(1, np.float32))
    assert (terminated, truncated, info["discount"]) == (False, True, 1.0)


def test_vision_quadruped_uses_camera_2():
    assert DEFAULT_CAMERAS == {"quadruped": 2}
    default = make_dmc("quadruped-walk", 0, vision=True).reset()[0]["image"]
    cam2 = make_dmc("quadruped-walk", 0, vision=True, camera=2).reset()[0]["image"]
    cam0 = make_dmc("quadruped-walk", 0, vision=True, camera=0).reset()[0]["image"]
    np.testing.assert_array_equal(default, cam2)
    assert not np.array_equal(default, cam0)


def test_gymnasium_make_dmc():
    env = gymnasium.make("worldmodels/dmc-cartpole-balance", seed=1, episode_length=4)
    obs, _ = env.reset()
    assert set(obs) == {"position", "velocity"}
    np.testing.assert_array_equal(
        obs["position"], envs.make("dmc/cartpole-balance", seed=1).reset()[0]["position"])
    env.step(env.action_space.sample())
    assert env.step(env.action_space.sample())[3] is True


def test_renderer_is_chosen_before_mujoco_is_imported():
    """A fresh process without MUJOCO_GL: `make` picks a working backend for dm_control."""
    code = (
        "import envs, os\n"
        "env = envs.make('dmc-vision/cartpole-balance', seed=0)\n"
        "assert env.reset()[0]['image'].std() > 10\n"
        "from dm_control import _render\n"
        "print(os.environ['MUJOCO_GL'], _render.BACKEND)\n"
    )
    environ = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM")}
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    chosen, backend = result.stdout.split()
    assert chosen == backend and chosen in ("egl", "osmesa")
