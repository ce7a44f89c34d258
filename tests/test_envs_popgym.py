"""POPGym family: ``popgym/<Env>`` -> ``popgym-<Env>-v0``, with agent-readable spaces."""

from __future__ import annotations

import gymnasium
import numpy as np
import pytest
from gymnasium import spaces

pytest.importorskip("popgym")

# POPGym's CountRecall and MultiarmedBandit reuse one info dict; gymnasium's checker says so.
pytestmark = pytest.mark.filterwarnings("ignore:.*infos returned by.*share an object.*")

import envs  # noqa: E402
from envs.popgym_env import POPGYM_ENVS, _RavelActions  # noqa: E402
from worldmodels import spaces as agent_spaces  # noqa: E402


def _rollout(env: gymnasium.Env, steps: int, seed: int | None = None):
    """(observations, rewards, flags) for a fixed action sequence of `steps` steps."""
    obs, _ = env.reset(seed=seed)
    actions = np.random.default_rng(0).integers(0, env.action_space.n, steps)
    observations, rewards, flags = [obs], [], []
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        observations.append(obs)
        rewards.append(reward)
        flags.append((terminated, truncated))
        if terminated or truncated:
            break
    return observations, rewards, flags


def test_env_list_matches_popgyms_registrations():
    import popgym  # noqa: F401

    registered = {k for k in gymnasium.registry if k.startswith("popgym-")}
    assert {f"popgym-{env_id}-v0" for env_id in POPGYM_ENVS} == registered


def test_unknown_env_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        envs.make("popgym/RepeatPrevious")  # difficulty missing
    assert "RepeatPreviousEasy" in str(err.value) and "CountRecallHard" in str(err.value)


@pytest.mark.parametrize("env_id", POPGYM_ENVS)
def test_every_env_builds_steps_and_suits_the_agent(env_id):
    env = envs.make(f"popgym/{env_id}", seed=0)
    agent_spaces.obs_spec(env.observation_space)  # raises on spaces the agent cannot read
    agent_spaces.action_spec(env.action_space)
    obs, _ = env.reset()
    assert env.observation_space.contains(obs)
    for _ in range(3):
        obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
        assert env.observation_space.contains(obs) and np.isfinite(reward)
        if terminated or truncated:
            break


def test_repeat_previous_episode_terminates():
    env = envs.make("popgym/RepeatPreviousEasy", seed=0)
    assert env.observation_space == spaces.Discrete(4) and env.action_space == spaces.Discrete(4)
    for _ in range(2):  # and again after a reset
        _, rewards, flags = _rollout(env, 200)
        assert flags[-1] == (True, False) and not any(any(f) for f in flags[:-1])
        assert len(rewards) == 51


def test_seeds_reproduce():
    first = _rollout(envs.make("popgym/RepeatPreviousEasy", seed=3), 20)
    again = _rollout(envs.make("popgym/RepeatPreviousEasy", seed=3), 20)
    other = _rollout(envs.make("popgym/RepeatPreviousEasy", seed=4), 20)
    assert first == again
    assert first[0] != other[0]
    # A seeded reset reproduces it too.
    assert _rollout(envs.make("popgym/RepeatPreviousEasy"), 20, seed=3) == first


def test_tuple_observation_is_flattened_one_hot():
    env = envs.make("popgym/AutoencodeEasy", seed=0)
    raw = gymnasium.make("popgym-AutoencodeEasy-v0")
    assert env.observation_space == spaces.Box(0.0, 1.0, (6,), np.float32)  # Discrete(2)+(4)
    obs, _ = env.reset(seed=1)
    raw_obs, _ = raw.reset(seed=1)
    np.testing.assert_array_equal(obs, spaces.utils.flatten(raw.observation_space, raw_obs))
    assert obs.dtype == np.float32 and obs.sum() == 2.0  # one hot per part
    raw_env = envs.make("popgym/AutoencodeEasy", flatten=False)
    assert isinstance(raw_env.observation_space, spaces.Tuple)


class _MultiDiscreteActions(gymnasium.Env):
    observation_space = spaces.Discrete(1)
    action_space = spaces.MultiDiscrete([3, 5])

    def __init__(self):
        self.received = []

    def reset(self, *, seed=None, options=None):
        return 0, {}

    def step(self, action):
        self.received.append(tuple(int(a) for a in action))
        return 0, 0.0, False, False, {}


def test_multidiscrete_actions_are_one_discrete():
    raw = _MultiDiscreteActions()
    env = _RavelActions(raw)
    assert env.action_space == spaces.Discrete(15)
    for action in (0, 4, 5, 14):
        env.step(action)
    assert raw.received == [(0, 0), (0, 4), (1, 0), (2, 4)]
    assert envs.make("popgym/BattleshipEasy").action_space == spaces.Discrete(64)


def test_gymnasium_make_popgym():
    env = gymnasium.make("worldmodels/popgym-RepeatPreviousEasy", seed=3)
    obs, _ = env.reset()
    assert obs == envs.make("popgym/RepeatPreviousEasy", seed=3).reset()[0]
