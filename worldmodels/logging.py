"""Run logs: `metrics.jsonl`, `scores.jsonl`, TensorBoard, wandb and videos, one writer for all."""

from __future__ import annotations

import collections
import importlib.util
import json
import secrets
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

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
    """Appends JSON lines and mirrors scalars to TensorBoard and, optionally, to Weights & Biases.

    `start_step`: the env step the run (re)starts from. A resumed run keeps appending, but records
    after it, left by a run that crashed or was aborted after its last checkpoint, are dropped first
    (TensorBoard purges them too), so a resumed run's logs have no repeated steps.
    `wandb_project`: log to this wandb project too (the `wandb` extra; `WANDB_MODE=offline` works with
    no network), as one wandb run per run dir: its id is kept in `<logdir>/wandb_id`, so a resumed
    run continues it. Every record carries `env_step`, the x-axis of its charts (the device loop
    logs a chunk's episodes after the chunk's metrics, so wandb's own step cannot be the env step).
    `config`: the resolved config, for wandb's run config.
    """

    def __init__(self, logdir: str | Path, tensorboard: bool = True, start_step: int = 0, wandb_project: str = "",
                 config: Mapping[str, Any] | None = None):
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
        self._wandb = _start_wandb(self.logdir, wandb_project, config) if wandb_project else None

    def metrics(self, step: int, values: Mapping[str, Any]) -> None:
        record = {"env_step": int(step), "time": time.time(), **{k: _plain(v) for k, v in values.items()}}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        scalars = {k: v for k, v in record.items() if k not in ("env_step", "time") and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log({"env_step": int(step), **scalars})

    def score(self, step: int, mode: str, episode_return: float, length: int) -> None:
        record = {"env_step": int(step), "mode": mode, "return": float(episode_return), "length": int(length),
                  "time": time.time()}
        self._scores.write(json.dumps(record) + "\n")
        self._scores.flush()
        if self._tb is not None:
            self._tb.add_scalar(f"{mode}/return", float(episode_return), step)
            self._tb.add_scalar(f"{mode}/length", int(length), step)
        if self._wandb is not None:
            self._wandb.log({"env_step": int(step), f"{mode}/return": float(episode_return),
                             f"{mode}/length": int(length)})

    def video(self, step: int, name: str, frames: np.ndarray, fps: int = 10) -> Path:
        """Write a uint8 video `[T, H, W, C]` as `<logdir>/videos/<name>_<step>.mp4` (a `.gif` without
        imageio-ffmpeg), to TensorBoard as an animated GIF (its Images tab) and to wandb.

        **Returns:** the video file's path.
        """
        frames = _rgb(frames)
        path = write_video(self.logdir / "videos" / f"{name.replace('/', '_')}_{int(step):09d}", frames, fps)
        if self._tb is not None:
            from tensorboardX.proto.summary_pb2 import Summary

            t, h, w, c = frames.shape
            image = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=_gif_bytes(frames, fps))
            self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), int(step))
        if self._wandb is not None:
            import wandb

            self._wandb.log({"env_step": int(step), name: wandb.Video(str(path), fps=fps, format=path.suffix[1:])})
        return path

    def close(self) -> None:
        self._metrics.close()
        self._scores.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _rgb(frames: np.ndarray) -> np.ndarray:
    """uint8 `[T, H, W, 3]` from `[T, H, W, 1 or 3]` (grey images repeated; video codecs take RGB)."""
    frames = np.asarray(frames, np.uint8)
    return np.repeat(frames, 3, -1) if frames.shape[-1] == 1 else frames


def _gif_bytes(frames: np.ndarray, fps: int) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", frames, extension=".gif", duration=1000 / fps, loop=0)


