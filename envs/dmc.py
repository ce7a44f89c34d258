"""DeepMind Control Suite tasks as gymnasium envs, the way DreamerV3 uses them.

``dmc/<domain>-<task>`` (proprio) and ``dmc-vision/<domain>-<task>`` (pixels), e.g.
``dmc/walker-walk``; the task list is `DMC_TASKS` (= ``dm_control.suite.ALL_TASKS``).

* Observations: proprio gives a dict of float32 vectors, one per dm_control observation key
  (scalars become shape (1,)), e.g. walker: ``orientations (14,)``, ``height (1,)``,
  ``velocity (9,)``. Vision gives ``{'image': uint8 [64, 64, 3]}`` rendered from camera 0
  (quadruped: camera 2, as DreamerV3 does).
* Actions: a float32 Box with the task's bounds ([-1, 1] for every suite task).
* Action repeat 2 by default: one env step = 2 physics control steps, rewards summed, so the
  standard 1000-step episodes are 500 env steps with returns still in [0, 1000].
* Episodes end by the suite's time limit: ``truncated=True`` (discount 1), never
  ``terminated``.
* ``seed`` goes to ``task_kwargs={'random': seed}``; a seeded ``reset`` rebuilds the task.
"""

from __future__ import annotations

import collections
from typing import Any

import dm_env
import numpy as np
from dm_env import specs

from envs.dm_env_adapter import DmEnvToGymnasium
from envs.dm_env_wrappers import ActionRepeat, StepLimit, Wrapper
from envs.rendering import import_mujoco_module

__all__ = ["DMC_TASKS", "DmcObservation", "make_dmc", "parse_task"]

# dm_control.suite.ALL_TASKS of dm-control 1.0.50, spelled out so the names can be registered
# with gymnasium without importing MuJoCo (a test checks it against the installed suite).
DMC_TASKS: tuple[tuple[str, str], ...] = (
    ("acrobot", "swingup"), ("acrobot", "swingup_sparse"), ("ball_in_cup", "catch"),
    ("cartpole", "balance"), ("cartpole", "balance_sparse"), ("cartpole", "swingup"),
    ("cartpole", "swingup_sparse"), ("cartpole", "two_poles"), ("cartpole", "three_poles"),
    ("cheetah", "run"), ("dog", "stand"), ("dog", "walk"), ("dog", "trot"), ("dog", "run"),
    ("dog", "fetch"), ("finger", "spin"), ("finger", "turn_easy"), ("finger", "turn_hard"),
    ("fish", "upright"), ("fish", "swim"), ("hopper", "stand"), ("hopper", "hop"),
    ("humanoid", "stand"), ("humanoid", "walk"), ("humanoid", "run"),
    ("humanoid", "run_pure_state"), ("humanoid_CMU", "stand"), ("humanoid_CMU", "walk"),
    ("humanoid_CMU", "run"), ("lqr", "lqr_2_1"), ("lqr", "lqr_6_2"),
    ("manipulator", "bring_ball"), ("manipulator", "bring_peg"), ("manipulator", "insert_ball"),
    ("manipulator", "insert_peg"), ("pendulum", "swingup"), ("point_mass", "easy"),
    ("point_mass", "hard"), ("quadruped", "walk"), ("quadruped", "run"),
    ("quadruped", "escape"), ("quadruped", "fetch"), ("reacher", "easy"), ("reacher", "hard"),
    ("stacker", "stack_2"), ("stacker", "stack_4"), ("swimmer", "swimmer6"),
    ("swimmer", "swimmer15"), ("walker", "stand"), ("walker", "walk"), ("walker", "run"),
)

# DreamerV3's DMC cameras: 0 unless the domain's camera 0 is a poor view.
DEFAULT_CAMERAS: dict[str, int] = {"quadruped": 2}


def parse_task(task_id: str) -> tuple[str, str]:
    """``'walker-walk'`` -> ``('walker', 'walk')``.

    Raises:
      ValueError: not ``<domain>-<task>`` or not a suite task; lists the valid ids.
    """
    domain, sep, task = task_id.partition("-")
    if not sep or (domain, task) not in DMC_TASKS:
        valid = ", ".join(f"{d}-{t}" for d, t in DMC_TASKS)
        raise ValueError(f"Unknown DMC task {task_id!r}. Valid ids (<domain>-<task>): {valid}.")
    return domain, task


