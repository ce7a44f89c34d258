"""Which memory holds which horizon: a grid of training runs that tells short- from long-term memory.

    python -m experiments.memory --list                      # the grid's cells and their commands
    python -m experiments.memory --models ffm --seeds 0      # run (or resume) those cells
    python -m experiments.memory --table                     # the table and plot, from the JSON files alone

A cell is one training run: (sequence model, task, correlation horizon xi, replay-context setting,
seed), an `experiments.train` run in the device loop in `<root>/<cell>/`, resumable (run the same
command again). A finished cell writes one small JSON to `--results` (committed under
`docs/results/memory/`), so that a grid accumulates across machines and sessions; `--table` reads
those files only. Each cell is labelled short-term (xi <= K) or long-term (xi > K) by `memory_label`
from its own training window T, attention window W and replay-context switch (Cherepanov et al.
2024: K is the context the model processes at once).

The tasks (reward +1 for the right choice, -1 for the wrong one, once an episode; success = an
episode with a positive return): `tmaze` (the Passive T-Maze, corridor L = xi - 1: `tmaze/<L>`) and
`tmaze-variable` (each episode draws L in [1, xi - 1]: xi varies over [2, xi]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldmodels.logging import read_jsonl

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "memory"
PRESETS = {"rssm": "dreamer-bsuite-cpu", "s3m": "r2i-bsuite-cpu", "ffm": "ffm-bsuite-cpu",
           "transformer": "transformer-bsuite-cpu"}


@dataclass(frozen=True)
class MemoryLabel:
    """What a cell tests. `context`: K, the steps the model processes at once with gradients (T; for
    attention min(T, W)); `kind`: "short-term" (xi <= K) or "long-term" (xi > K); `bridge`: what
    could carry the cue over xi steps when it is long-term ("" when short-term)."""

    context: int
    kind: str
    bridge: str


def memory_label(xi: int, seq_len: int, window: int | None, replay_context: bool) -> MemoryLabel:
    """Label a cell from its run's own settings.

    **Arguments:** `xi`: the task's correlation horizon (steps from the cue to the step whose reward
    depends on it); `seq_len`: T, the replayed window trained with gradients; `window`: W, the
    attention window of a Transformer (None for recurrent models, whose state has no such limit);
    `replay_context`: whether each window starts from the stored latent of the step before it.

    **Returns:** the `MemoryLabel`: long-term cells are bridged by the replay-context carry (no
    gradient across windows), by the recurrent state alone (acting carries it, training never did
    across windows), or by nothing (attention sees only W steps: the cue is out of reach).
    """
    if xi < 1 or seq_len < 1 or (window is not None and window < 1):
        raise ValueError(f"xi, seq_len and window must be >= 1 (got {xi}, {seq_len}, {window})")
    context = seq_len if window is None else min(seq_len, window)
    if xi <= context:
        return MemoryLabel(context, "short-term", "")
    if window is not None and xi > window:
        return MemoryLabel(context, "long-term", "none: beyond the attention window")
    if replay_context:
        return MemoryLabel(context, "long-term", "replay-context carry")
    return MemoryLabel(context, "long-term", "recurrent state only")


@dataclass(frozen=True)
class Cell:
    model: str  # rssm, s3m, ffm, transformer
    task: str  # tmaze, tmaze-variable
    xi: int
    replay_context: bool
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.task}-xi{self.xi}-{'ctx' if self.replay_context else 'noctx'}-seed{self.seed}"

    @property
    def env(self) -> str:
        return f"tmaze/{self.xi - 1}" if self.task == "tmaze" else f"tmaze/1-{self.xi - 1}"


@dataclass(frozen=True)
class Grid:
    """The cells' shared settings: T, the env-step budget, the train ratio, the xi values."""

    seq_len: int = 32
    steps: int = 20_000
    train_ratio: float = 128.0
    xis: tuple[int, ...] = (8, 24, 48, 96)
    tasks: tuple[str, ...] = ("tmaze",)

    def cells(self, models, seeds) -> list[Cell]:
        out = []
        for model in models:
            for task in self.tasks:
                for xi in self.xis:
                    # Replay context on and off where it can matter (past T); the Transformer keeps none.
                    settings = [False] if model == "transformer" else ([True, False] if xi > self.seq_len else [True])
                    out += [Cell(model, task, xi, ctx, seed) for ctx in settings for seed in seeds]
        return out

    def args(self, cell: Cell) -> list[str]:
        """`experiments.train`'s arguments for a cell (without its logdir)."""
        args = ["--preset", PRESETS[cell.model], "--env", cell.env, "--device-loop", "--run.seed", str(cell.seed),
                "--run.steps", str(self.steps), "--run.seq-len", str(self.seq_len),
                "--run.train-ratio", str(self.train_ratio)]
        if cell.model != "transformer":
            args.append("--run.replay-context" if cell.replay_context else "--run.no-replay-context")
        return args


