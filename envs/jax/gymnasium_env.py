"""A functional JAX env (`envs.jax`) as a `gymnasium.Env`, so the host loop can run the same task
as the device loop (e.g. ``envs.make("mjx/cartpole-swingup")``)."""

from __future__ import annotations

from typing import Any

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np


class JaxEnvToGymnasium(gymnasium.Env):
    """One env of a functional JAX env, stepped by its jitted `reset` and `step`, returning numpy.

    **Arguments:** `env` (static env object: `observation_shape`, and `num_actions` for discrete
    actions or `action_size` for continuous ones in [-1, 1]), its `params`, and `seed` (the first
    reset's, when that reset is given none).

    Spaces: a float32 `Box` of `observation_shape`; `Discrete(num_actions)` or a float32
    `Box(-1, 1, (action_size,))`. Episodes end as the functional env says (`terminated`,
    `truncated`); reset after them, as with any gymnasium env. A seeded `reset` draws its PRNG key
    from the seed, so equal seeds give equal episodes. Pickles (the jitted functions are rebuilt), so
    the host loop's checkpoints can hold it.
    """

    metadata = {"render_modes": []}

    def __init__(self, env: Any, params: Any, seed: int | None = None):
        self.env, self.params = env, params
        self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, tuple(env.observation_shape), np.float32)
        if hasattr(env, "num_actions"):
            self.action_space = gymnasium.spaces.Discrete(int(env.num_actions))
        else:
            self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (int(env.action_size),), np.float32)
        self._pending_seed = seed
        self._key: jax.Array | None = None
        self._state: Any = None
        self._compile()

    def _compile(self) -> None:
        # the key is split inside the jitted call: one dispatch a step, not two
        def reset(params, key):
            key, sub = jax.random.split(key)
            return key, *self.env.reset(params, sub)

        def step(params, state, action, key):
            key, sub = jax.random.split(key)
            return key, *self.env.step(params, state, action, sub)

        self._reset_fn, self._step_fn = jax.jit(reset), jax.jit(step)
        self._action_dtype = jnp.int32 if isinstance(self.action_space, gymnasium.spaces.Discrete) else jnp.float32

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None:
            seed, self._pending_seed = self._pending_seed, None
        super().reset(seed=seed)
        if seed is not None or self._key is None:
            self._key = jax.random.PRNGKey(int(self.np_random.integers(2**31)))
        self._key, self._state, timestep = self._reset_fn(self.params, self._key)
        return np.asarray(timestep.obs, np.float32), {}

    def step(self, action: Any):
        if self._state is None:
            raise RuntimeError("step before reset: call reset() first")
        self._key, self._state, timestep = self._step_fn(self.params, self._state,
                                                         jnp.asarray(action, self._action_dtype), self._key)
        return (np.asarray(timestep.obs, np.float32), float(timestep.reward), bool(timestep.terminated),
                bool(timestep.truncated), {})

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_reset_fn", "_step_fn", "_action_dtype")}
        return jax.device_get(state)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._compile()
