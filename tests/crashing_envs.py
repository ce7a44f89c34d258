"""Small deterministic envs and crash injection for the parallel vector env tests.

Kept apart from the test modules so that worker processes, which import the factories by module,
import only gymnasium and numpy (not JAX).
"""

from __future__ import annotations

import ctypes
import os
import time
from typing import Any

import gymnasium as gym
import numpy as np


class CounterEnv(gym.Env):
    """Deterministic given its reset seed and actions; random episode ends (terminations) and a
    time limit (truncations). Observation float32 (3,): [step, a seeded random number, last action];
    actions Discrete(3); reward = action + a seeded random number."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, max_steps: int = 12, end_prob: float = 0.1):
        self.max_steps, self.end_prob = max_steps, end_prob
        self.t = 0

    def _obs(self, action: int) -> np.ndarray:
        return np.array([self.t, self.np_random.normal(), action], np.float32)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(-1), {"t": self.t}

    def exit(self, code: int) -> None:
        """End the process at once (a crash outside `step`, e.g. in `ParallelVectorEnv.call`)."""
        os._exit(code)

    def step(self, action):
        self.t += 1
        reward = float(action) + float(self.np_random.normal())
        terminated = bool(self.np_random.random() < self.end_prob)
        truncated = self.t >= self.max_steps and not terminated
        return self._obs(int(action)), reward, terminated, truncated, {"t": self.t}


class Crash(gym.Wrapper):
    """Crashes at the env's `at_step`-th step call since it was built. `how`: "raise", "exit"
    (os._exit(3)), "segfault" or "hang". With a `marker` file it crashes once (the file records the
    crash, so the env rebuilt after it runs normally); without one, every time."""

    def __init__(self, env: gym.Env, at_step: int, how: str, marker: str | None):
        super().__init__(env)
        self.at_step, self.how, self.marker, self.steps = at_step, how, marker, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.at_step and not (self.marker and os.path.exists(self.marker)):
            if self.marker:
                open(self.marker, "w").close()
            if self.how == "raise":
                raise RuntimeError("injected crash")
            if self.how == "exit":
                os._exit(3)
            if self.how == "segfault":
                ctypes.string_at(0)
            if self.how == "hang":
                time.sleep(3600)
            raise ValueError(f"unknown crash kind {self.how!r}")
        return self.env.step(action)


def make_env(seed: int | None = None, crash: dict | None = None, crash_seed: int | None = None,
             **kwargs: Any) -> gym.Env:
    """A seeded `CounterEnv`; wrapped in `Crash(**crash)` when `crash` is given and `seed`
    equals `crash_seed` (or `crash_seed` is None)."""
    env: gym.Env = CounterEnv(**kwargs)
    if crash is not None and (crash_seed is None or seed == crash_seed):
        env = Crash(env, **crash)
    if seed is not None:
        env.action_space.seed(seed)
    return env


class NaNEnv(CounterEnv):
    """A CounterEnv whose step number `at` (counted from reset) returns NaN in `where`: "reward" or
    "obs"; "shape" returns a wrongly shaped observation instead."""

    def __init__(self, at: int = 3, where: str = "reward"):
        super().__init__(max_steps=50, end_prob=0.0)
        self.at, self.where = at, where

    def step(self, action):
        obs, reward, terminated, truncated, info = super().step(action)
        if self.t == self.at:
            if self.where == "reward":
                reward = float("nan")
            elif self.where == "obs":
                obs = obs.copy()
                obs[1] = np.inf
            else:
                obs = obs[:2]
        return obs, reward, terminated, truncated, info
