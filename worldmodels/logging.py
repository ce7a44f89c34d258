"""Run logs: `metrics.jsonl`, `scores.jsonl` and TensorBoard, one writer for all three."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "item"):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _drop_after(path: Path, step: int) -> None:
    """Rewrite a JSON-lines log without its records after env step `step` (atomically)."""
    if not path.exists():
        return
    records = read_jsonl(path)
    kept = [r for r in records if r.get("env_step", 0) <= step]
    if len(kept) < len(records):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)


class RunLogger:
    """Appends JSON lines and mirrors scalars to TensorBoard.

    `start_step`: the env step the run (re)starts from. A resumed run keeps appending, but records
    after it, left by a run that crashed or was aborted after its last checkpoint, are dropped first
    (TensorBoard purges them too), so a resumed run's logs have no repeated steps.
    """

    def __init__(self, logdir: str | Path, tensorboard: bool = True, start_step: int = 0):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        for name in ("metrics.jsonl", "scores.jsonl"):
            _drop_after(self.logdir / name, start_step)
        self._metrics = open(self.logdir / "metrics.jsonl", "a")
        self._scores = open(self.logdir / "scores.jsonl", "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.logdir / "tensorboard"), purge_step=start_step + 1)

    def metrics(self, step: int, values: Mapping[str, Any]) -> None:
        record = {"env_step": int(step), "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("env_step", "time") and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def score(self, step: int, mode: str, episode_return: float, length: int) -> None:
        record = {"env_step": int(step), "mode": mode, "return": float(episode_return), "length": int(length),
                  "time": time.time()}
        self._scores.write(json.dumps(record) + "\n")
        self._scores.flush()
        if self._tb is not None:
            self._tb.add_scalar(f"{mode}/return", float(episode_return), step)
            self._tb.add_scalar(f"{mode}/length", int(length), step)

    def close(self) -> None:
        self._metrics.close()
        self._scores.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
