"""dm_env wrappers (step limit, action repeat) through the gymnasium adapter, renderer choice,
and the ``worldmodels/...`` gymnasium registrations. No MuJoCo needed."""

from __future__ import annotations

import os
import subprocess
import sys

import dm_env
import gymnasium
import numpy as np
import pytest
from dm_env import specs

import envs
from envs import DmEnvToGymnasium, rendering
from envs.dm_env_wrappers import ActionRepeat, StepLimit


class _Counter(dm_env.Environment):
    """obs = step count t; reward = t; episode ends at `length` with discount `last_discount`."""

    def __init__(self, length: int = 10, last_discount: float = 1.0) -> None:
        self.length, self.last_discount = length, last_discount
        self.t = 0
        self.resets = 0
        self.actions: list[float] = []

    def _obs(self):
        return np.array([self.t], np.float32)

    def reset(self):
        self.t = 0
        self.resets += 1
        return dm_env.restart(self._obs())

    def step(self, action):
        self.actions.append(float(action[0]))
        self.t += 1
        if self.t >= self.length:
            if self.last_discount == 0.0:
                return dm_env.termination(float(self.t), self._obs())
            return dm_env.truncation(float(self.t), self._obs(), self.last_discount)
        return dm_env.transition(float(self.t), self._obs())

    def observation_spec(self):
        return specs.Array((1,), np.float32, name="t")

    def action_spec(self):
        return specs.BoundedArray((1,), np.float32, -1.0, 1.0, name="action")


def _episode(env: gymnasium.Env, max_steps: int = 100):
    """(rewards, last step's terminated, truncated, info) of one episode of zero actions."""
    env.reset()
    rewards = []
    for _ in range(max_steps):
        _, reward, terminated, truncated, info = env.step(np.zeros(1, np.float32))
        rewards.append(reward)
        if terminated or truncated:
            return rewards, terminated, truncated, info
    raise AssertionError("episode did not end")


def test_action_repeat_sums_rewards_and_counts_inner_steps():
    inner = _Counter(length=10)
    rewards, terminated, truncated, info = _episode(DmEnvToGymnasium(ActionRepeat(inner, 3)))
    # Inner rewards 1..10 in groups of 3; the last group is cut short by the episode end.
    assert rewards == [1 + 2 + 3, 4 + 5 + 6, 7 + 8 + 9, 10]
    assert (terminated, truncated) == (False, True) and info["discount"] == 1.0
    assert len(inner.actions) == 10


@pytest.mark.parametrize("last_discount, terminated", [(0.0, True), (0.5, False)])
def test_action_repeat_keeps_the_end_discount(last_discount, terminated):
    env = DmEnvToGymnasium(ActionRepeat(_Counter(length=4, last_discount=last_discount), 2))
    rewards, term, trunc, info = _episode(env)
    assert rewards == [3.0, 7.0]
    assert (term, trunc) == (terminated, not terminated)
    assert info["discount"] == last_discount


def test_step_limit_truncates_with_discount_one():
    inner = _Counter(length=100)
    env = DmEnvToGymnasium(StepLimit(inner, 4))
    rewards, terminated, truncated, info = _episode(env)
    assert rewards == [1.0, 2.0, 3.0, 4.0]
    assert (terminated, truncated) == (False, True) and info["discount"] == 1.0
    # A second episode starts from a fresh inner reset and is cut at 4 again.
    rewards, *_ = _episode(env)
    assert rewards == [1.0, 2.0, 3.0, 4.0] and inner.resets == 2


def test_step_limit_lets_an_earlier_terminal_through():
    env = DmEnvToGymnasium(StepLimit(_Counter(length=3, last_discount=0.0), 5))
    rewards, terminated, truncated, info = _episode(env)
    assert rewards == [1.0, 2.0, 3.0]
    assert (terminated, truncated) == (True, False) and info["discount"] == 0.0


def test_step_limit_inside_action_repeat_counts_inner_steps():
    inner = _Counter(length=100)
    rewards, _, truncated, _ = _episode(DmEnvToGymnasium(ActionRepeat(StepLimit(inner, 5), 2)))
    assert truncated and rewards == [1 + 2, 3 + 4, 5] and len(inner.actions) == 5


def test_step_limit_steps_after_last_start_a_new_episode():
    inner = _Counter(length=100)
    env = StepLimit(inner, 2)
    env.reset()
    env.step(np.zeros(1))
    assert env.step(np.zeros(1)).last()
    assert env.step(np.zeros(1)).first() and inner.resets == 2