GRIDS = {"cpu": Grid(), "cpu-variable": Grid(tasks=("tmaze-variable",))}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summarise_cell(cell: Cell, grid: Grid, logdir: Path, seconds: float) -> dict:
    """A finished cell's figures from its run's files: success (the share of episodes with a positive
    return) over the last tenth of its env steps and the best tenth, the greedy evaluation at the
    end, the env steps until the trailing tenth first reaches 90% success, the wall time."""
    config = json.loads((logdir / "config.json").read_text())
    window = config["agent"]["world_model"]["sequence"]["transformer"]["window"] if cell.model == "transformer" else None
    label = memory_label(cell.xi, config["run"]["seq_len"], window, config["run"]["replay_context"])
    scores = read_jsonl(logdir / "scores.jsonl")
    train = [r for r in scores if r["mode"] == "train"]
    steps = config["run"]["steps"]  # the grid's budget, or a smoke run's
    edges = np.linspace(0, steps, 11)
    tenths = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [r["return"] > 0 for r in train if lo < r["env_step"] <= hi]
        tenths.append(float(np.mean(inside)) if inside else None)
    reached, span = None, steps / 10
    for r in train:
        recent = [q["return"] > 0 for q in train if r["env_step"] - span < q["env_step"] <= r["env_step"]]
        if r["env_step"] >= span and np.mean(recent) >= 0.9:
            reached = r["env_step"]
            break
    last = max((r["env_step"] for r in scores), default=0)
    greedy = [r["return"] > 0 for r in scores if r["mode"] == "eval" and r["env_step"] == last]
    known = [t for t in tenths if t is not None]
    return {**dataclasses.asdict(cell), "env": cell.env, "seq_len": config["run"]["seq_len"], "window": window,
            "label": dataclasses.asdict(label), "steps": steps, "train_ratio": config["run"]["train_ratio"],
            "success_tenths": tenths, "final": tenths[-1], "best": max(known) if known else None,
            "greedy_success": float(np.mean(greedy)) if greedy else None, "steps_to_90": reached,
            "episodes": len(train), "seconds": seconds, "commit": commit()}


def run_cell(cell: Cell, grid: Grid, root: Path, results: Path) -> dict:
    """Run (or resume, or read when its JSON exists) one cell."""
    out = results / f"{cell.name}.json"
    if out.exists():
        return json.loads(out.read_text())
    logdir = root / cell.name
    logdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "experiments.train", *grid.args(cell), "--run.logdir", str(logdir),
            "--run.no-progress"]
    print(f"[{cell.name}] {' '.join(argv[1:])}", flush=True)
    start = time.time()
    with open(logdir / "train.log", "a") as log:
        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"error: cell {cell.name} exited with {code}; see {logdir / 'train.log'} "
                         "(run the same command again to resume it)")
    result = summarise_cell(cell, grid, logdir, time.time() - start)
    results.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _spread(values) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    text = f"{np.mean(known):.2f} [{min(known):.2f}, {max(known):.2f}]"
    return text if len(known) == len(values) else f"{text} ({len(known)}/{len(values)})"


def load_results(results: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob("*.json"))]


