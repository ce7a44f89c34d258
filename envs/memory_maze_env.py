"""Memory Maze (Pasukonis et al. 2022) through its dm_env API, as a gymnasium env.

``memory_maze/<9x9|11x11|13x13|15x15>``:

* Observation ``{'image': uint8 [64, 64, 3]}``: the egocentric camera with the target's colour
  drawn as a border (the standard ``MemoryMaze-<size>-v0`` setting that DreamerV3 and R2I use);
  ``target_color=True`` adds the colour as a separate ``'target_color'`` float32 (3,) instead.
* Actions ``Discrete(6)``: noop, forward, left, right, forward+left, forward+right.
* Episodes last 1000 / 2000 / 3000 / 4000 steps (4 Hz) and end by time limit:
  ``truncated=True`` (the critic bootstraps), never ``terminated``.
* ``seed`` seeds maze generation; a seeded ``reset`` rebuilds the env (~4 s).

The package's gym API is not used: it needs the unmaintained ``gym`` and crashes on
``np.bool8`` under numpy 2. ``import memory_maze`` still needs ``gym`` installed.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import dm_env
import numpy as np
from dm_env import specs

from envs.dm_env_adapter import DmEnvToGymnasium
from envs.dm_env_wrappers import ActionRepeat, StepLimit
from envs.rendering import import_mujoco_module

__all__ = ["MAZE_SIZES", "EPISODE_STEPS", "make_memory_maze"]

MAZE_SIZES: tuple[str, ...] = ("9x9", "11x11", "13x13", "15x15")
# Steps per episode at the default 4 Hz control (the tasks' time limits in seconds x 4).
EPISODE_STEPS: dict[str, int] = {"9x9": 1000, "11x11": 2000, "13x13": 3000, "15x15": 4000}


class _DropNoFreeJointWarning(logging.Filter):
    """Drop dm_control's "Cannot set velocity on Entity with no free joint." warning.

    Memory Maze's rolling-ball walker has no free joint and its spawn code sets a velocity on
    every reset, so the warning repeats for each episode and says nothing to act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Cannot set velocity on Entity with no free joint")


def _import_tasks() -> Any:
    """``memory_maze.tasks``, with a clear error when its ``gym`` dependency is missing."""
    import importlib.util

    if importlib.util.find_spec("gym") is None and importlib.util.find_spec("memory_maze"):
        raise ModuleNotFoundError(
            "memory_maze imports the old `gym` package even for its dm_env API; install it "
            "with `pip install 'worldmodels[memory-maze]'` (gym==0.26.2).",
            name="gym",
        )
    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _DropNoFreeJointWarning) for f in absl_logger.filters):
        absl_logger.addFilter(_DropNoFreeJointWarning())
    # gym prints a multi-line 'unmaintained' notice to stderr on import; it is not ours to act on.
    with contextlib.redirect_stderr(io.StringIO()):
        return import_mujoco_module("memory_maze.tasks", extra="memory-maze")


def _image_dict(env: dm_env.Environment, target_color: bool) -> dm_env.Environment:
    """Memory Maze's observation (an image, or a dict with ``image``) as a dict."""
    from memory_maze import wrappers

    class _AsDict(wrappers.ObservationWrapper):
        def observation_spec(self):
            spec = self.env.observation_spec()
            if target_color:
                # float32 like every vector the agent reads (the package gives float64).
                color = specs.Array((3,), np.float32, name="target_color")
                return {"image": spec["image"], "target_color": color}
            return {"image": spec.replace(name="image")}

        def observation(self, obs):
            if target_color:
                return {"image": obs["image"], "target_color": obs["target_color"]}
            return {"image": obs}

    return _AsDict(env)


def make_memory_maze(
    size: str,
    seed: int | None,
    *,
    target_color: bool = False,
    action_repeat: int = 1,
    episode_length: int | None = None,
) -> DmEnvToGymnasium:
    """Build ``memory_maze/<size>``.

    Args:
      size: one of `MAZE_SIZES`.
      seed: maze generation seed; None draws a fresh one.
      target_color: give the target colour as its own (3,) observation rather than as an image
        border.
      action_repeat: env steps per agent step (the benchmark uses 1).
      episode_length: if set, episodes are cut (truncated) after this many env steps; at most
        `EPISODE_STEPS` of the size (useful for short tests).

    Returns:
      A `DmEnvToGymnasium` with a Dict observation space and ``Discrete(6)`` actions.

    Raises:
      ValueError: unknown size (lists the valid ones) or bad arguments.
      RendererUnavailableError: no working OpenGL backend.
    """
    if size not in MAZE_SIZES:
        raise ValueError(f"Unknown Memory Maze size {size!r}. Valid ids: {list(MAZE_SIZES)}.")
    if episode_length is not None and not 1 <= episode_length <= EPISODE_STEPS[size]:
        raise ValueError(
            f"episode_length must be in [1, {EPISODE_STEPS[size]}] for {size}, "
            f"got {episode_length}."
        )
    tasks = _import_tasks()
    build = getattr(tasks, f"memory_maze_{size}")

    def factory(seed: int | None) -> dm_env.Environment:
        env = build(seed=seed, image_only_obs=not target_color)
        env = _image_dict(env, target_color)
        if episode_length is not None:
            env = StepLimit(env, episode_length)
        if action_repeat != 1:
            env = ActionRepeat(env, action_repeat)
        return env

    gym_env = DmEnvToGymnasium(factory=factory, seed=seed)
    if seed is not None:
        gym_env.action_space.seed(seed)
    return gym_env
