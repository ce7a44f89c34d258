"""Expose any `dm_env.Environment` through the gymnasium API.

dm_env and gymnasium differ in three ways this adapter bridges:

* Spaces come from specs (`spec_to_space`).
* dm_env signals the end of an episode with a LAST timestep plus a discount;
  gymnasium uses two flags. discount == 0 means a true terminal state
  (``terminated=True``); discount > 0 means the episode was cut off but the
  value of the final state still counts (``truncated=True``), so agents
  bootstrap from it.
* dm_env has no ``reset(seed=...)``. If the adapter is given a ``factory`` it
  rebuilds the wrapped env with the new seed on every seeded reset; otherwise a
  seed can only be fixed when the wrapped env is built.
"""

from __future__ import annotations

import collections
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import dm_env
import gymnasium
import numpy as np
from dm_env import specs
from gymnasium import spaces
from gymnasium.utils import seeding

__all__ = ["DmEnvToGymnasium", "spec_to_space"]

EnvFactory = Callable[[int | None], dm_env.Environment]


def _unbounded_box(spec: specs.Array) -> spaces.Space:
    """Box covering the whole range of the spec's dtype."""
    dtype = np.dtype(spec.dtype)
    shape = tuple(spec.shape)
    if dtype == np.bool_:
        return spaces.Box(False, True, shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return spaces.Box(info.min, info.max, shape, dtype=dtype)
    if np.issubdtype(dtype, np.floating):
        return spaces.Box(-np.inf, np.inf, shape, dtype=dtype)
    raise NotImplementedError(f"No gymnasium space for spec {spec!r} (dtype {dtype}).")


def spec_to_space(spec: Any) -> spaces.Space:
    """Convert a dm_env spec (or a nest of specs) into a gymnasium space.

    Args:
      spec: `specs.DiscreteArray` -> `Discrete(num_values)` (same dtype);
        `specs.BoundedArray` -> `Box(minimum, maximum, shape, dtype)`;
        plain `specs.Array` -> `Box` over the dtype's full range
        (``-inf..inf`` for floats); a mapping -> `spaces.Dict` (keys keep
        their order); a tuple/list -> `spaces.Tuple`.

    Returns:
      The matching gymnasium space.

    Raises:
      NotImplementedError: for specs without a gymnasium counterpart
        (e.g. string arrays).
    """
    # DiscreteArray subclasses BoundedArray, so it must be checked first.
    if isinstance(spec, specs.DiscreteArray):
        return spaces.Discrete(
            int(spec.num_values), start=int(spec.minimum), dtype=np.dtype(spec.dtype).type
        )
    if isinstance(spec, specs.BoundedArray):
        dtype = np.dtype(spec.dtype)
        shape = tuple(spec.shape)
        # Box wants bounds already shaped and typed like the space.
        low = np.broadcast_to(np.asarray(spec.minimum), shape).astype(dtype)
        high = np.broadcast_to(np.asarray(spec.maximum), shape).astype(dtype)
        return spaces.Box(low, high, shape, dtype=dtype)
    if isinstance(spec, specs.StringArray):
        raise NotImplementedError(f"No gymnasium space for string spec {spec!r}.")
    if isinstance(spec, specs.Array):
        return _unbounded_box(spec)
    if isinstance(spec, Mapping):
        # OrderedDict: spaces.Dict would sort a plain dict's keys; keep the spec's order.
        return spaces.Dict(
            collections.OrderedDict((key, spec_to_space(value)) for key, value in spec.items())
        )
    if isinstance(spec, (tuple, list)):
        return spaces.Tuple(tuple(spec_to_space(value) for value in spec))
    raise NotImplementedError(f"Unsupported spec type {type(spec).__name__}: {spec!r}.")


def _convert_value(value: Any, spec: Any) -> Any:
    """Cast `value` (nested like `spec`) to the spec's dtypes.

    dm_env envs are allowed to return Python scalars or lists; casting keeps the
    values inside the gymnasium space built from the same spec.
    """
    if isinstance(spec, Mapping):
        return {key: _convert_value(value[key], sub) for key, sub in spec.items()}
    if isinstance(spec, (tuple, list)):
        return tuple(_convert_value(v, sub) for v, sub in zip(value, spec))
    return np.asarray(value, dtype=spec.dtype)


def _convert_action(action: Any, spec: Any) -> Any:
    """Gymnasium action -> the form the dm_env expects (ints for discrete)."""
    if isinstance(spec, specs.DiscreteArray):
        return int(action)
    if isinstance(spec, Mapping):
        return {key: _convert_action(action[key], sub) for key, sub in spec.items()}
    if isinstance(spec, (tuple, list)):
        return type(spec)(_convert_action(a, sub) for a, sub in zip(action, spec))
    return np.asarray(action, dtype=spec.dtype)


class DmEnvToGymnasium(gymnasium.Env):
    """Gymnasium view of a `dm_env.Environment`.

    Build it either from an env (``DmEnvToGymnasium(env)``) or from a factory
    (``DmEnvToGymnasium(factory=f, seed=s)``, which calls ``f(s)``). Only with a
    factory does ``reset(seed=...)`` make the env's own randomness
    reproducible: it closes the current env and builds ``factory(seed)``.
    Without one, a seed passed to ``reset`` only seeds ``self.np_random``
    (a warning says so once).

    Observations are cast to the observation spec's dtype (a dict spec gives a
    dict observation). Rewards are Python floats, with the first timestep's
    ``None`` read as 0.0. ``info['discount']`` holds the dm_env discount of
    each step.
    """

    metadata = {"render_modes": []}

    def __init__(
        self,
        env: dm_env.Environment | None = None,
        *,
        factory: EnvFactory | None = None,
        seed: int | None = None,
    ) -> None:
        """Args:
          env: the dm_env to wrap. If None, ``factory(seed)`` builds it.
          factory: ``seed -> dm_env.Environment``; used to rebuild the env on
            ``reset(seed=...)``.
          seed: seed for the first build by ``factory`` and for ``np_random``.
        """
        if env is None:
            if factory is None:
                raise ValueError("DmEnvToGymnasium needs an env or a factory.")
            env = factory(seed)
        self._env = env
        self._factory = factory
        self._warned_unseedable = False
        if seed is not None:
            self._np_random, self._np_random_seed = seeding.np_random(seed)

        self._obs_spec = env.observation_spec()
        self._action_spec = env.action_spec()
        self.observation_space = spec_to_space(self._obs_spec)
        self.action_space = spec_to_space(self._action_spec)

    @property
    def dm_env(self) -> dm_env.Environment:
        """The wrapped dm_env (it changes after a seeded reset with a factory)."""
        return self._env

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Start an episode.

        Args:
          seed: if given and a factory exists, the env is rebuilt as
            ``factory(seed)``; always seeds ``self.np_random``.
          options: unused; accepted for API compatibility.

        Returns:
          (observation, info) with an empty info dict.
        """
        super().reset(seed=seed)
        if seed is not None:
            if self._factory is not None:
                self._env.close()
                self._env = self._factory(seed)
            elif not self._warned_unseedable:
                self._warned_unseedable = True
                warnings.warn(
                    "DmEnvToGymnasium has no factory, so reset(seed=...) cannot "
                    "reseed the wrapped dm_env; only np_random is seeded.",
                    stacklevel=2,
                )
        timestep = self._env.reset()
        return _convert_value(timestep.observation, self._obs_spec), {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Take one step.

        Args:
          action: an element of ``action_space``.

        Returns:
          (observation, reward, terminated, truncated, info). A LAST timestep
          with discount 0 is ``terminated``; with discount > 0 it is
          ``truncated`` (bootstrap from it). ``info['discount']`` is the
          dm_env discount (1.0 where the env gives None).
        """
        timestep = self._env.step(_convert_action(action, self._action_spec))
        reward = 0.0 if timestep.reward is None else float(timestep.reward)
        discount = 1.0 if timestep.discount is None else float(timestep.discount)
        terminated = truncated = False
        if timestep.last():
            terminated = discount == 0.0
            truncated = not terminated
        obs = _convert_value(timestep.observation, self._obs_spec)
        return obs, reward, terminated, truncated, {"discount": discount}

    def close(self) -> None:
        """Close the wrapped dm_env."""
        self._env.close()
        super().close()