def table(cells: list[dict]) -> str:
    """Markdown: one line per (model, task, xi, replay context), success mean [min, max] over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["model"], c["task"], c["xi"], c["replay_context"]), []).append(c)
    lines = ["| model | task | xi | T | W | replay context | label | seeds | success, last tenth | best tenth "
             "| greedy success | env steps to 90% | minutes |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(groups, key=lambda k: (list(PRESETS).index(k[0]), k[1], k[2], not k[3])):
        runs = groups[key]
        first = runs[0]
        label = f"{first['label']['kind']}" + (f" ({first['label']['bridge']})" if first["label"]["bridge"] else "")
        steps = [r["steps_to_90"] for r in runs]
        reached = f"{sum(s is not None for s in steps)}/{len(runs)}" + (
            f": {min(s for s in steps if s is not None)}-{max(s for s in steps if s is not None)}"
            if any(s is not None for s in steps) else "")
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {first['seq_len']} | {first['window'] or '-'} | "
                     f"{'on' if key[3] else 'off'} | {label} | {', '.join(str(r['seed']) for r in runs)} | "
                     f"{_spread([r['final'] for r in runs])} | {_spread([r['best'] for r in runs])} | "
                     f"{_spread([r['greedy_success'] for r in runs])} | {reached} | "
                     f"{_spread([r['seconds'] / 60 for r in runs])} |")
    return "\n".join(lines)


def plot(cells: list[dict], out: Path) -> Path:
    """Success (last tenth) vs xi per model and replay-context setting, mean and min-max over seeds,
    with each model's T (and W) marked on the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    lines: dict[tuple, dict[int, list[float]]] = {}
    for c in cells:
        if c["final"] is not None:
            lines.setdefault((c["model"], c["task"], c["replay_context"]), {}).setdefault(c["xi"], []).append(c["final"])
    for (model, task, ctx), by_xi in sorted(lines.items()):
        xs = sorted(by_xi)
        mean = [np.mean(by_xi[x]) for x in xs]
        line, = ax.plot(xs, mean, marker="o", label=f"{model}, {task}, replay context {'on' if ctx else 'off'}")
        ax.fill_between(xs, [min(by_xi[x]) for x in xs], [max(by_xi[x]) for x in xs], alpha=0.2,
                        color=line.get_color())
    for value, name in sorted({(c["seq_len"], "T") for c in cells} | {(c["window"], "W") for c in cells if c["window"]}):
        ax.axvline(value, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(f"{name} = {value}", (value, 1.02), fontsize=8, ha="center")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("correlation horizon xi (steps from the cue to its reward)")
    ax.set_ylabel("success, last tenth of the run")
    ax.set_ylim(-0.02, 1.08)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", default="cpu", choices=list(GRIDS))
    parser.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--xis", nargs="+", type=int, default=None, help="only these xi values of the grid")
    parser.add_argument("--root", default="runs/memory", help="the cells' runs go to <root>/<cell>")
    parser.add_argument("--results", default=str(RESULTS), help="one JSON per finished cell")
    parser.add_argument("--table", action="store_true", help="only print the table and draw the plot from --results")
    parser.add_argument("--plot", default=None, help="the plot's PNG (default: <results>/success_vs_xi.png)")
    parser.add_argument("--list", action="store_true", help="print the cells and their commands, run nothing")
    args = parser.parse_args(argv)
    grid = GRIDS[args.grid]
    if args.xis:
        unknown = sorted(set(args.xis) - set(grid.xis))
        if unknown:
            raise SystemExit(f"error: --xis {unknown}: not in the {args.grid} grid's {list(grid.xis)}")
        grid = dataclasses.replace(grid, xis=tuple(args.xis))
    results = Path(args.results)
    cells = grid.cells(args.models, args.seeds)
    if args.list:
        for cell in cells:
            print(f"{cell.name}: python -m experiments.train {' '.join(grid.args(cell))}")
        return []
    if not args.table:
        if os.environ.get("WORLDMODELS_SMOKE_STEPS"):
            print(f"WORLDMODELS_SMOKE_STEPS={os.environ['WORLDMODELS_SMOKE_STEPS']}: smoke runs, not the benchmark")
        for cell in cells:
            run_cell(cell, grid, Path(args.root), results)
    done = load_results(results)
    if not done:
        raise SystemExit(f"error: no finished cells in {results}: run some first (python -m experiments.memory --list)")
    print(table(done))
    print(f"saved {plot(done, Path(args.plot) if args.plot else results / 'success_vs_xi.png')}")
    return done


if __name__ == "__main__":
    main()
