"""What both training loops share around a run directory: the check that a resumed run has the same
config, and the Ctrl-C handling that stops at a step boundary. Both loops import this module; it
imports neither of them.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

from worldmodels.config import Config, from_dict


class ConfigMismatchError(ValueError):
    """A run directory is being resumed with another agent or environment config."""


# What a resumed run may change; every other run option shapes the replay or the training schedule.
RESUME_MAY_CHANGE = {"steps", "log_every", "eval_every", "eval_episodes", "final_eval_episodes", "checkpoint_every",
                     "logdir", "tensorboard", "progress"}


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
