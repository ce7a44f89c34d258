"""Tests for the `envs` package: name scheme, dm_env adapter, bsuite, gym."""

from __future__ import annotations

import collections
import warnings

import dm_env
import gymnasium
import numpy as np
import pytest
from dm_env import specs
from gymnasium import spaces
from gymnasium.utils.env_checker import check_env

import envs
from envs import DmEnvToGymnasium, families, make


def _run_episode(env: gymnasium.Env, max_steps: int = 1000, seed: int | None = 0):
    """Random actions until the episode ends; returns the last step's tuple and length."""
    env.reset(seed=seed)
    for t in range(1, max_steps + 1):
        out = env.step(env.action_space.sample())
        if out[2] or out[3]:
            return out, t
    raise AssertionError(f"episode did not end in {max_steps} steps")


class _FixedLengthEnv(dm_env.Environment):
    """Tiny dm_env: episodes of `length` steps, last discount `last_discount`.

    Dict observations cover the three spec kinds (bounded, plain float, plain int).
    """

    def __init__(self, length: int = 3, last_discount: float = 0.0, continuous: bool = False):
        self._length = length
        self._last_discount = last_discount
        self._continuous = continuous
        self._t = 0
        self.closed = False
        self.actions = []

    def _obs(self):
        return collections.OrderedDict(
            image=np.full((2, 3), self._t / self._length, np.float32),
            vector=np.arange(4, dtype=np.float64) * self._t,
            count=np.int32(self._t),
        )

    def reset(self):
        self._t = 0
        return dm_env.restart(self._obs())

    def step(self, action):
        self.actions.append(action)
        self._t += 1
        if self._t >= self._length:
            return dm_env.termination(1.0, self._obs()) if self._last_discount == 0 else (
                dm_env.truncation(1.0, self._obs(), discount=self._last_discount)
            )
        return dm_env.transition(0.5, self._obs())

    def observation_spec(self):
        return collections.OrderedDict(
            image=specs.BoundedArray((2, 3), np.float32, 0.0, 1.0, name="image"),
            vector=specs.Array((4,), np.float64, name="vector"),
            count=specs.Array((), np.int32, name="count"),
        )

    def action_spec(self):
        if self._continuous:
            return specs.BoundedArray((2,), np.float32, -1.0, 1.0, name="action")
        return specs.DiscreteArray(4, dtype=np.int32, name="action")

    def close(self):
        self.closed = True


# ---------------------------------------------------------------- bsuite


@pytest.mark.parametrize(
    "name, obs_shape, n_actions",
    [("bsuite/catch/0", (10, 5), 3), ("bsuite/memory_len/3", (1, 3), 2)],
)
def test_bsuite_episode_ends_terminated(name, obs_shape, n_actions):
    env = make(name, seed=1)
    assert isinstance(env, DmEnvToGymnasium)
    assert env.action_space == spaces.Discrete(n_actions, dtype=env.action_space.dtype)
    assert env.observation_space.shape == obs_shape
    assert env.observation_space.dtype == np.float32

    obs, info = env.reset(seed=0)
    assert obs.dtype == np.float32 and obs.shape == obs_shape
    assert env.observation_space.contains(obs)
    assert info == {}

    (obs, reward, terminated, truncated, info), _ = _run_episode(env)
    # bsuite episodes end with discount 0 -> a true terminal.
    assert terminated and not truncated
    assert info["discount"] == 0.0
    assert type(reward) is float and reward in (-1.0, 1.0)
    assert env.observation_space.contains(obs)
    env.close()


def test_bsuite_catch_mid_episode_step():
    env = make("bsuite/catch/0", seed=0)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(1)
    assert (terminated, truncated) == (False, False)
    assert type(reward) is float and reward == 0.0
    assert info == {"discount": 1.0}


def test_bsuite_seeded_reset_is_reproducible():
    env = make("bsuite/catch/0")
    first = [env.reset(seed=s)[0] for s in range(8)]
    again = [env.reset(seed=s)[0] for s in range(8)]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    # Catch drops the ball in a random column: 8 seeds should not all agree.
    assert len({a.tobytes() for a in first}) > 1


