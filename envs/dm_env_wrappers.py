"""Small `dm_env.Environment` wrappers shared by the MuJoCo families (DMC, Memory Maze).

They work on dm_env timesteps, before `DmEnvToGymnasium` turns them into gymnasium steps, so
the discount of the step that ends an episode (0: terminal, > 0: cut off) survives them:

* `StepLimit` cuts episodes after a number of steps of the wrapped env (a truncation, discount
  kept), e.g. for short test episodes.
* `ActionRepeat` repeats each action, sums the rewards and multiplies the discounts.
"""

from __future__ import annotations

from typing import Any

import dm_env

__all__ = ["ActionRepeat", "StepLimit", "Wrapper"]


class Wrapper(dm_env.Environment):
    """Forwards everything to the wrapped env; subclasses override what they change."""

    def __init__(self, env: dm_env.Environment) -> None:
        self._env = env

    @property
    def env(self) -> dm_env.Environment:
        """The wrapped dm_env."""
        return self._env

    def reset(self) -> dm_env.TimeStep:
        return self._env.reset()

    def step(self, action: Any) -> dm_env.TimeStep:
        return self._env.step(action)

    def observation_spec(self) -> Any:
        return self._env.observation_spec()

    def action_spec(self) -> Any:
        return self._env.action_spec()

    def reward_spec(self) -> Any:
        return self._env.reward_spec()

    def discount_spec(self) -> Any:
        return self._env.discount_spec()

    def close(self) -> None:
        self._env.close()


class StepLimit(Wrapper):
    """End each episode after at most `max_steps` steps of the wrapped env.

    The step that reaches the limit becomes a LAST timestep with the wrapped env's own discount
    (1.0 for a running episode), i.e. a truncation the agent bootstraps from. If the wrapped env
    ends the episode first (its own time limit or a terminal state), its timestep passes through
    unchanged. A `step` after a LAST timestep starts a new episode, as dm_env specifies.
    """

    def __init__(self, env: dm_env.Environment, max_steps: int) -> None:
        """Args:
          env: the dm_env to limit.
          max_steps: steps per episode, >= 1 (the wrapped env's own limit still applies).
        """
        if max_steps < 1:
            raise ValueError(f"StepLimit needs max_steps >= 1, got {max_steps}.")
        super().__init__(env)
        self._max_steps = int(max_steps)
        self._steps = 0
        self._needs_reset = True

    def reset(self) -> dm_env.TimeStep:
        self._steps = 0
        self._needs_reset = False
        return self._env.reset()

    def step(self, action: Any) -> dm_env.TimeStep:
        if self._needs_reset:
            return self.reset()
        timestep = self._env.step(action)
        self._steps += 1
        if timestep.last():
            self._needs_reset = True
            return timestep
        if self._steps >= self._max_steps:
            self._needs_reset = True
            discount = 1.0 if timestep.discount is None else timestep.discount
            return dm_env.truncation(timestep.reward, timestep.observation, discount)
        return timestep


class ActionRepeat(Wrapper):
    """Apply each action `repeat` times (fewer if the episode ends in between).

    Returns the last timestep with the sum of the rewards and the product of the discounts, so a
    terminal state inside the repeat still gives discount 0.
    """

    def __init__(self, env: dm_env.Environment, repeat: int) -> None:
        """Args:
          env: the dm_env to wrap.
          repeat: how many env steps one action lasts, >= 1.
        """
        if repeat < 1:
            raise ValueError(f"ActionRepeat needs repeat >= 1, got {repeat}.")
        super().__init__(env)
        self._repeat = int(repeat)

    def step(self, action: Any) -> dm_env.TimeStep:
        reward = 0.0
        discount = 1.0
        for _ in range(self._repeat):
            timestep = self._env.step(action)
            if timestep.first():
                # The wrapped env auto-reset (step after LAST): hand back its first step as is.
                return timestep
            reward += 0.0 if timestep.reward is None else float(timestep.reward)
            discount *= 1.0 if timestep.discount is None else float(timestep.discount)
            if timestep.last():
                break
        return timestep._replace(reward=reward, discount=discount)
