"""Environments in worker processes that outlive their crashes: `ParallelVectorEnv`.

Slow environments (MuJoCo: DMC, Memory Maze at ~45 steps/s per process) need several processes.
gymnasium's `AsyncVectorEnv` closes everything when one worker fails; a long training run should
instead lose one episode. Here a worker whose env raises, whose process dies (``os._exit``, a
segfault in MuJoCo, the OOM killer) or that does not answer within a timeout is replaced: a new
process rebuilds the env from its factory and resets it, the step returns that reset observation
with reward 0 and ``info["restarted"][i] = True``, and a `RuntimeWarning` names the env and the
cause. The crashed episode is dropped: the caller must treat the restarted env's observation as the
first of a new episode (the training loop does, from ``info["restarted"]``).

Stepping follows gymnasium's NEXT_STEP autoreset exactly like
``SyncVectorEnv(..., autoreset_mode=AutoresetMode.NEXT_STEP)``: the step after an episode's last one
resets that env and returns its first observation with reward 0, terminated and truncated False.
With the same factories, seeds and actions it returns the same observations, rewards and ends.

Workers start with the ``spawn`` method by default: forking a process that runs JAX (which is
multithreaded) can deadlock. Factories are pickled with cloudpickle, so lambdas and closures work;
what they reference by module (functions, classes) is imported in the worker. Workers ignore SIGINT:
Ctrl-C is the parent's to handle (the training loop stops at a step boundary), and the parent's
`close` ends them.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
import traceback
import warnings
import contextlib
from collections.abc import Callable, Sequence
from copy import deepcopy
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate
from gymnasium.vector.vector_env import AutoresetMode

__all__ = ["ParallelVectorEnv", "EnvCrashWarning"]

EnvFn = Callable[[], gym.Env]

# How far apart the seeds of an env's successive restarts are (a prime, so they do not run into the
# seeds `reset(seed=s)` gives the other envs: s, s + 1, ..., s + num_envs - 1).
_RESTART_SEED_STRIDE = 1_000_003


class EnvCrashWarning(RuntimeWarning):
    """An env worker crashed or hung and was restarted; its episode was dropped."""


class _WorkerFailure(Exception):
    """Internal: a worker did not deliver a result (the message says why)."""


def _describe_exception(exc: BaseException) -> str:
    """``TypeName: message (at file:line in function)``: the innermost frame, where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _check_output(space: Any, obs: Any, reward: float) -> None:
    """Raise (so that the parent restarts this env and drops its episode, as for a crash) if a step
    returned an observation of the wrong shape, NaN/inf in a float observation, or a NaN/inf reward."""
    leaves = space.spaces.items() if isinstance(space, gym.spaces.Dict) else [("observation", space)]
    for key, leaf in leaves:
        value = np.asarray(obs[key] if isinstance(space, gym.spaces.Dict) else obs)
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"the env returned shape {value.shape} for {key!r}, not its space's {tuple(leaf.shape)}")
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            raise ValueError(f"the env returned non-finite values for {key!r}")
    if not np.isfinite(reward):
        raise ValueError(f"the env returned a non-finite reward ({reward})")


