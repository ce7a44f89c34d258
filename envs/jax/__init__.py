"""JAX-native bsuite environments: pure functions that run under jit, vmap and `lax.scan`.

Three bsuite envs, whose observations, rewards and episode ends match bsuite's exactly (checked
step by step against bsuite in ``tests/test_envs_jax.py``):

* `MemoryChain` (bsuite ids ``memory_len/N``, ``memory_size/N``),
* `DiscountingChain` (``discounting_chain/N``),
* `Catch` (``catch/N``).

The API (gymnax-style: a static env object plus a PyTree of params)::

    import jax
    import envs.jax as jenvs

    env, params = jenvs.make("memory_len/3")        # or "bsuite/memory_len/3"
    env.observation_shape, env.num_actions          # (1, 3), 2: static Python values
    state, ts = env.reset(params, key)              # -> (env state PyTree, TimeStep)
    state, ts = env.step(params, state, action, key)
    ts.obs        # float32 [*observation_shape], bsuite's observation
    ts.reward     # float32 [], bsuite's reward (float64 there, rounded to float32 here)
    ts.terminated # bool [], the episode ended in a terminal state (bsuite: LAST with discount 0)
    ts.truncated  # bool [], the episode was cut off (never, for these envs)
    ts.first      # bool [], the first step of an episode

* `env` is a frozen dataclass (hashable: a valid static argument of `jax.jit`); its fields fix the
  shapes (e.g. `Catch(rows, columns)`, `MemoryChain(num_bits)`).
* `params` is a NamedTuple of arrays: the problem instance (memory length, bonus chain). It can be
  an argument of a jitted function and be vmapped over instances of the same shapes.
* `reset` and `step` are pure: all randomness comes from `key` (split it, never reuse it). Only
  the resets draw anything (memory context/query, catch ball column); `step` ignores its key.
* `step` after a terminal step is undefined; `AutoReset(env)` returns `reset`'s TimeStep on the
  step after an episode ends (gymnasium's NEXT_STEP autoreset, as bsuite itself does), so a
  `lax.scan` can run across episodes.
* Forced draws, to replay a given episode (the parity tests use them):
  ``MemoryChain.reset(params, key, context=..., query=...)`` and
  ``Catch.reset(params, key, ball_column=...)``. `DiscountingChain.reset` draws nothing.

A batch of rollouts across episodes in one compiled program::

    auto = jenvs.AutoReset(env)
    def rollout(key, actions):                         # actions: int32 [T]
        key, reset_key = jax.random.split(key)
        state, first = auto.reset(params, reset_key)
        def body(state, inputs):
            action, step_key = inputs
            return auto.step(params, state, action, step_key)
        keys = jax.random.split(key, actions.shape[0])
        return jax.lax.scan(body, state, (actions, keys))[1]  # TimeStep of [T, ...] arrays
    timesteps = jax.jit(jax.vmap(rollout))(keys, actions)    # [B, T, ...]

The DeepMind Control Suite on MJX (MuJoCo Playground's ports, the ``mjx`` extra) has the same API
with continuous actions: ``make("mjx/cartpole-swingup")`` (`envs.jax.mjx`), and with images:
``make("mjx-vision/cartpole-swingup")``. The Passive T-Maze, a memory task of set horizon, is
``make("tmaze/24")`` (`envs.jax.tmaze`).

This package imports nothing from ``worldmodels``.
"""

from __future__ import annotations

from typing import Any

from envs import bsuite_id_problem
from envs.jax.base import AutoReset, AutoResetState, JaxEnv, TimeStep
from envs.jax.catch import Catch, CatchParams, CatchState
from envs.jax.discounting_chain import DiscountingChain, DiscountingChainParams, DiscountingChainState
from envs.jax.memory_chain import MemoryChain, MemoryChainParams, MemoryChainState
from envs.jax.tmaze import PassiveTMaze, TMazeParams, TMazeState, make_tmaze

