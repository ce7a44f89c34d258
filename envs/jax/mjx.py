"""The DeepMind Control Suite on MJX (MuJoCo Playground's ports) as functional JAX envs.

``MjxSuite("cartpole-swingup")`` wraps MuJoCo Playground's ``CartpoleSwingup`` (its
``mujoco_playground.dm_control_suite``, physics by ``mujoco-mjx``) in the API of the bsuite twins
(`envs.jax`): a static, hashable env object, ``reset(params, key)`` and
``step(params, state, action, key)`` returning a `TimeStep`, pure functions that run under jit,
vmap and `lax.scan`. The protocol is the host ``dmc/`` envs' (`envs.dmc`), DreamerV3's:

* Observations: Playground's proprio vector (the dm_control observation dict's values, concatenated
  in the suite's order), float32 ``[observation_shape]``.
* Actions: continuous, float32 ``[action_size]`` in [-1, 1] (clipped), as every suite task's.
* Action repeat 2: one env step is 2 control steps, rewards summed (returns stay in [0, 1000]).
* Episodes are the suite's 1000 control steps (500 env steps) and end by truncation; a step whose
  physics diverged (NaN in qpos or qvel, which Playground reports as ``done``) ends the episode as
  terminated, with NaNs in its observation and reward set to 0.
* ``params`` is an empty tuple (the task fixes everything); ``step`` ignores its key.

The physics runs on MJX's JAX implementation (``impl="jax"``) by default: on a CPU it stepped
cartpole 47-360x faster than the Warp implementation (Playground's default, ``impl="warp"``), and
it is plain XLA, so it shards and fuses with the rest of the compiled loop.

Playground's ports differ from dm_control in places (its README lists them); ``experiments.mjx_parity``
measures how far each task's observations and rewards drift from dm_control's over 100 steps.

Needs the ``mjx`` extra: ``pip install -e ".[mjx]"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from envs.jax.base import TimeStep, restart

__all__ = ["MJX_TASKS", "MjxState", "MjxSuite", "make_mjx", "playground_env"]

# dm_control suite task ("<domain>-<task>", as `envs.dmc` spells them) -> MuJoCo Playground's name.
# Every suite task in Playground 0.2.0's registry; the rest of the suite (manipulator, dog, lqr,
# quadruped, stacker, humanoid_CMU, cartpole two/three poles, fish-upright, point_mass-hard,
# swimmer15) is not there.
MJX_TASKS: dict[str, str] = {
    "acrobot-swingup": "AcrobotSwingup", "acrobot-swingup_sparse": "AcrobotSwingupSparse",
    "ball_in_cup-catch": "BallInCup",
    "cartpole-balance": "CartpoleBalance", "cartpole-balance_sparse": "CartpoleBalanceSparse",
    "cartpole-swingup": "CartpoleSwingup", "cartpole-swingup_sparse": "CartpoleSwingupSparse",
    "cheetah-run": "CheetahRun",
    "finger-spin": "FingerSpin", "finger-turn_easy": "FingerTurnEasy", "finger-turn_hard": "FingerTurnHard",
    "fish-swim": "FishSwim",
    "hopper-hop": "HopperHop", "hopper-stand": "HopperStand",
    "humanoid-stand": "HumanoidStand", "humanoid-walk": "HumanoidWalk", "humanoid-run": "HumanoidRun",
    "pendulum-swingup": "PendulumSwingup",
    "point_mass-easy": "PointMass",
    "reacher-easy": "ReacherEasy", "reacher-hard": "ReacherHard",
    "swimmer-swimmer6": "SwimmerSwimmer6",
    "walker-stand": "WalkerStand", "walker-walk": "WalkerWalk", "walker-run": "WalkerRun",
}
IMPLS = ("jax", "warp")


def _import_playground() -> Any:
    """`mujoco_playground.dm_control_suite`, or an error naming the extra that installs it."""
    from envs.rendering import import_mujoco_module

    return import_mujoco_module("mujoco_playground", "mjx", need_rendering=False).dm_control_suite


@contextlib.contextmanager
def _reacher_fix():
    """Playground 0.2.0 builds its reacher with ``MjSpec.find_body`` when ``mujoco.__version__ >= "3.3.0"``
    is False as strings, which "3.17.0" is; mujoco 3.17 has only ``MjSpec.body``. Build the same model
    with ``body`` while the env is made."""
    import mujoco
    from mujoco_playground._src.dm_control_suite import reacher

    def make_model(xml_path, target_size, assets):
        spec = mujoco.MjSpec.from_string(xml_path.read_text(), assets)
        spec.body("target").first_geom().size[0] = target_size
        return spec.compile()

    original = reacher._make_model
    reacher._make_model = make_model
    try:
        yield
    finally:
        reacher._make_model = original


@functools.lru_cache(maxsize=None)
def playground_env(task: str, impl: str = "jax") -> Any:
    """MuJoCo Playground's env for a suite task (``"walker-walk"``), one per (task, impl) per process.

    **Raises:** `ValueError` naming the valid tasks or impls; `ModuleNotFoundError` naming the
    ``mjx`` extra when Playground is not installed.
    """
    if task not in MJX_TASKS:
        raise ValueError(f"unknown MJX task {task!r}: MuJoCo Playground ports {', '.join(MJX_TASKS)} "
                         "(the host envs 'dmc/<domain>-<task>' have every dm_control task)")
    if impl not in IMPLS:
        raise ValueError(f"unknown MJX implementation {impl!r}: choose one of {IMPLS}")
    suite = _import_playground()
    fix = _reacher_fix() if task.startswith("reacher-") else contextlib.nullcontext()
    with fix:
        return suite.load(MJX_TASKS[task], config_overrides={"impl": impl})


class MjxState(NamedTuple):
    """`MjxSuite`'s state: Playground's (physics data, last observation and reward, ...) and the
    control steps of the episode so far."""

    physics: Any  # mujoco_playground State
    control_steps: Int[Array, ""]


@dataclasses.dataclass(frozen=True)
class MjxSuite:
    """A DeepMind Control Suite task on MJX (see the module docstring).

    **Fields:** `task` (``"cartpole-swingup"``, a key of `MJX_TASKS`), `action_repeat` (control steps
    per env step, 2), `time_limit` (control steps per episode, the suite's 1000), `impl` (MJX's
    ``"jax"`` or ``"warp"`` implementation).
    """

    task: str
    action_repeat: int = 2
    time_limit: int = 1000
    impl: str = "jax"

    def __post_init__(self):
        if self.action_repeat < 1 or self.time_limit < 1:
            raise ValueError(f"action_repeat {self.action_repeat} and time_limit {self.time_limit} must be >= 1")
        playground_env(self.task, self.impl)  # checks the task and impl, and that Playground is installed

    @property
    def physics_env(self) -> Any:
        """Playground's env object (its `mj_model`, `mjx_model`, `dt`, ...)."""
        return playground_env(self.task, self.impl)

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return _observation_shape(self.task, self.impl)

    @property
    def action_size(self) -> int:
        """Continuous actions in [-1, 1] of this size (there is no `num_actions`)."""
        return int(self.physics_env.action_size)

    def default_params(self) -> tuple:
        return ()

    def reset(self, params: tuple, key: PRNGKeyArray) -> tuple[MjxState, TimeStep]:
        """A new episode from Playground's reset (its initial-state distribution, drawn from `key`)."""
        physics = self.physics_env.reset(key)
        return MjxState(physics, jnp.zeros((), jnp.int32)), restart(_finite(physics.obs))

    def step(self, params: tuple, state: MjxState, action: Float[Array, " a"],
             key: PRNGKeyArray) -> tuple[MjxState, TimeStep]:
        """`action_repeat` control steps with `action` (clipped to [-1, 1]); their rewards summed."""
        action = jnp.clip(jnp.asarray(action, jnp.float32), -1.0, 1.0)

        def control_step(physics, _):
            physics = self.physics_env.step(physics, action)
            return physics, (physics.reward, physics.done)

        physics, (rewards, diverged) = jax.lax.scan(control_step, state.physics, None, length=self.action_repeat)
        control_steps = state.control_steps + self.action_repeat
        terminated = jnp.any(diverged > 0)
        truncated = (control_steps >= self.time_limit) & ~terminated
        timestep = TimeStep(obs=_finite(physics.obs), reward=jnp.nan_to_num(jnp.sum(rewards)).astype(jnp.float32),
                            terminated=terminated, truncated=truncated, first=jnp.zeros((), bool))
        return MjxState(physics, control_steps), timestep


@functools.lru_cache(maxsize=None)
def _observation_shape(task: str, impl: str) -> tuple[int, ...]:
    """The shape of Playground's observation (traced once per task: it costs a reset's trace)."""
    physics_env = playground_env(task, impl)
    return tuple(jax.eval_shape(physics_env.reset, jax.random.PRNGKey(0)).obs.shape)


def _finite(obs: Float[Array, " o"]) -> Float[Array, " o"]:
    return jnp.nan_to_num(jnp.asarray(obs, jnp.float32), nan=0.0, posinf=0.0, neginf=0.0)


def make_mjx(task: str, **kwargs: Any) -> tuple[MjxSuite, tuple]:
    """``"mjx/walker-walk"`` or ``"walker-walk"`` -> `(MjxSuite, params)`; kwargs are its fields."""
    env = MjxSuite(task.removeprefix("mjx/"), **kwargs)
    return env, env.default_params()
