"""Environments behind one name scheme, all returned as `gymnasium.Env`.

Names are ``<family><sep><id>``:

* ``gym:<gymnasium id>``, e.g. ``gym:CartPole-v1`` -> ``gymnasium.make(id, **kwargs)``.
* ``bsuite/<bsuite id>``, e.g. ``bsuite/catch/0`` -> the bsuite dm_env behind
  `DmEnvToGymnasium`.
* ``dmc/<domain>-<task>`` (proprio vectors) and ``dmc-vision/<domain>-<task>``
  (64x64 images), e.g. ``dmc/walker-walk``: DeepMind Control, action repeat 2
  (`envs.dmc`).
* ``memory_maze/<9x9|11x11|13x13|15x15>``: Memory Maze through its dm_env API
  (`envs.memory_maze_env`).
* ``popgym/<Env>``, e.g. ``popgym/RepeatPreviousEasy`` -> ``popgym-<Env>-v0``
  (`envs.popgym_env`).
* ``mjx/<domain>-<task>``, e.g. ``mjx/cartpole-swingup``: the DMC task on MJX (MuJoCo
  Playground's port, `envs.jax.mjx`), the functional env behind `JaxEnvToGymnasium`: the same
  task the device loop runs (``--device-loop``), here for the host loop.

The same envs are registered with gymnasium under the ``worldmodels``
namespace, with ``/`` in a name written as ``-``:
``gymnasium.make("worldmodels/dmc-walker-walk")``,
``gymnasium.make("worldmodels/dmc-vision-walker-walk")``,
``gymnasium.make("worldmodels/memory_maze-9x9")``,
``gymnasium.make("worldmodels/popgym-RepeatPreviousEasy")``; any name, e.g. a
bsuite one, through ``gymnasium.make("worldmodels/make", name="bsuite/catch/0")``.
Keyword arguments (``seed=`` included) go to `make`.

New families register a builder in ``_REGISTRY``; `make` and `families` pick
them up. This package imports nothing from ``worldmodels``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import gymnasium

from envs.dm_env_adapter import DmEnvToGymnasium, spec_to_space

__all__ = ["DmEnvToGymnasium", "bsuite_id_problem", "bsuite_ids", "check_name", "families", "make",
           "spec_to_space"]

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


def _load_bsuite(experiment: str, settings: dict[str, Any], takes_seed: bool, seed: int | None) -> Any:
    kwargs = dict(settings)
    if seed is not None and takes_seed and kwargs.get("seed") is None:
        kwargs["seed"] = seed
    from bsuite.bsuite import load

    # bsuite.load rather than load_from_id: same env, without its banner print.
    return load(experiment, kwargs)


def _bsuite_factory(bsuite_id: str) -> Callable[[int | None], Any]:
    """seed -> bsuite dm_env for `bsuite_id`.

    bsuite ids fix the problem instance (``mapping_seed``, sizes, ...). Their
    ``seed`` setting, which drives per-episode randomness, is None or absent, so
    a given seed overrides it; seed None keeps bsuite's own default. A partial of
    a module-level function, not a closure, so the env pickles (exact resume).
    """
    from bsuite import sweep
    from bsuite.bsuite import EXPERIMENT_NAME_TO_ENVIRONMENT

    experiment, _ = bsuite_id.split(sweep.SEPARATOR)
    loader = EXPERIMENT_NAME_TO_ENVIRONMENT[experiment]
    takes_seed = "seed" in inspect.signature(loader).parameters
    return functools.partial(_load_bsuite, experiment, dict(sweep.SETTINGS[bsuite_id]), takes_seed)


def _format_setting(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _bsuite_sweep(experiment: str) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(the experiment's (id, settings) in bsuite's order, the setting keys that vary across them)."""
    from bsuite import sweep

    settings = [(k, v) for k, v in sweep.SETTINGS.items() if k.split(sweep.SEPARATOR)[0] == experiment]
    varying = [key for key in (settings[0][1] if settings else {})
               if len({repr(s.get(key)) for _, s in settings}) > 1]
    return settings, varying


