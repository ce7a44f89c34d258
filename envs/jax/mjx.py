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

Images (``vision=True``, the ``mjx-vision/`` names, as the host ``dmc-vision/`` envs): the observation
is uint8 ``[image_size, image_size, 3]`` drawn from camera 0 by MJX's batch renderer
(``mujoco.mjx.render``, ray traced by MuJoCo Warp) after the env step's last control step. The
renderer needs MuJoCo Warp physics data, so vision runs ``impl="warp"``; it draws without textures or
shadows (Playground's settings), so the frames are plainer than dm_control's OpenGL ones. Under
``jax.vmap`` over N envs all N are drawn in one batched call, with a render context made for N worlds
(one per batch size, kept for the process).

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

__all__ = ["MJX_TASKS", "MjxState", "MjxSuite", "make_mjx", "playground_env", "render_camera"]

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
        env = suite.load(MJX_TASKS[task], config_overrides={"impl": impl})
    if impl == "warp":
        # The suite's models cap the solver's iterations on purpose (cartpole at 1), and MuJoCo Warp
        # prints a warning from its kernels to stdout each time one is hit: every step, in every world.
        env._mjx_model = env.mjx_model.tree_replace({"opt._impl.warn_overflow": 0})
    return env


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
    ``"jax"`` or ``"warp"`` implementation), `vision` (images instead of the proprio vector; needs
    ``impl="warp"``), `image_size` (their height and width, 64).
    """

    task: str
    action_repeat: int = 2
    time_limit: int = 1000
    impl: str = "jax"
    vision: bool = False
    image_size: int = 64

    def __post_init__(self):
        if self.action_repeat < 1 or self.time_limit < 1:
            raise ValueError(f"action_repeat {self.action_repeat} and time_limit {self.time_limit} must be >= 1")
        if self.vision and self.impl != "warp":
            raise ValueError(f"vision needs impl='warp' (got {self.impl!r}): MJX's renderer draws MuJoCo Warp "
                             "physics data; the mjx-vision/ names set it")
        if self.vision and self.image_size < 1:
            raise ValueError(f"image_size {self.image_size} must be >= 1")
        playground_env(self.task, self.impl)  # checks the task and impl, and that Playground is installed

    @property
    def physics_env(self) -> Any:
        """Playground's env object (its `mj_model`, `mjx_model`, `dt`, ...)."""
        return playground_env(self.task, self.impl)

    @property
    def observation_shape(self) -> tuple[int, ...]:
        if self.vision:
            return (self.image_size, self.image_size, 3)
        return _observation_shape(self.task, self.impl)

    @property
    def observation_dtype(self) -> Any:
        return jnp.uint8 if self.vision else jnp.float32

    @property
    def partitionable(self) -> bool:
        """Whether XLA can split a batch of these envs over devices (GSPMD). MuJoCo Warp's physics and
        renderer are FFI calls with side effects, which XLA's partitioner refuses."""
        return self.impl == "jax"

    @property
    def action_size(self) -> int:
        """Continuous actions in [-1, 1] of this size (there is no `num_actions`)."""
        return int(self.physics_env.action_size)

    def default_params(self) -> tuple:
        return ()

    def reset(self, params: tuple, key: PRNGKeyArray) -> tuple[MjxState, TimeStep]:
        """A new episode from Playground's reset (its initial-state distribution, drawn from `key`)."""
        physics = self.physics_env.reset(key)
        return MjxState(physics, jnp.zeros((), jnp.int32)), restart(self._observe(physics))

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
        timestep = TimeStep(obs=self._observe(physics), reward=jnp.nan_to_num(jnp.sum(rewards)).astype(jnp.float32),
                            terminated=terminated, truncated=truncated, first=jnp.zeros((), bool))
        return MjxState(physics, control_steps), timestep

    def _observe(self, physics: Any) -> Array:
        """Playground's proprio vector (NaNs zeroed), or camera 0's image of the physics data."""
        if self.vision:
            return render_camera(self.task, self.image_size)(physics.data)
        return _finite(physics.obs)


@functools.lru_cache(maxsize=None)
def _render_context(task: str, image_size: int, nworld: int) -> Any:
    """MJX's render context for `nworld` worlds of a task (camera 0 only, RGB, no textures or shadows).
    Kept for the process: the traced programs refer to it by key, and dropping it frees its buffers."""
    from mujoco import mjx

    model = playground_env(task, "warp").mj_model
    return mjx.create_render_context(
        mjm=model, nworld=nworld, cam_res=(image_size, image_size), use_textures=False, use_shadows=False,
        render_rgb=(True,), render_depth=(False,), enabled_geom_groups=[0, 1, 2],
        cam_active=(True,) + (False,) * (model.ncam - 1))


@functools.lru_cache(maxsize=None)
def render_camera(task: str, image_size: int = 64) -> Any:
    """``draw(data) -> uint8 [image_size, image_size, 3]``: camera 0's RGB image of one MuJoCo Warp
    physics data of `task`. Under ``jax.vmap`` (N worlds) it draws all N in one batched call of MJX's
    renderer, with a render context for N worlds."""
    from mujoco import mjx

    model = playground_env(task, "warp").mjx_model

    def draw(data: Any, nworld: int) -> Array:
        context = _render_context(task, image_size, nworld).pytree()
        out = mjx.render(model, mjx.refit_bvh(model, data, context), context)
        return mjx.get_rgb(context, 0, out[0])

    def to_uint8(rgb: Array) -> Array:
        return jnp.round(jnp.clip(jnp.nan_to_num(rgb), 0.0, 1.0) * 255).astype(jnp.uint8)

    @jax.custom_batching.custom_vmap
    def render(data: Any) -> Array:
        return to_uint8(draw(data, 1)).reshape(image_size, image_size, 3)

    @render.def_vmap
    def render_worlds(nworld: int, batched: list[Any], data: Any) -> tuple[Array, bool]:
        # MJX's own batching rule draws the N worlds in one call; the data's leaves that are not per
        # world (e.g. the contact layout) stay unbatched
        leaves, treedef = jax.tree.flatten(data)
        axes = [0 if b else None for b in jax.tree.leaves(batched[0])]
        rgb = jax.vmap(lambda leaves: draw(jax.tree.unflatten(treedef, leaves), nworld), in_axes=(axes,))(leaves)
        return to_uint8(rgb), True

    return render


@functools.lru_cache(maxsize=None)
def _observation_shape(task: str, impl: str) -> tuple[int, ...]:
    """The shape of Playground's observation (traced once per task: it costs a reset's trace)."""
    physics_env = playground_env(task, impl)
    return tuple(jax.eval_shape(physics_env.reset, jax.random.PRNGKey(0)).obs.shape)


def _finite(obs: Float[Array, " o"]) -> Float[Array, " o"]:
    return jnp.nan_to_num(jnp.asarray(obs, jnp.float32), nan=0.0, posinf=0.0, neginf=0.0)


def make_mjx(task: str, **kwargs: Any) -> tuple[MjxSuite, tuple]:
    """``"mjx/walker-walk"`` or ``"walker-walk"`` -> `(MjxSuite, params)`; ``"mjx-vision/walker-walk"``
    -> the same task with images (``vision=True, impl="warp"``). kwargs are `MjxSuite`'s fields."""
    if task.startswith("mjx-vision/"):
        kwargs = {"vision": True, "impl": "warp", **kwargs}
    env = MjxSuite(task.removeprefix("mjx-vision/").removeprefix("mjx/"), **kwargs)
    return env, env.default_params()
