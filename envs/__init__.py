"""Environments behind one name scheme, all returned as `gymnasium.Env`.

Names are ``<family><sep><id>``:

* ``gym:<gymnasium id>``, e.g. ``gym:CartPole-v1`` -> ``gymnasium.make(id, **kwargs)``.
* ``bsuite/<bsuite id>``, e.g. ``bsuite/catch/0`` -> the bsuite dm_env behind
  `DmEnvToGymnasium`.

New families register a builder in ``_REGISTRY``; `make` and `families` pick
them up. This package imports nothing from ``worldmodels``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import gymnasium

from envs.dm_env_adapter import DmEnvToGymnasium, spec_to_space

__all__ = ["DmEnvToGymnasium", "families", "make", "spec_to_space"]

# builder(id_within_family, seed, **kwargs) -> gymnasium.Env
Builder = Callable[..., gymnasium.Env]


class _SeedFirstReset(gymnasium.Wrapper):
    """Use `seed` on the first reset that is not given one.

    Gymnasium envs are seeded through reset, so this is how ``make(..., seed=)``
    seeds them without resetting inside `make`.
    """

    def __init__(self, env: gymnasium.Env, seed: int) -> None:
        super().__init__(env)
        self._pending_seed: int | None = seed

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is None:
            seed = self._pending_seed
        self._pending_seed = None
        return self.env.reset(seed=seed, options=options)


def _make_gym(env_id: str, seed: int | None, **kwargs: Any) -> gymnasium.Env:
    """``gym:<id>``: `gymnasium.make` pass-through; kwargs go to it."""
    try:
        env = gymnasium.make(env_id, **kwargs)
    except gymnasium.error.UnregisteredEnv as err:
        # Same error type as the other families so callers need one except.
        raise ValueError(
            f"Unknown gymnasium id {env_id!r}: {err} Valid families: {families()}."
        ) from err
    if seed is not None:
        env = _SeedFirstReset(env, seed)
    return env


def _bsuite_factory(bsuite_id: str) -> Callable[[int | None], Any]:
    """seed -> bsuite dm_env for `bsuite_id`.

    bsuite ids fix the problem instance (``mapping_seed``, sizes, ...). Their
    ``seed`` setting, which drives per-episode randomness, is None or absent, so
    a given seed overrides it; seed None keeps bsuite's own default.
    """
    from bsuite import sweep
    from bsuite.bsuite import EXPERIMENT_NAME_TO_ENVIRONMENT, load

    experiment, _ = bsuite_id.split(sweep.SEPARATOR)
    settings = dict(sweep.SETTINGS[bsuite_id])
    loader = EXPERIMENT_NAME_TO_ENVIRONMENT[experiment]
    takes_seed = "seed" in inspect.signature(loader).parameters

    def factory(seed: int | None) -> Any:
        kwargs = dict(settings)
        if seed is not None and takes_seed and kwargs.get("seed") is None:
            kwargs["seed"] = seed
        # bsuite.load rather than load_from_id: same env, without its banner print.
        return load(experiment, kwargs)

    return factory


def _make_bsuite(
    bsuite_id: str, seed: int | None, results_dir: str | None = None
) -> gymnasium.Env:
    """``bsuite/<id>``, e.g. ``bsuite/catch/0``.

    Args:
      bsuite_id: a key of ``bsuite.sweep.SWEEP``.
      seed: per-episode randomness seed (see `_bsuite_factory`).
      results_dir: if set, record episodes to bsuite CSV files there
        (``overwrite=True``). The recording env is built once: a seeded reset
        cannot rebuild it without restarting its log, so pass the seed to
        `make` instead.
    """
    from bsuite import sweep

    if bsuite_id not in sweep.SETTINGS:
        raise ValueError(
            f"Unknown bsuite id {bsuite_id!r}. Valid ids are the keys of "
            f"bsuite.sweep.SWEEP (e.g. 'catch/0', 'memory_len/3'); "
            f"valid families: {families()}."
        )
    factory = _bsuite_factory(bsuite_id)
    if results_dir is None:
        env = DmEnvToGymnasium(factory=factory, seed=seed)
    else:
        from bsuite.logging import csv_logging

        recorded = csv_logging.wrap_environment(
            env=factory(seed),
            bsuite_id=bsuite_id,
            results_dir=results_dir,
            overwrite=True,
        )
        env = DmEnvToGymnasium(recorded, seed=seed)
    if seed is not None:
        env.action_space.seed(seed)
        env.observation_space.seed(seed)
    return env


# prefix (including its separator) -> builder. Later families add entries here.
_REGISTRY: dict[str, Builder] = {
    "gym:": _make_gym,
    "bsuite/": _make_bsuite,
}


def families() -> list[str]:
    """The known name prefixes, e.g. ``['gym:', 'bsuite/']``."""
    return list(_REGISTRY)


def make(name: str, seed: int | None = None, **kwargs: Any) -> gymnasium.Env:
    """Build an environment from its name.

    Args:
      name: ``<prefix><id>`` with a prefix from `families()`, e.g.
        ``gym:CartPole-v1`` or ``bsuite/memory_len/3``.
      seed: seeds the env's randomness (bsuite: at build time and via
        ``reset(seed=)``; gym: applied at the first ``reset()``). None leaves
        each family's default.
      **kwargs: family-specific: forwarded to ``gymnasium.make`` for ``gym:``;
        ``results_dir`` for ``bsuite/``.

    Returns:
      A `gymnasium.Env`.

    Raises:
      ValueError: unknown family or unknown id within a family.
    """
    for prefix, builder in _REGISTRY.items():
        if name.startswith(prefix):
            env_id = name[len(prefix):]
            if not env_id:
                raise ValueError(f"Environment name {name!r} has no id after {prefix!r}.")
            return builder(env_id, seed, **kwargs)
    raise ValueError(
        f"Unknown environment family in {name!r}. Valid families: {families()} "
        f"(e.g. 'gym:CartPole-v1', 'bsuite/catch/0')."
    )