class DmcObservation(Wrapper):
    """Map a suite env's observations to DreamerV3's: proprio vectors or a rendered image.

    The wrapped env is the outermost dm_env below this one (action repeat, step limit), so the
    image is rendered once per agent step, not once per physics step.
    """

    def __init__(
        self,
        env: dm_env.Environment,
        physics: Any,
        *,
        vision: bool,
        size: tuple[int, int] = (64, 64),
        camera: int = 0,
    ) -> None:
        """Args:
          env: the (wrapped) suite env.
          physics: its ``dm_control.mujoco.Physics`` (renders the image).
          vision: True: ``{'image': uint8 [H, W, 3]}``; False: the proprio dict.
          size: image (height, width).
          camera: camera id to render from.
        """
        super().__init__(env)
        self._physics = physics
        self._vision = vision
        self._size = (int(size[0]), int(size[1]))
        self._camera = int(camera)
        if vision:
            self._spec = collections.OrderedDict(
                image=specs.BoundedArray((*self._size, 3), np.uint8, 0, 255, name="image")
            )
        else:
            self._spec = collections.OrderedDict(
                (key, specs.Array((max(1, int(np.prod(spec.shape))),), np.float32, name=key))
                for key, spec in env.observation_spec().items()
            )

    def _observation(self, raw: Any) -> collections.OrderedDict:
        if self._vision:
            height, width = self._size
            image = self._physics.render(height, width, camera_id=self._camera)
            return collections.OrderedDict(image=np.asarray(image, np.uint8))
        return collections.OrderedDict(
            (key, np.asarray(raw[key], np.float32).reshape(-1)) for key in self._spec
        )

    def reset(self) -> dm_env.TimeStep:
        timestep = self._env.reset()
        return timestep._replace(observation=self._observation(timestep.observation))

    def step(self, action: Any) -> dm_env.TimeStep:
        timestep = self._env.step(action)
        return timestep._replace(observation=self._observation(timestep.observation))

    def observation_spec(self) -> collections.OrderedDict:
        return self._spec

    def action_spec(self) -> specs.BoundedArray:
        # float32 like every other vector the agent sees; dm_control accepts any float dtype.
        spec = self._env.action_spec()
        return specs.BoundedArray(
            spec.shape, np.float32, spec.minimum, spec.maximum, name=spec.name or "action"
        )

    def close(self) -> None:
        super().close()
        # control.Environment.close frees nothing; release the GL context and MuJoCo data now
        # rather than at garbage collection (a seeded reset rebuilds the task).
        self._physics.free()


def make_dmc(
    task_id: str,
    seed: int | None,
    *,
    vision: bool = False,
    action_repeat: int = 2,
    size: tuple[int, int] = (64, 64),
    camera: int | None = None,
    episode_length: int | None = None,
    shadowsize: int | None = 512,
) -> DmEnvToGymnasium:
    """Build ``dmc/<task_id>`` (or ``dmc-vision/<task_id>`` with ``vision=True``).

    Args:
      task_id: ``<domain>-<task>``, e.g. ``'walker-walk'``.
      seed: ``task_kwargs={'random': seed}``; None draws fresh randomness.
      vision: image observations instead of proprio vectors.
      action_repeat: physics control steps per env step (DreamerV3: 2).
      size: (height, width) of the image.
      camera: camera id; None picks DreamerV3's (`DEFAULT_CAMERAS`, else 0).
      episode_length: if set, episodes are cut (truncated) after this many control steps, i.e.
        ``episode_length / action_repeat`` env steps; it cannot exceed the task's own 1000.
      shadowsize: shadow map size set before the first render; 512 instead of MuJoCo's 2048
        renders 64x64 images ~1.6x faster with <0.2% of pixels changed. None keeps the model's.

    Returns:
      A `DmEnvToGymnasium` whose seeded ``reset`` rebuilds the task with that seed.

    Raises:
      ValueError: unknown task id (lists the valid ones) or bad arguments.
      RendererUnavailableError: vision without a working OpenGL backend.
    """
    domain, task = parse_task(task_id)
    if action_repeat < 1:
        raise ValueError(f"action_repeat must be >= 1, got {action_repeat}.")
    camera = DEFAULT_CAMERAS.get(domain, 0) if camera is None else camera
    suite = import_mujoco_module("dm_control.suite", extra="dmc", need_rendering=vision)

    def factory(seed: int | None) -> dm_env.Environment:
        env = suite.load(domain, task, task_kwargs={"random": seed})
        physics = env.physics
        if vision and shadowsize is not None:
            # The render context reads it when the first render creates it.
            physics.model.vis.quality.shadowsize = shadowsize
        inner: dm_env.Environment = env
        if episode_length is not None:
            inner = StepLimit(inner, episode_length)
        inner = ActionRepeat(inner, action_repeat)
        return DmcObservation(inner, physics, vision=vision, size=size, camera=camera)

    gym_env = DmEnvToGymnasium(factory=factory, seed=seed)
    if seed is not None:
        gym_env.action_space.seed(seed)
    return gym_env
