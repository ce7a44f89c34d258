"""A functional JAX env (`envs.jax`) as a `gymnasium.Env`, so the host loop can run the same task
as the device loop (e.g. ``envs.make("mjx/cartpole-swingup")``)."""

from __future__ import annotations

import functools
from typing import Any

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np


class JaxEnvToGymnasium(gymnasium.Env):
    """One env of a functional JAX env, stepped by its jitted `reset` and `step`, returning numpy.

    **Arguments:** `env` (a hashable env object, e.g. a frozen dataclass: `observation_shape`, and
    `num_actions` for discrete actions or `action_size` for continuous ones in [-1, 1]), its
    `params`, and `seed` (the first reset's, when that reset is given none).

    Spaces: a float32 `Box` of `observation_shape` (a uint8 `Box(0, 255)` when the env's
    `observation_dtype`, if it has one, is uint8: images, e.g. ``mjx-vision/``); `Discrete(num_actions)` or a float32
    `Box(-1, 1, (action_size,))`. Episodes end as the functional env says (`terminated`,
    `truncated`); reset after them, as with any gymnasium env. A seeded `reset` draws its PRNG key
    from the seed, so equal seeds give equal episodes. Every instance of an equal env shares one
    compiled `reset` and `step`. Pickles, so the host loop's checkpoints can hold it.
    """

    metadata = {"render_modes": []}

    def __init__(self, env: Any, params: Any, seed: int | None = None):
        self.env, self.params = env, params
        shape = tuple(env.observation_shape)
        if np.dtype(getattr(env, "observation_dtype", np.float32)) == np.uint8:
            self.observation_space = gymnasium.spaces.Box(0, 255, shape, np.uint8)
        else:
            self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, shape, np.float32)
        if hasattr(env, "num_actions"):
            self.action_space = gymnasium.spaces.Discrete(int(env.num_actions))
        else:
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (int(env.action_size),), np.float32)
        self._pending_seed = seed
        self._key: jax.Array | None = None
        self._state: Any = None
        self._action_dtype = jnp.int32 if isinstance(self.action_space, gymnasium.spaces.Discrete) else jnp.float32

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None:
            seed, self._pending_seed = self._pending_seed, None
        super().reset(seed=seed)
        if seed is not None or self._key is None:
            self._key = jax.random.PRNGKey(int(self.np_random.integers(2**31)))
        self._key, self._state, timestep = _reset(self.env, self.params, self._key)
        return np.asarray(timestep.obs, self.observation_space.dtype), {}

    def step(self, action: Any):
        if self._state is None:
            raise RuntimeError("step before reset: call reset() first")
        self._key, self._state, timestep = _step(self.env, self.params, self._state,
                                                     jnp.asarray(action, self._action_dtype), self._key)
        return (np.asarray(timestep.obs, self.observation_space.dtype), float(timestep.reward), bool(timestep.terminated),
                bool(timestep.truncated), {})

    def __getstate__(self) -> dict[str, Any]:
        return jax.device_get(self.__dict__)


# The env is a static argument, so every wrapper of an equal env shares one compile of each. The key
# is split inside the jitted call: one dispatch a step, not two.
@functools.partial(jax.jit, static_argnums=0)
def _reset(env: Any, params: Any, key: jax.Array) -> tuple[jax.Array, Any, Any]:
    key, sub = jax.random.split(key)
    return key, *env.reset(params, sub)


@functools.partial(jax.jit, static_argnums=0)
def _step(env: Any, params: Any, state: Any, action: jax.Array, key: jax.Array) -> tuple[jax.Array, Any, Any]:
    key, sub = jax.random.split(key)
    return key, *env.step(params, state, action, sub)