def bsuite_ids(experiment: str) -> str:
    """What the ids of a bsuite experiment mean, read from bsuite's own sweep, in one line: e.g.
    ``"memory_len ids 0-22 are memory_length (id: value) 0: 1, 1: 2, ..., 22: 100"``.

    Raises:
      KeyError: `experiment` is not a bsuite experiment.
    """
    settings, varying = _bsuite_sweep(experiment)
    if not settings:
        raise KeyError(experiment)
    number = lambda bsuite_id: bsuite_id.rsplit("/", 1)[1]
    ids = f"{experiment} ids {number(settings[0][0])}-{number(settings[-1][0])}"
    if not varying:
        return f"{ids} share one setting {settings[0][1]} (bsuite runs them as repeats)"
    if len(varying) == 1:
        listed = ", ".join(f"{number(k)}: {_format_setting(s[varying[0]])}" for k, s in settings)
        return f"{ids} are {varying[0]} (id: value) {listed}"
    listed = ", ".join(f"{number(k)}: " + " ".join(f"{key}={_format_setting(s[key])}" for key in varying)
                       for k, s in settings)
    return f"{ids} are settings {listed}"


def bsuite_id_problem(bsuite_id: str) -> str | None:
    """None for a valid bsuite id (a key of ``bsuite.sweep.SETTINGS``, e.g. ``memory_len/15``), else
    one line that says what is wrong and names the valid ids, read from bsuite's sweep: an unknown
    experiment lists the experiments; an unknown number lists what each id of the experiment means
    and, where the number is one of the experiment's settings (``memory_len/30``: memory length 30),
    the id that has it (``bsuite/memory_len/15``)."""
    from bsuite import sweep

    if bsuite_id in sweep.SETTINGS:
        return None
    experiment, _, number = bsuite_id.partition(sweep.SEPARATOR)
    settings, varying = _bsuite_sweep(experiment)
    if not settings:
        experiments = sorted({k.split(sweep.SEPARATOR)[0] for k in sweep.SETTINGS})
        return (f"unknown bsuite experiment {experiment!r} in 'bsuite/{bsuite_id}': bsuite ids are "
                f"<experiment>/<number> with experiments {', '.join(experiments)} (e.g. 'bsuite/catch/0')")
    message = f"unknown bsuite id 'bsuite/{bsuite_id}': {bsuite_ids(experiment)}"
    try:
        wanted = float(number)
    except ValueError:
        wanted = None
    if wanted is not None and len(varying) == 1:
        match = [k for k, s in settings if s[varying[0]] == wanted]
        if match:
            message += f"; {varying[0]} {number} is 'bsuite/{match[0]}'"
    return message


def check_name(name: str) -> None:
    """Check an env name without building the env (cheap: no MuJoCo, no env process).

    Raises:
      ValueError: one line naming the problem and the valid choices: an unknown family, a missing
        id, or an unknown bsuite id (see `bsuite_id_problem`). Other families check their ids when
        the env is built.
    """
    for prefix in _REGISTRY:
        if name.startswith(prefix):
            env_id = name[len(prefix):]
            if not env_id:
                raise ValueError(f"environment name {name!r} has no id after {prefix!r}")
            if prefix == "bsuite/":
                problem = bsuite_id_problem(env_id)
                if problem is not None:
                    raise ValueError(problem)
            return
    raise ValueError(f"unknown environment family in {name!r}: valid families {families()} "
                     "(e.g. 'gym:CartPole-v1', 'bsuite/catch/0')")


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
    problem = bsuite_id_problem(bsuite_id)
    if problem is not None:
        raise ValueError(problem)
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


def _make_dmc(task_id: str, seed: int | None, **kwargs: Any) -> gymnasium.Env:
    """``dmc/<domain>-<task>``: proprio DMC; kwargs go to `envs.dmc.make_dmc`."""
    from envs.dmc import make_dmc

    return make_dmc(task_id, seed, vision=False, **kwargs)


def _make_dmc_vision(task_id: str, seed: int | None, **kwargs: Any) -> gymnasium.Env:
    """``dmc-vision/<domain>-<task>``: 64x64 image DMC; kwargs go to `envs.dmc.make_dmc`."""
    from envs.dmc import make_dmc

    return make_dmc(task_id, seed, vision=True, **kwargs)


def _make_memory_maze(size: str, seed: int | None, **kwargs: Any) -> gymnasium.Env:
    """``memory_maze/<size>``; kwargs go to `envs.memory_maze_env.make_memory_maze`."""
    from envs.memory_maze_env import make_memory_maze

    return make_memory_maze(size, seed, **kwargs)


