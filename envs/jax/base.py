"""What every JAX-native env shares: the `TimeStep` it returns, the `JaxEnv` protocol, `AutoReset`."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

# One action: an integer scalar in [0, num_actions). Out-of-range actions are clamped by JAX's
# indexing instead of raising as bsuite does; callers keep them in range.
Action = Int[Array, ""] | int


class TimeStep(NamedTuple):
    """What `reset` and `step` return (a PyTree; batched under vmap, stacked under scan).

    **Fields:**
    - `obs`: float32 observation of shape `env.observation_shape` (bsuite's shape and values).
    - `reward`: float32 scalar; bsuite's float64 reward rounded to float32 (0 on `reset`).
    - `terminated`: bool scalar; the episode ended in a terminal state (bsuite's LAST step with
      discount 0: the value of `obs` is 0, do not bootstrap).
    - `truncated`: bool scalar; the episode was cut off (bootstrap from `obs`). Always False for the
      bsuite envs here: they all end by termination.
    - `first`: bool scalar; `obs` starts an episode (True from `reset`, and from `AutoReset.step`
      when it reset).
    """

    obs: Float[Array, "*obs_shape"]
    reward: Float[Array, ""]
    terminated: Bool[Array, ""]
    truncated: Bool[Array, ""]
    first: Bool[Array, ""]


def restart(obs: Float[Array, "*obs_shape"]) -> TimeStep:
    """The first `TimeStep` of an episode: zero reward, not ended, `first` True."""
    return TimeStep(obs=obs, reward=jnp.zeros((), jnp.float32), terminated=jnp.zeros((), bool),
                    truncated=jnp.zeros((), bool), first=jnp.ones((), bool))


def transition(obs: Float[Array, "*obs_shape"], reward: Float[Array, ""],
               terminated: Bool[Array, ""]) -> TimeStep:
    """A step inside an episode or its terminal step (never truncated for the bsuite envs)."""
    return TimeStep(obs=obs, reward=jnp.asarray(reward, jnp.float32), terminated=jnp.asarray(terminated, bool),
                    truncated=jnp.zeros((), bool), first=jnp.zeros((), bool))


class JaxEnv(Protocol):
    """The functional env interface: a static, hashable object plus a PyTree of params.

    `env` holds what fixes shapes (so it can be a static argument under jit); `params` holds the
    problem instance as arrays (so it can be traced, or vmapped over instances of equal shapes).
    """

    observation_shape: tuple[int, ...]
    num_actions: int

    def default_params(self) -> Any: ...

    def reset(self, params: Any, key: PRNGKeyArray) -> tuple[Any, TimeStep]: ...

    def step(self, params: Any, state: Any, action: Action, key: PRNGKeyArray) -> tuple[Any, TimeStep]: ...


class AutoResetState(NamedTuple):
    """`AutoReset`'s state: the wrapped env's state and whether its episode has ended."""

    env_state: Any
    done: Bool[Array, ""]


@dataclasses.dataclass(frozen=True)
class AutoReset:
    """Reset on the step after an episode ends, as bsuite and gymnasium's NEXT_STEP autoreset do.

    `step` after a terminated or truncated `TimeStep` ignores the action and returns the wrapped
    env's `reset(params, key)` (with `first` True), so the last observation of every episode is
    returned as its own step, which a world model needs, and a `lax.scan` over steps never has to
    branch in Python. Both branches are computed and selected with `jnp.where`, which keeps the step
    cheap under vmap for these small envs. (Not for MuJoCo Warp physics, ``mjx-vision/`` or
    ``impl="warp"``: under vmap the per-leaf select leaks a tracer out of Warp's FFI calls; the device
    loop's `worldmodels.device_loop.step_envs` resets a batch of those.)
    """

    env: JaxEnv

    @property
    def observation_shape(self) -> tuple[int, ...]:
        return self.env.observation_shape

    @property
    def num_actions(self) -> int:
        return self.env.num_actions

    def default_params(self) -> Any:
        return self.env.default_params()

    def reset(self, params: Any, key: PRNGKeyArray, **options: Any) -> tuple[AutoResetState, TimeStep]:
        """The wrapped env's reset (`options` go to it, e.g. forced random draws)."""
        state, timestep = self.env.reset(params, key, **options)
        return AutoResetState(state, jnp.zeros((), bool)), timestep

    def step(self, params: Any, state: AutoResetState, action: Action,
             key: PRNGKeyArray) -> tuple[AutoResetState, TimeStep]:
        """One step, or a reset if the previous step ended the episode (`key` feeds either)."""
        step_key, reset_key = jax.random.split(key)
        stepped = self.env.step(params, state.env_state, action, step_key)
        fresh = self.env.reset(params, reset_key)
        env_state, timestep = jax.tree.map(lambda r, s: jnp.where(state.done, r, s), fresh, stepped)
        return AutoResetState(env_state, timestep.terminated | timestep.truncated), timestep