def write_video(stem: Path, frames: np.ndarray, fps: int = 10) -> Path:
    """A uint8 video `[T, H, W, C]` to `<stem>.mp4` (imageio with imageio-ffmpeg: H.264), or to
    `<stem>.gif` when imageio-ffmpeg is missing. **Returns:** the path written."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        raise ImportError('videos need imageio: pip install "worldmodels[video]"') from None
    stem.parent.mkdir(parents=True, exist_ok=True)
    frames = _rgb(frames)
    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        path = stem.with_suffix(".mp4")
        imageio.mimwrite(path, frames, format="FFMPEG", fps=fps, macro_block_size=1)
    else:
        path = stem.with_suffix(".gif")
        path.write_bytes(_gif_bytes(frames, fps))
    return path


def _start_wandb(logdir: Path, project: str, config: Mapping[str, Any] | None):
    try:
        import wandb
    except ImportError:
        raise ImportError('--run.wandb needs wandb: pip install "worldmodels[wandb]" (or pip install wandb); '
                          "WANDB_MODE=offline logs without a network, and `wandb sync` uploads later") from None
    id_file = logdir / "wandb_id"
    if not id_file.exists():
        id_file.write_text(secrets.token_hex(8))  # wandb ids: lowercase letters and digits
    run = wandb.init(project=project, id=id_file.read_text().strip(), resume="allow", dir=str(logdir),
                     name=logdir.name, config=dict(config or {}))
    run.define_metric("env_step")
    run.define_metric("*", step_metric="env_step")
    return run


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RecentReturns:
    """The returns of the episodes that ended in the last `window` env steps: what the progress bar,
    the metric `train/return_recent` and a run's summary call the recent return. (A fixed count of
    episodes would reach back to the run's short early episodes once episodes grow long.)
    """

    def __init__(self, window: int):
        self.window = max(int(window), 1)
        self._episodes: collections.deque[tuple[int, float]] = collections.deque()  # (env step at its end, return)
        self._now = 0

    def add(self, env_step: int, episode_return: float) -> None:
        self._now = max(self._now, int(env_step))
        self._episodes.append((int(env_step), float(episode_return)))
        # older episodes can go, but the last one stays: it is reported while no newer one has ended
        while len(self._episodes) > 1 and self._episodes[0][0] <= self._now - self.window:
            self._episodes.popleft()

    def returns(self, env_step: int | None = None) -> list[float]:
        """The returns of the episodes that ended after `env_step` - window (default: the last episode's
        step); if none did, the last episode's return alone; [] before the first episode."""
        now = self._now if env_step is None else int(env_step)
        inside = [r for s, r in self._episodes if s > now - self.window]
        return inside or [r for _, r in list(self._episodes)[-1:]]

    def mean(self, env_step: int | None = None) -> float | None:
        returns = self.returns(env_step)
        return float(np.mean(returns)) if returns else None

    def state(self) -> list[list[float]]:
        """[[env step, return], ...] for a checkpoint's metadata."""
        return [[s, r] for s, r in self._episodes]

    def load(self, saved: list, env_step: int) -> None:
        """Restore `state()`; a list of bare returns (older checkpoints) counts as ending at `env_step`."""
        for item in saved:
            step, ret = (item if isinstance(item, (list, tuple)) else (env_step, item))
            self.add(int(step), float(ret))


def recent_window(steps: int) -> int:
    """The recent return's window for a run of `steps` env steps: its last tenth (at least 1,000)."""
    return max(steps // 10, 1000)


def final_evaluation_report(logger: RunLogger, env_step: int, returns: Sequence[float], lengths: Sequence[int],
                            recent: RecentReturns) -> dict[str, Any]:
    """Log the greedy episodes that end a run as `eval` scores, and print them beside the sampled
    training return. **Returns:** {"eval_return": mean, "eval_returns": [...]}."""
    returns = [float(r) for r in returns]
    for ret, length in zip(returns, lengths):
        logger.score(env_step, "eval", ret, length)
    train = recent.returns(env_step)
    sampled = (f"mean {np.mean(train):.1f} over {len(train)}" if train
               else "none ended in that window")
    print(f"greedy evaluation at env step {env_step}: mean return {np.mean(returns):.1f} (min {min(returns):.1f}, "
          f"max {max(returns):.1f}) over {len(returns)} episodes; training episodes (sampled actions) of the last "
          f"{recent.window} env steps: {sampled}")
    return {"eval_return": float(np.mean(returns)), "eval_returns": returns}