__all__ = [
    "AutoReset", "AutoResetState", "Catch", "CatchParams", "CatchState", "DiscountingChain",
    "DiscountingChainParams", "DiscountingChainState", "JaxEnv", "MemoryChain", "MemoryChainParams",
    "MemoryChainState", "PassiveTMaze", "TMazeParams", "TMazeState", "TimeStep", "experiments", "make", "make_tmaze",
]


def _memory_len(settings: dict[str, Any]) -> tuple[MemoryChain, MemoryChainParams]:
    env = MemoryChain(num_bits=1)  # as bsuite.experiments.memory_len.load
    return env, env.default_params(int(settings["memory_length"]))


def _memory_size(settings: dict[str, Any]) -> tuple[MemoryChain, MemoryChainParams]:
    env = MemoryChain(num_bits=int(settings["num_bits"]))  # memory_length 2, as bsuite's load
    return env, env.default_params(2)


def _discounting_chain(settings: dict[str, Any]) -> tuple[DiscountingChain, DiscountingChainParams]:
    env = DiscountingChain()
    return env, env.default_params(int(settings["mapping_seed"]))


def _catch(settings: dict[str, Any]) -> tuple[Catch, CatchParams]:
    # catch ids differ only in bsuite's (None) seed: here the randomness comes from the keys.
    env = Catch(rows=int(settings.get("rows", 10)), columns=int(settings.get("columns", 5)))
    return env, env.default_params()


_BUILDERS = {
    "memory_len": _memory_len,
    "memory_size": _memory_size,
    "discounting_chain": _discounting_chain,
    "catch": _catch,
}


def experiments() -> list[str]:
    """The bsuite experiments with a JAX-native env here."""
    return list(_BUILDERS)


def make(bsuite_id: str) -> tuple[JaxEnv, Any]:
    """Build the JAX env and params of a bsuite id or an MJX suite task.

    **Arguments:**
    - `bsuite_id`: a key of ``bsuite.sweep.SETTINGS`` of a supported experiment, e.g.
      ``"memory_len/3"``, optionally prefixed ``"bsuite/"`` (the `envs.make` name); or
      ``"mjx/<domain>-<task>"`` (`envs.jax.mjx`, e.g. ``"mjx/walker-walk"``: continuous actions,
      `action_size` instead of `num_actions`), or ``"mjx-vision/<domain>-<task>"`` (the same with
      uint8 64x64 images from MJX's batch renderer); or ``"tmaze/<L>"`` / ``"tmaze/<L1>-<L2>"``, the
      Passive T-Maze (`envs.jax.tmaze`: a corridor of L cells, or one drawn per episode).

    **Returns:** `(env, params)`; the params come from ``bsuite.sweep.SETTINGS[bsuite_id]`` (an MJX
    task has none: ``()``).

    **Raises:** `ValueError` for an unknown id or an experiment without a JAX env;
    `ModuleNotFoundError` naming the ``mjx`` extra for an MJX task without MuJoCo Playground.
    """
    if bsuite_id.startswith(("mjx/", "mjx-vision/")):
        from envs.jax.mjx import make_mjx

        return make_mjx(bsuite_id)
    if bsuite_id.startswith("tmaze/"):
        return make_tmaze(bsuite_id.removeprefix("tmaze/"))
    from bsuite import sweep  # only for the settings table; stepping needs no bsuite

    bsuite_id = bsuite_id.removeprefix("bsuite/")
    experiment = bsuite_id.split(sweep.SEPARATOR)[0]
    if experiment not in _BUILDERS:
        raise ValueError(f"No JAX-native env for bsuite id {bsuite_id!r}. Supported experiments: "
                         f"{experiments()}; use envs.make('bsuite/{bsuite_id}') for the host env.")
    problem = bsuite_id_problem(bsuite_id)
    if problem is not None:
        raise ValueError(problem)
    return _BUILDERS[experiment](dict(sweep.SETTINGS[bsuite_id]))