def _make_popgym(env_id: str, seed: int | None, **kwargs: Any) -> gymnasium.Env:
    """``popgym/<Env>``; kwargs go to `envs.popgym_env.make_popgym`."""
    from envs.popgym_env import make_popgym

    return make_popgym(env_id, seed, **kwargs)


def _make_mjx(task_id: str, seed: int | None, **kwargs: Any) -> gymnasium.Env:
    """``mjx/<domain>-<task>``; kwargs (``action_repeat``, ``time_limit``, ``impl``) go to
    `envs.jax.mjx.MjxSuite`."""
    from envs.jax.gymnasium_env import JaxEnvToGymnasium
    from envs.jax.mjx import make_mjx

    return JaxEnvToGymnasium(*make_mjx(task_id, **kwargs), seed=seed)


def _make_mjx_vision(task_id: str, seed: int | None, **kwargs: Any) -> gymnasium.Env:
    """``mjx-vision/<domain>-<task>``: `_make_mjx`'s env with uint8 images (``image_size`` too)."""
    return _make_mjx(task_id, seed, **{"vision": True, "impl": "warp", **kwargs})


def _make_tmaze(task_id: str, seed: int | None, **kwargs: Any) -> gymnasium.Env:
    """``tmaze/<L>`` or ``tmaze/<L1>-<L2>``: the Passive T-Maze (`envs.jax.tmaze`), stepped as the
    device loop steps it."""
    from envs.jax.gymnasium_env import JaxEnvToGymnasium
    from envs.jax.tmaze import make_tmaze

    if kwargs:
        raise TypeError(f"tmaze/ takes no options, got {sorted(kwargs)}")
    return JaxEnvToGymnasium(*make_tmaze(task_id), seed=seed)


# prefix (including its separator) -> builder. Later families add entries here.
_REGISTRY: dict[str, Builder] = {
    "gym:": _make_gym,
    "bsuite/": _make_bsuite,
    "dmc/": _make_dmc,
    "dmc-vision/": _make_dmc_vision,
    "memory_maze/": _make_memory_maze,
    "popgym/": _make_popgym,
    "mjx/": _make_mjx,
    "mjx-vision/": _make_mjx_vision,
    "tmaze/": _make_tmaze,
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
        ``results_dir`` for ``bsuite/``; ``action_repeat``, ``episode_length``,
        ``size``, ``camera``, ``shadowsize`` for ``dmc/`` and ``dmc-vision/``
        (`envs.dmc.make_dmc`); ``target_color``, ``action_repeat``,
        ``episode_length`` for ``memory_maze/``; ``flatten`` for ``popgym/``; ``action_repeat``,
        ``time_limit``, ``impl`` for ``mjx/`` (and ``image_size`` for ``mjx-vision/``).

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


def _gymnasium_entry_point(name: str, **kwargs: Any) -> gymnasium.Env:
    """What the ``worldmodels/...`` gymnasium ids build: ``make(name, **kwargs)``."""
    return make(name, **kwargs)


def gymnasium_names() -> dict[str, str]:
    """Gymnasium id -> `make` name for every id registered under ``worldmodels/``.

    ``worldmodels/make`` is absent: it takes the name as a keyword argument.
    """
    from envs.dmc import DMC_TASKS
    from envs.jax.mjx import MJX_TASKS
    from envs.memory_maze_env import MAZE_SIZES
    from envs.popgym_env import POPGYM_ENVS

    names = [f"dmc/{d}-{t}" for d, t in DMC_TASKS]
    names += [f"dmc-vision/{d}-{t}" for d, t in DMC_TASKS]
    names += [f"memory_maze/{size}" for size in MAZE_SIZES]
    names += [f"popgym/{env_id}" for env_id in POPGYM_ENVS]
    names += [f"mjx/{task}" for task in MJX_TASKS]
    names += [f"mjx-vision/{task}" for task in MJX_TASKS]
    # gymnasium ids allow no '/' inside a name (it separates the namespace).
    return {"worldmodels/" + name.replace("/", "-"): name for name in names}


def _register_with_gymnasium() -> None:
    """Register `gymnasium_names` and ``worldmodels/make``; imports no env package."""
    entry_point = f"{__name__}:_gymnasium_entry_point"
    for gym_id, name in gymnasium_names().items():
        gymnasium.register(id=gym_id, entry_point=entry_point, kwargs={"name": name})
    gymnasium.register(id="worldmodels/make", entry_point=entry_point)


_register_with_gymnasium()
