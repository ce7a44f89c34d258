"""What both training loops share around a run directory: the check that a resumed run has the same
config, the fallback past a checkpoint that cannot be read, and the Ctrl-C handling that stops at a
step boundary. Both loops import this module; it
imports neither of them.
"""

from __future__ import annotations

import errno
import json
import signal
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from worldmodels.checkpoint import CheckpointMismatchError
from worldmodels.config import Config, from_dict

T = TypeVar("T")


class ConfigMismatchError(ValueError):
    """A run directory is being resumed with another agent or environment config."""


# What a resumed run may change; every other run option shapes the replay or the training schedule.
# The mesh may change: the agent state is the same on every device and replay lives on the host, so a
# checkpoint restores onto any number of devices. The process count may not (each process owns a replay
# shard): the checkpoint's metadata says how many wrote it, and the host loop refuses another count.
RESUME_MAY_CHANGE = {"steps", "log_every", "eval_every", "eval_episodes", "final_eval_episodes", "checkpoint_every",
                     "max_skipped_updates", "mesh", "coordinator", "num_processes", "process_id", "coordinator_timeout",
                     "trust_env_pickle", "logdir", "tensorboard", "wandb",
                     "video_every", "eval_video", "save_episodes", "progress"}


def check_resumable(logdir: Path, config: Config) -> None:
    """A run directory belongs to one agent and env: refuse to resume it with another."""
    path = logdir / "config.json"
    if not path.exists():
        return
    saved = from_dict(json.loads(path.read_text()))
    problems = []
    if saved.agent != config.agent:
        problems.append("the agent config differs")
    for name in sorted(set(vars(saved.run)) - RESUME_MAY_CHANGE):
        if getattr(saved.run, name) != getattr(config.run, name):
            problems.append(f"run.{name} is {getattr(config.run, name)!r}, was {getattr(saved.run, name)!r}")
    if problems:
        raise ConfigMismatchError(
            f"{logdir} holds a run with another config ({'; '.join(problems)}). Resume it with the config in "
            f"{path} (only run.{', run.'.join(sorted(RESUME_MAY_CHANGE))} may change), or pass a new "
            "--run.logdir.")


class StopOnInterrupt:
    """First Ctrl-C asks the loop to stop at the next step boundary (and checkpoint); a second one
    interrupts at once (the last checkpoint stays usable)."""

    def __init__(self):
        self.stop = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: no handler, Ctrl-C behaves as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        if self.stop:
            raise KeyboardInterrupt
        self.stop = True
        print("\nstopping at the next step boundary and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class NonFiniteUpdatesError(FloatingPointError):
    """Too many updates in a row had a non-finite loss or gradient (see `run.max_skipped_updates`)."""


def first_nonfinite_term(metrics: dict[str, Any]) -> str:
    """The first loss term of an update's metrics that is not finite, in the order the update computes
    them (the world model's, then the replay value's, critic's and actor's), or a note that only the
    gradients were."""
    later = ["loss/repval", "loss/critic", "loss/actor", "loss/world_model", "loss/total"]
    order = sorted(k for k in metrics if k.startswith("loss/") and k not in later) + later
    terms = [k for k in order if k in metrics and not np.isfinite(metrics[k])]
    return terms[0] if terms else "none (the gradients)"


def skipped_in_a_row(before: int, skipped_flags: Any) -> int:
    """Updates skipped in a row after `before` such updates and these per-update flags, in order."""
    for skipped in skipped_flags:
        before = before + 1 if skipped else 0
    return before


def nonfinite_updates_error(count: int, where: str, last_metrics: dict[str, Any], batch_note: str,
                            checkpoint_steps: list[int]) -> NonFiniteUpdatesError:
    """The error that stops a run after `count` skipped updates in a row, the last one `where`."""
    return NonFiniteUpdatesError(
        f"{count} updates in a row had a non-finite loss or gradient, the last {where}; its first non-finite "
        f"loss term: {first_nonfinite_term(last_metrics)}. {batch_note} "
        + (f"The checkpoint of step {checkpoint_steps[-1]} is the last good one: resume from it after a fix (e.g. "
           "a lower --agent.optim.lr)." if checkpoint_steps else "There is no checkpoint yet."))


class NoUsableCheckpointError(RuntimeError):
    """Every checkpoint of a run directory failed to read."""


def restore_usable(checkpoints: Any, logdir: Path, restore_step: Callable[[int], T]) -> T:
    """`restore_step(step)` for the newest checkpoint that reads; a corrupt or truncated one is skipped
    with a warning that names it. A config mismatch is raised at once (every checkpoint has it).

    **Arguments:** `checkpoints`: a `worldmodels.checkpoint.Checkpointer` with at least one step.

    **Raises:** `NoUsableCheckpointError` naming the run and how to start fresh when none reads.
    """
    steps = checkpoints.all_steps()
    failures = []
    for step in reversed(steps):
        try:
            return restore_step(step)
        except (ConfigMismatchError, CheckpointMismatchError):
            raise
        except Exception as e:  # a truncated file, a corrupt array or metadata: try the one before
            failures.append(f"step {step} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            older = [s for s in steps if s < step]
            if older:
                warnings.warn(f"the checkpoint of step {step} in {checkpoints.directory} cannot be read "
                              f"({type(e).__name__}); resuming from the one before it, step {older[-1]}")
    raise NoUsableCheckpointError(
        f"{logdir} has no usable checkpoint: {'; '.join(failures)}. To start the run afresh, pass a new "
        f"--run.logdir (or delete {Path(logdir) / 'checkpoints'} and its logs).")


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "Disk quota exceeded" in str(error)


def save_or_warn(save: Callable[[], Any], step: int, checkpoints: Any) -> bool:
    """Run a checkpoint `save`; a full disk (ENOSPC, EDQUOT, also inside orbax's or tensorstore's
    errors) is a warning, not a crash: the previous checkpoint stays the one to resume from and
    training goes on. Any other error is raised. **Returns:** whether it saved."""
    try:
        save()
        return True
    except Exception as e:
        if not _disk_full(e):
            raise
        previous = [s for s in checkpoints.all_steps() if s < step]
        kept = (f"the checkpoint of step {previous[-1]} stays the one to resume from" if previous
                else "there is no checkpoint to resume from yet")
        warnings.warn(f"the disk of {checkpoints.directory} is full: the checkpoint of step {step} was not "
                      f"written ({type(e).__name__}: {e}); {kept}. Training goes on; free some space for the "
                      "next checkpoint")
        return False