def test_bsuite_check_env_catch():
    check_env(make("bsuite/catch/0", seed=0), skip_render_check=True)


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is.*")
def test_bsuite_check_env_memory_len():
    # Passes; the checker only warns that the Box(-inf, inf) bounds look unbounded,
    # which is what bsuite's plain Array spec means.
    check_env(make("bsuite/memory_len/3", seed=0), skip_render_check=True)


def test_bsuite_results_dir_records_csv(tmp_path):
    env = make("bsuite/catch/0", seed=0, results_dir=str(tmp_path))
    _run_episode(env, seed=None)  # the recording env is seeded by make, not reset
    env.close()
    assert list(tmp_path.glob("*.csv")), "bsuite csv logger wrote nothing"


def test_unknown_bsuite_id_raises():
    with pytest.raises(ValueError) as err:
        make("bsuite/catch/9999")
    msg = str(err.value)
    assert "'bsuite/catch/9999'" in msg and "catch ids 0-19" in msg


def test_unknown_bsuite_id_names_the_id_with_that_setting():
    from bsuite import sweep

    # A reader of the R2I paper tries memory length 30 as the id; bsuite's own sweep says which id it is.
    (wanted,) = [k for k, v in sweep.SETTINGS.items() if k.startswith("memory_len/") and v["memory_length"] == 30]
    with pytest.raises(ValueError) as err:
        envs.check_name("bsuite/memory_len/30")
    msg = str(err.value)
    assert "\n" not in msg and msg.endswith(f"memory_length 30 is 'bsuite/{wanted}'")
    assert wanted == "memory_len/15"
    # every id of the experiment is listed with its memory length, as bsuite's sweep has it
    listed = msg.split("(id: value) ")[1].split(";")[0]
    pairs = dict(item.split(": ") for item in listed.split(", "))
    assert {f"memory_len/{i}": int(v) for i, v in pairs.items()} == {
        k: v["memory_length"] for k, v in sweep.SETTINGS.items() if k.startswith("memory_len/")}
    # make and the JAX twin refuse it with the same line
    with pytest.raises(ValueError, match="'bsuite/memory_len/15'"):
        make("bsuite/memory_len/30")
    from envs import jax as jax_envs

    with pytest.raises(ValueError, match="'bsuite/memory_len/15'"):
        jax_envs.make("bsuite/memory_len/30")


def test_check_name_refuses_bad_names_without_building():
    envs.check_name("bsuite/memory_len/15")
    envs.check_name("gym:CartPole-v1")
    with pytest.raises(ValueError, match="unknown bsuite experiment 'memory_length'.*memory_len"):
        envs.check_name("bsuite/memory_length/3")
    with pytest.raises(ValueError, match="unknown environment family"):
        envs.check_name("atari/Pong")
    with pytest.raises(ValueError, match="no id"):
        envs.check_name("dmc/")
    # ids without one varying setting: said so, and no suggestion
    with pytest.raises(ValueError, match=r"catch ids 0-19 share one setting") as err:
        envs.check_name("bsuite/catch/20")
    assert " is 'bsuite/" not in str(err.value)


# ---------------------------------------------------------------- adapter


@pytest.mark.parametrize(
    "last_discount, terminated, truncated", [(0.0, True, False), (1.0, False, True), (0.5, False, True)]
)
def test_adapter_last_step_discount(last_discount, terminated, truncated):
    env = DmEnvToGymnasium(_FixedLengthEnv(length=3, last_discount=last_discount))
    env.reset()
    for _ in range(2):
        _, reward, term, trunc, info = env.step(0)
        assert (term, trunc) == (False, False) and reward == 0.5 and info["discount"] == 1.0
    _, reward, term, trunc, info = env.step(0)
    assert (term, trunc) == (terminated, truncated)
    assert info["discount"] == last_discount
    assert type(reward) is float and reward == 1.0