def _worker(conn: Connection, env_fn_bytes: bytes) -> None:
    """A worker process: build the env, then serve commands until "close" or the pipe closes.

    Commands are ``(name, data)``; answers are ``("ok", payload)``, ``("error", description)`` (the
    env is then in an unknown state: the worker exits and the parent restarts it) or, for "call",
    ``("call_error", description)`` (the env is fine: the worker carries on).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env = None
    command = "make"
    try:
        env = cloudpickle.loads(env_fn_bytes)()
        conn.send(("ok", (env.observation_space, env.action_space, env.metadata)))
        autoreset = False
        while True:
            command, data = conn.recv()
            if command == "step":
                if autoreset:  # NEXT_STEP autoreset, as in SyncVectorEnv
                    obs, info = env.reset()
                    reward, terminated, truncated = 0.0, False, False
                else:
                    obs, reward, terminated, truncated, info = env.step(data)
                _check_output(env.observation_space, obs, float(reward))
                autoreset = bool(terminated or truncated)
                conn.send(("ok", (obs, float(reward), bool(terminated), bool(truncated), info)))
            elif command == "reset":
                obs, info = env.reset(seed=data["seed"], options=data["options"])
                autoreset = False
                conn.send(("ok", (obs, info)))
            elif command == "call":
                name, args, kwargs = data
                try:
                    attr = getattr(env, name)
                    result = attr(*args, **kwargs) if callable(attr) else attr
                except Exception as exc:  # the env's own error, not a crash
                    conn.send(("call_error", _describe_exception(exc)))
                else:
                    conn.send(("ok", result))
            elif command == "close":
                break
            else:
                raise ValueError(f"unknown worker command {command!r}")
    except (EOFError, KeyboardInterrupt, BrokenPipeError):
        pass  # the parent went away: nothing to report to
    except Exception as exc:
        with contextlib.suppress(Exception):  # best effort: the pipe may be broken too
            conn.send(("error", f"{_describe_exception(exc)} in {command}"))
    finally:
        if env is not None:
            with contextlib.suppress(Exception):  # a crashed env may fail to close; the process ends anyway
                env.close()
        conn.close()


def _exit_cause(process: mp.process.BaseProcess) -> str:
    """Why a worker process is gone, from its exit code."""
    process.join(timeout=5.0)
    code = process.exitcode
    if code is None:
        return "its pipe closed but the process is still running"
    if code < 0:
        try:
            return f"the process was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"the process was killed by signal {-code}"
    return f"the process exited with code {code}"


class ParallelVectorEnv(gym.vector.VectorEnv):
    """A vector env over worker processes, one env each, that restarts crashed or hung workers.

    **Arguments:**

    - `env_fns`: one factory per env, each returning a single (not vector) `gym.Env`; a factory is
      called again, in a new process, whenever its env is restarted.
    - `step_timeout`: seconds a step (of all envs together) may take before a worker that has not
      answered counts as hung and is restarted; None waits forever.
    - `reset_timeout`: the same for building an env and resetting it (Memory Maze: ~4 s + ~2.3 s).
    - `max_restarts_in_a_row`: an env that fails this many times without one good step in between
      (e.g. a factory that always raises) raises `RuntimeError` instead of looping.
    - `context`: the multiprocessing start method; ``spawn`` (default) is safe next to JAX.
    - `copy`: return copies of the batched observations (as gymnasium's vector envs do).

    **Attributes:**

    - `restarted`: bool `[num_envs]`, which envs were restarted by the last `step` or `reset`.
    - `restart_counts`: int `[num_envs]`, restarts of each env so far.
    - `failures`: `(env index, cause)` of every restart, in order.

    Observations are batched like gymnasium's vector envs (`single_observation_space` batched over a
    leading `[num_envs]` axis); rewards are float64 `[num_envs]`, terminations and truncations bool
    `[num_envs]`. Infos are merged like gymnasium's (`info[key]` with the mask `info["_" + key]`),
    plus ``info["restarted"]``, bool `[num_envs]`, always present.
    """

    def __init__(self, env_fns: Sequence[EnvFn], *, step_timeout: float | None = 300.0,
                 reset_timeout: float | None = 600.0, max_restarts_in_a_row: int = 5,
                 context: str | None = "spawn", copy: bool = True):
        if not env_fns:
            raise ValueError("ParallelVectorEnv needs at least one env factory")
        self.env_fns = list(env_fns)
        self.num_envs = len(self.env_fns)
        self.step_timeout, self.reset_timeout = step_timeout, reset_timeout
        self.max_restarts_in_a_row = max_restarts_in_a_row
        self.copy = copy
        self._ctx = mp.get_context(context)
        self._fn_bytes = [cloudpickle.dumps(fn) for fn in self.env_fns]
        self._processes: list[mp.process.BaseProcess | None] = [None] * self.num_envs
        self._conns: list[Connection | None] = [None] * self.num_envs
        self._seeds: list[int | None] = [None] * self.num_envs  # the last reset seed of each env
        self._failures_in_a_row = np.zeros(self.num_envs, np.int64)
        self._broken: dict[int, str] = {}  # env index -> why its worker was stopped outside `step`/`reset`
        self.restarted = np.zeros(self.num_envs, bool)
        self.restart_counts = np.zeros(self.num_envs, np.int64)
        self.failures: list[tuple[int, str]] = []
        self.closed = False

        # Start every worker first, then wait: the envs build concurrently.
        for i in range(self.num_envs):
            self._start(i)
        spaces = []
        for i in range(self.num_envs):
            try:
                spaces.append(self._receive(i, self._deadline(self.reset_timeout), "make"))
            except _WorkerFailure as failure:
                self.close()
                raise RuntimeError(
                    f"env {i} could not be built in its worker process: {failure}. Check that its factory "
                    "works in a fresh process: ParallelVectorEnv pickles it with cloudpickle and starts "
                    f"workers with {self._ctx.get_start_method()!r}, which imports the main module again "
                    "in each worker, so a script must create envs under `if __name__ == '__main__':`."
                ) from None
        obs_space, act_space, metadata = spaces[0]
        for i, (o, a, _) in enumerate(spaces[1:], 1):
            if o != obs_space or a != act_space:
                self.close()
                raise ValueError(f"env {i} has spaces {o}, {a} but env 0 has {obs_space}, {act_space}: "
                                 "all envs of a vector env need the same observation and action spaces")
        self.single_observation_space, self.single_action_space = obs_space, act_space
        self.observation_space = batch_space(obs_space, self.num_envs)
        self.action_space = batch_space(act_space, self.num_envs)
        self.metadata = {**dict(metadata), "autoreset_mode": AutoresetMode.NEXT_STEP}
        self.render_mode = None
        self._observations = create_empty_array(obs_space, n=self.num_envs, fn=np.zeros)

    # -- workers -------------------------------------------------------------------------------

    def _start(self, i: int) -> None:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker, args=(child, self._fn_bytes[i]), daemon=True,
                                    name=f"ParallelVectorEnv-{i}")
        process.start()
        child.close()  # the worker holds the only other end: its death closes the pipe
        self._processes[i], self._conns[i] = process, parent

    def _stop(self, i: int) -> None:
        """End worker `i` for good (it is presumed broken): kill it and close its pipe."""
        process, conn = self._processes[i], self._conns[i]
        if process is not None and process.is_alive():
            process.kill()
        if process is not None:
            process.join(timeout=5.0)
        if conn is not None:
            conn.close()
        self._processes[i] = self._conns[i] = None

    @staticmethod
    def _deadline(timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def _send(self, i: int, command: str, data: Any = None) -> None:
        try:
            self._conns[i].send((command, data))
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
            raise _WorkerFailure(_exit_cause(self._processes[i])) from None

    def _receive(self, i: int, deadline: float | None, command: str) -> Any:
        """Worker `i`'s answer to `command`; `_WorkerFailure` if it raised, died or missed `deadline`."""
        conn = self._conns[i]
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            if not conn.poll(timeout):
                raise _WorkerFailure(f"no answer to {command} within the timeout (hung)")
            status, payload = conn.recv()
        except (EOFError, ConnectionResetError, OSError):
            raise _WorkerFailure(_exit_cause(self._processes[i])) from None
        if status == "error":
            raise _WorkerFailure(payload)
        if status == "call_error":
            raise RuntimeError(f"env {i}: {payload}")
        return payload

    def _restart(self, i: int, cause: str) -> tuple[Any, dict]:
        """Replace worker `i` after a failure: warn, kill it, build a new env and reset it.

        **Returns:** the new env's first observation and its reset info.
        """
        while True:
            self._failures_in_a_row[i] += 1
            self.restart_counts[i] += 1
            self.failures.append((i, cause))
            if self._failures_in_a_row[i] > self.max_restarts_in_a_row:
                self.close()
                raise RuntimeError(f"env {i} failed {self.max_restarts_in_a_row + 1} times in a row, last: "
                                   f"{cause}. Fix the env or its factory (restarting does not help).")
            # The count keeps each message distinct: Python shows a repeated warning only once.
            warnings.warn(f"env {i} crashed: {cause}; restarting it in a new process (restart "
                          f"{self.restart_counts[i]} of this env) and dropping its episode", EnvCrashWarning,
                          stacklevel=4)
            self._stop(i)
            # A restarted env must not replay the episode it started with: give it a new seed.
            base = self._seeds[i]
            seed = None if base is None else base + _RESTART_SEED_STRIDE * int(self.restart_counts[i])
            deadline = self._deadline(self.reset_timeout)
            try:
                self._start(i)
                obs_space, act_space, _ = self._receive(i, deadline, "make")
                if (obs_space, act_space) != (self.single_observation_space, self.single_action_space):
                    self.close()
                    raise ValueError(f"env {i} was rebuilt with spaces {obs_space}, {act_space}, not "
                                     f"{self.single_observation_space}, {self.single_action_space}")
                self._send(i, "reset", {"seed": seed, "options": None})
                return self._receive(i, deadline, "reset")
            except _WorkerFailure as failure:
                cause = f"{failure} (while restarting)"

    # -- the vector env API --------------------------------------------------------------------

    def reset(self, *, seed: int | Sequence[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset every env: `seed` None (unseeded), an int s (env i gets s + i) or one seed per env.

        **Returns:** batched first observations `[num_envs, ...]` and merged infos.
        """
        self._check_open()
        if options is not None and "reset_mask" in options:
            raise NotImplementedError("ParallelVectorEnv.reset does not support options['reset_mask']; "
                                      "reset all envs, or rely on NEXT_STEP autoreset")
        if seed is None or isinstance(seed, (int, np.integer)):
            seeds = [None if seed is None else int(seed) + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset got {len(seeds)} seeds for {self.num_envs} envs")
        self._seeds = seeds
        results = self._all(lambda i: ("reset", {"seed": seeds[i], "options": options}), self.reset_timeout)
        infos: dict[str, Any] = {}
        obs = []
        for i, (status, result) in enumerate(results):
            obs.append(result[0])
            infos = self._add_info(infos, result[1], i)
        return self._batch(obs), infos

    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every env with its action (NEXT_STEP autoreset: see the module docstring).

        **Arguments:** `actions`, batched like `action_space` (`[num_envs, ...]`).

        **Returns:** observations `[num_envs, ...]`, rewards float64 `[num_envs]`, terminations and
        truncations bool `[num_envs]`, infos (``infos["restarted"]``: bool `[num_envs]`).
        """
        self._check_open()
        per_env = list(iterate(self.action_space, actions))
        results = self._all(lambda i: ("step", per_env[i]), self.step_timeout)
        obs = []
        rewards = np.zeros(self.num_envs, np.float64)
        terminations = np.zeros(self.num_envs, bool)
        truncations = np.zeros(self.num_envs, bool)
        infos: dict[str, Any] = {}
        for i, (status, result) in enumerate(results):
            if status == "restarted":  # a first observation: reward 0, not an end
                obs.append(result[0])
                env_info = result[1]
            else:
                obs.append(result[0])
                rewards[i], terminations[i], truncations[i] = result[1:4]
                env_info = result[4]
            infos = self._add_info(infos, env_info, i)
        infos["restarted"] = self.restarted.copy()
        infos["_restarted"] = np.ones(self.num_envs, bool)
        return self._batch(obs), rewards, terminations, truncations, infos

    def _all(self, command: Callable[[int], tuple[str, Any]], timeout: float | None) -> list[tuple[str, Any]]:
        """Send every worker its command, collect the answers, restart the workers that failed.

        **Returns:** per env ``("ok", answer)`` or ``("restarted", (first obs, reset info))``.
        """
        failed, self._broken = self._broken, {}  # workers that failed in `call`: restart them now
        for i in range(self.num_envs):
            if i in failed:
                continue
            try:
                self._send(i, *command(i))
            except _WorkerFailure as failure:
                failed[i] = str(failure)
        deadline = self._deadline(timeout)
        answers: dict[int, Any] = {}
        for i in range(self.num_envs):
            if i in failed:
                continue
            try:
                answers[i] = self._receive(i, deadline, command(i)[0])
            except _WorkerFailure as failure:
                failed[i] = str(failure)
        self.restarted = np.zeros(self.num_envs, bool)
        results = []
        for i in range(self.num_envs):
            if i in failed:
                results.append(("restarted", self._restart(i, failed[i])))
                self.restarted[i] = True
            else:
                self._failures_in_a_row[i] = 0
                results.append(("ok", answers[i]))
        return results

    def _batch(self, obs: list[Any]) -> Any:
        self._observations = concatenate(self.single_observation_space, obs, self._observations)
        return deepcopy(self._observations) if self.copy else self._observations

    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call method `name` of every env (or read attribute `name`); a tuple of the results.

        An exception in the env's method is raised here as `RuntimeError` (the worker is kept); a
        worker that crashed or hung is stopped and the next `step` or `reset` restarts it.
        """
        self._check_open()
        errors: dict[int, str] = {}
        for i in range(self.num_envs):
            try:
                self._send(i, "call", (name, args, kwargs))
            except _WorkerFailure as failure:
                errors[i] = f"env {i} failed: {failure}"
                self._broken[i] = str(failure)
        deadline = self._deadline(self.step_timeout)
        results = []
        for i in range(self.num_envs):
            if i in errors:
                continue
            try:  # every answer is read before raising, so that no pipe is left a step behind
                results.append(self._receive(i, deadline, "call"))
            except _WorkerFailure as failure:
                errors[i] = f"env {i} failed: {failure}"
                self._broken[i] = str(failure)
            except RuntimeError as error:  # the env's own exception; the worker is fine
                errors[i] = str(error)
        for i in self._broken:
            self._stop(i)  # a hung worker could still answer late, out of step with the next command
        if errors:
            raise RuntimeError(f"call({name!r}): {'; '.join(errors.values())} (a failed env is restarted by "
                               "the next step or reset)")
        return tuple(results)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """Attribute `name` of every env."""
        return self.call(name)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("ParallelVectorEnv is closed")

    def close_extras(self, **kwargs: Any) -> None:
        """Ask each worker to close its env, then end the workers that do not exit in time."""
        for i in range(self.num_envs):
            conn = self._conns[i]
            if conn is not None:
                with contextlib.suppress(Exception):  # a dead worker cannot be asked; it is killed below
                    conn.send(("close", None))
        deadline = time.monotonic() + 10.0
        for i in range(self.num_envs):
            process = self._processes[i]
            if process is not None:
                process.join(timeout=max(deadline - time.monotonic(), 0.0))
            self._stop(i)

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and not sys.is_finalizing():
            self.close()