@pytest.mark.parametrize("bad", [0, -1])
def test_wrappers_reject_bad_counts(bad):
    with pytest.raises(ValueError, match="max_steps"):
        StepLimit(_Counter(), bad)
    with pytest.raises(ValueError, match="repeat"):
        ActionRepeat(_Counter(), bad)


# ---------------------------------------------------------------- rendering


@pytest.fixture
def fresh_gl(monkeypatch):
    """As if dm_control had not been imported and the user had not set MUJOCO_GL."""
    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    monkeypatch.delitem(sys.modules, "dm_control._render", raising=False)
    monkeypatch.setattr(rendering, "_provisional", False)
    return monkeypatch


def test_choose_backend_takes_the_first_that_works():
    tried = []

    def probe(backend):
        tried.append(backend)
        return backend == "osmesa"

    assert rendering.choose_backend(probe=probe) == "osmesa"
    assert tried == ["egl", "osmesa"]
    assert rendering.choose_backend(probe=lambda b: False) is None


def test_ensure_mujoco_gl_sets_the_working_backend(fresh_gl):
    fresh_gl.setattr(rendering, "probe_backend", lambda backend: backend == "egl")
    assert rendering.ensure_mujoco_gl() == "egl"
    assert os.environ["MUJOCO_GL"] == "egl"


def test_provisional_default_is_checked_and_replaced(fresh_gl):
    rendering.default_mujoco_gl()
    assert os.environ["MUJOCO_GL"] == "egl"
    fresh_gl.setattr(rendering, "probe_backend", lambda backend: backend == "osmesa")
    assert rendering.ensure_mujoco_gl() == "osmesa"
    assert os.environ["MUJOCO_GL"] == "osmesa"
    # Decided: later calls keep it without probing again.
    fresh_gl.setattr(rendering, "probe_backend", lambda backend: pytest.fail("probed"))
    assert rendering.ensure_mujoco_gl() == "osmesa"


def test_importing_envs_sets_egl_unless_the_user_chose():
    code = "import os, envs; print(os.environ.get('MUJOCO_GL'))"
    environ = {k: v for k, v in os.environ.items() if k != "MUJOCO_GL"}
    out = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    assert out == ["egl"]
    out = subprocess.run([sys.executable, "-c", code], env={**environ, "MUJOCO_GL": "osmesa"},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out == ["osmesa"]


def test_ensure_mujoco_gl_keeps_the_users_choice(fresh_gl):
    fresh_gl.setenv("MUJOCO_GL", "osmesa")
    fresh_gl.setattr(rendering, "probe_backend", lambda backend: pytest.fail("probed"))
    assert rendering.ensure_mujoco_gl() == "osmesa"


def test_no_renderer_error_names_the_debian_packages(fresh_gl):
    fresh_gl.setattr(rendering, "probe_backend", lambda backend: False)
    with pytest.raises(rendering.RendererUnavailableError) as err:
        rendering.ensure_mujoco_gl(need_rendering=True)
    msg = str(err.value)
    assert "libegl1 libegl-mesa0 libgl1-mesa-dri libgbm1" in msg and "libosmesa6" in msg


def test_no_renderer_without_images_disables_rendering(fresh_gl):
    fresh_gl.setattr(rendering, "probe_backend", lambda backend: False)
    with pytest.warns(UserWarning, match="libosmesa6"):
        assert rendering.ensure_mujoco_gl(need_rendering=False) == "disable"
    # A later image env in the same process gets the clear error, not dm_control's.
    with pytest.raises(rendering.RendererUnavailableError, match="MUJOCO_GL='disable'"):
        rendering.ensure_mujoco_gl(need_rendering=True)


# ---------------------------------------------------------------- gymnasium registration


def test_gymnasium_ids_map_to_make_names():
    names = envs.gymnasium_names()
    assert names["worldmodels/dmc-walker-walk"] == "dmc/walker-walk"
    assert names["worldmodels/dmc-vision-quadruped-run"] == "dmc-vision/quadruped-run"
    assert names["worldmodels/memory_maze-15x15"] == "memory_maze/15x15"
    assert names["worldmodels/popgym-RepeatPreviousEasy"] == "popgym/RepeatPreviousEasy"
    for gym_id, name in names.items():
        spec = gymnasium.spec(gym_id)
        assert spec.kwargs == {"name": name}
        assert any(name.startswith(prefix) for prefix in envs.families())
    assert "worldmodels/make" in gymnasium.registry


def test_gymnasium_make_passes_names_and_kwargs():
    env = gymnasium.make("worldmodels/make", name="bsuite/catch/0", seed=3)
    obs, _ = env.reset()
    np.testing.assert_array_equal(obs, envs.make("bsuite/catch/0", seed=3).reset()[0])