def test_adapter_spaces_match_specs():
    raw = _FixedLengthEnv()
    env = DmEnvToGymnasium(raw)
    assert env.action_space == spaces.Discrete(4, dtype=np.int32)
    obs_space = env.observation_space
    assert isinstance(obs_space, spaces.Dict)
    assert list(obs_space.keys()) == ["image", "vector", "count"]
    image = obs_space["image"]
    assert image.shape == (2, 3) and image.dtype == np.float32
    assert np.all(image.low == 0.0) and np.all(image.high == 1.0)
    vector = obs_space["vector"]
    assert vector.shape == (4,) and vector.dtype == np.float64
    assert np.all(np.isinf(vector.low)) and np.all(np.isinf(vector.high))
    assert obs_space["count"].shape == () and obs_space["count"].dtype == np.int32

    obs, _ = env.reset()
    assert obs_space.contains(obs)
    assert obs["image"].dtype == np.float32 and obs["vector"].dtype == np.float64
    obs, *_ = env.step(np.int64(2))
    assert obs_space.contains(obs)
    # Discrete actions reach the dm_env as Python ints.
    assert raw.actions == [2] and type(raw.actions[0]) is int


def test_adapter_continuous_action():
    raw = _FixedLengthEnv(continuous=True)
    env = DmEnvToGymnasium(raw)
    assert env.action_space == spaces.Box(-1.0, 1.0, (2,), np.float32)
    env.reset()
    env.step([0.5, -0.5])
    assert raw.actions[0].dtype == np.float32


@pytest.mark.filterwarnings("ignore:.*Box observation space (minimum|maximum) value is.*")
def test_adapter_check_env_dict_obs():
    check_env(DmEnvToGymnasium(factory=lambda seed: _FixedLengthEnv()), skip_render_check=True)


def test_adapter_factory_rebuilds_on_seeded_reset():
    seeds = []

    def factory(seed):
        seeds.append(seed)
        return _FixedLengthEnv()

    env = DmEnvToGymnasium(factory=factory, seed=3)
    first = env.dm_env
    env.reset()
    env.reset(seed=7)
    assert seeds == [3, 7]
    assert first.closed and env.dm_env is not first


def test_adapter_without_factory_warns_on_seed():
    env = DmEnvToGymnasium(_FixedLengthEnv())
    with pytest.warns(UserWarning, match="no factory"):
        env.reset(seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        env.reset(seed=2)  # warned once only


def test_adapter_close_closes_wrapped():
    raw = _FixedLengthEnv()
    env = DmEnvToGymnasium(raw)
    env.close()
    assert raw.closed


def test_adapter_needs_env_or_factory():
    with pytest.raises(ValueError):
        DmEnvToGymnasium()


# ---------------------------------------------------------------- gym + names


def test_gym_passthrough():
    env = make("gym:CartPole-v1")
    assert env.spec.id == "CartPole-v1"
    assert env.action_space == spaces.Discrete(2)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (4,)
    _, reward, terminated, truncated, _ = env.step(0)
    assert isinstance(reward, float) and not truncated
    env.close()


def test_gym_kwargs_and_seed():
    env = make("gym:CartPole-v1", seed=5, max_episode_steps=7)
    obs_a, _ = env.reset()  # seed 5 applied on this first reset
    obs_b, _ = gymnasium.make("CartPole-v1").reset(seed=5)
    np.testing.assert_array_equal(obs_a, obs_b)
    obs_c, _ = env.reset()  # later resets continue the seeded RNG
    assert not np.array_equal(obs_a, obs_c)
    assert env.spec.max_episode_steps == 7


def test_unknown_family_raises_with_families():
    with pytest.raises(ValueError) as err:
        make("atari/Pong")
    msg = str(err.value)
    for prefix in families():
        assert prefix in msg


def test_unknown_gym_id_raises_value_error():
    with pytest.raises(ValueError, match="NoSuchEnv"):
        make("gym:NoSuchEnv-v0")


def test_empty_id_raises():
    with pytest.raises(ValueError):
        make("bsuite/")


def test_families_and_registry():
    # Other families may join; these must stay.
    assert {"gym:", "bsuite/", "dmc/", "dmc-vision/", "memory_maze/", "popgym/"} <= set(families())
    assert set(families()) == set(envs._REGISTRY)
