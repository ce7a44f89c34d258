"""The learning benchmark: named training runs for several seeds, one table of how well they learn.

    python -m experiments.learning                                   # every row, seeds 0 1 2
    python -m experiments.learning --rows default catch --seeds 0 1 2 --root runs/learning
    python -m experiments.learning --list                            # the rows and their commands
    python -m experiments.learning --rows default --plot docs/default_run.png

Each (row, seed) is an `experiments.train` run in its own process, in `<root>/<row>/seed<N>`, one
after the other. It is resumable: a finished run is read, not run again, and an interrupted one
resumes from its last checkpoint (train's own resume). The table gives, per row over its seeds, the
mean and min-max of: the final return (the mean training return, sampled actions, of the episodes
that end in the last tenth of the run's env steps), the best tenth, the greedy evaluation at the end
of the run, the env steps until the recent return (the episodes of the trailing tenth, once a
tenth of the run has passed) first reaches the row's threshold, and the wall time. It is a benchmark, not a test: a row takes minutes
to an hour on a 2-core CPU. `WORLDMODELS_SMOKE_STEPS` (see `experiments.train`) shortens every run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldmodels.logging import RecentReturns, read_jsonl, recent_window


@dataclass(frozen=True)
class Row:
    args: tuple[str, ...]  # experiments.train's arguments, without seed and logdir
    threshold: float  # the recent return that counts as learned
    what: str


ROWS = {
    "default": Row(("--preset", "size1m", "cartpole"), 200.0, "the README's default run: CartPole-v1, size1m, 12k env steps"),
    "catch": Row(("--preset", "size1m", "catch"), 0.8, "bsuite catch/0, size1m, 20k env steps"),
    "memory_len10-r2i": Row(("--preset", "r2i-bsuite-cpu", "--env", "bsuite/memory_len/9", "--run.steps", "25000"),
                            0.8, "bsuite memory_len/9 (memory length 10), R2I CPU preset, 25k env steps"),
    "memory_len10-dreamer": Row(("--preset", "dreamer-bsuite-cpu", "--env", "bsuite/memory_len/9",
                                 "--run.steps", "25000"), 0.8,
                                "bsuite memory_len/9 (memory length 10), DreamerV3 CPU preset, 25k env steps"),
    "memory_len10-ffm": Row(("--preset", "ffm-bsuite-cpu", "--env", "bsuite/memory_len/9", "--run.steps", "25000"),
                            0.8, "bsuite memory_len/9 (memory length 10), FFM CPU preset, 25k env steps"),
    "memory_len10-transformer": Row(("--preset", "transformer-bsuite-cpu", "--env", "bsuite/memory_len/9",
                                     "--run.steps", "25000"), 0.8,
                                    "bsuite memory_len/9 (memory length 10), Transformer CPU preset, 25k env steps"),
    "memory_len10-ffm-device": Row(("--preset", "ffm-bsuite-cpu", "--env", "bsuite/memory_len/9", "--device-loop",
                                    "--run.steps", "25000"), 0.8,
                                   "the memory_len10-ffm row in the device loop"),
    "memory_len10-transformer-device": Row(("--preset", "transformer-bsuite-cpu", "--env", "bsuite/memory_len/9",
                                            "--device-loop", "--run.steps", "25000"), 0.8,
                                           "the memory_len10-transformer row in the device loop"),
    "mjx_cartpole_swingup": Row(("--preset", "dreamer-dmc-cpu", "--env", "mjx/cartpole-swingup", "--device-loop",
                                 "--run.num-envs", "4", "--run.steps", "20000", "--run.eval-every", "5000"), 150.0,
                                "mjx/cartpole-swingup in the device loop, DreamerV3 DMC CPU preset, 4 envs, 20k env steps"),
    "pendulum": Row(("--preset", "size1m", "--env", "gym:Pendulum-v1", "--run.steps", "30000"), -400.0,
                    "gym Pendulum-v1, size1m, 30k env steps"),
}


def run_dir(root: Path, row: str, seed: int) -> Path:
    return root / row / f"seed{seed}"


def train(row: str, seed: int, root: Path) -> Path:
    """Run (or resume, or skip when finished) one seed of a row; its output goes to `train.log`."""
    logdir = run_dir(root, row, seed)
    if (logdir / "result.json").exists():
        return logdir
    logdir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "experiments.train", *ROWS[row].args, "--run.seed", str(seed),
            "--run.logdir", str(logdir), "--run.no-progress"]
    print(f"[{row} seed {seed}] {' '.join(argv[1:])}", flush=True)
    start = time.time()
    with open(logdir / "train.log", "a") as log:
        code = subprocess.call(argv, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    with open(logdir / "calls.jsonl", "a") as calls:  # a resumed run adds its calls' times
        calls.write(json.dumps({"seconds": seconds, "exit": code}) + "\n")
    if code != 0:
        raise SystemExit(f"error: {row} seed {seed} exited with {code}; see {logdir / 'train.log'} "
                         "(run the same command again to resume it)")
    result = summarise(logdir, ROWS[row].threshold)
    (logdir / "result.json").write_text(json.dumps(result, indent=1))
    return logdir


def summarise(logdir: Path, threshold: float) -> dict:
    """One finished run's figures from its `scores.jsonl`, `config.json` and `calls.jsonl`."""
    steps = json.loads((logdir / "config.json").read_text())["run"]["steps"]
    scores = read_jsonl(logdir / "scores.jsonl")
    train = [r for r in scores if r["mode"] == "train"]
    edges = np.linspace(0, steps, 11)
    tenths = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [r["return"] for r in train if lo < r["env_step"] <= hi]
        tenths.append(float(np.mean(inside)) if inside else float("nan"))
    recent, reached = RecentReturns(recent_window(steps)), None
    # episodes that end at one env step (one per env) count together
    for step, ended in itertools.groupby(train, key=lambda r: r["env_step"]):
        for r in ended:
            recent.add(step, r["return"])
        # only after the run's first tenth: before it, a few lucky episodes would count
        if reached is None and step >= steps / 10 and recent.mean() >= threshold:
            reached = step
    last_step = max((r["env_step"] for r in scores), default=0)
    final_eval = [r["return"] for r in scores if r["mode"] == "eval" and r["env_step"] == last_step]
    calls = read_jsonl(logdir / "calls.jsonl")
    return {"steps": steps, "tenths": tenths, "final": tenths[-1], "best": float(np.nanmax(tenths)),
            "greedy_eval": float(np.mean(final_eval)) if final_eval else None, "steps_to_threshold": reached,
            "threshold": threshold, "episodes": len(train), "seconds": sum(c["seconds"] for c in calls)}


def _spread(values: list[float | None], fmt: str = "{:.1f}") -> str:
    known = [v for v in values if v is not None and not np.isnan(v)]
    if not known:
        return "-"
    text = f"{fmt.format(np.mean(known))} [{fmt.format(min(known))}, {fmt.format(max(known))}]"
    return text if len(known) == len(values) else f"{text} ({len(known)}/{len(values)})"


def table(results: dict[str, list[dict]]) -> str:
    """Markdown: per row, mean [min, max] over its seeds."""
    lines = ["| row | seeds | final return (last tenth) | best tenth | final >= half best | greedy eval at end "
             "| env steps to threshold | wall minutes |", "|---|---|---|---|---|---|---|---|"]
    for row, runs in results.items():
        returns = [r[k] for r in runs for k in ("final", "best", "greedy_eval") if r[k] is not None]
        fmt = "{:.2f}" if all(abs(v) < 10 for v in returns) else "{:.1f}"  # bsuite's returns lie in [-1, 1]
        steps = [r["steps_to_threshold"] for r in runs]
        reached = f"{_spread([s for s in steps if s is not None], '{:.0f}')} ({sum(s is not None for s in steps)}/{len(runs)} " \
                  f"reach {runs[0]['threshold']:g})"
        held = sum(r["final"] >= 0.5 * r["best"] for r in runs)
        lines.append(f"| {row} | {len(runs)} | {_spread([r['final'] for r in runs], fmt)} | "
                     f"{_spread([r['best'] for r in runs], fmt)} | {held}/{len(runs)} | "
                     f"{_spread([r['greedy_eval'] for r in runs], fmt)} | {reached} | "
                     f"{_spread([r['seconds'] / 60 for r in runs])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help=f"rows to run: {', '.join(ROWS)}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", default="runs/learning", help="the runs go to <root>/<row>/seed<N>")
    parser.add_argument("--plot", default=None, help="a PNG of the rows' curves: mean and min-max band over seeds")
    parser.add_argument("--list", action="store_true", help="print the rows and their commands, run nothing")
    args = parser.parse_args(argv)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"error: unknown row(s) {', '.join(unknown)}; valid rows: {', '.join(ROWS)}")
    if args.list:
        for name, row in ROWS.items():
            print(f"{name}: {row.what}; threshold {row.threshold:g}\n  python -m experiments.train {' '.join(row.args)}")
        return {}
    root = Path(args.root)
    if os.environ.get("WORLDMODELS_SMOKE_STEPS"):
        print(f"WORLDMODELS_SMOKE_STEPS={os.environ['WORLDMODELS_SMOKE_STEPS']}: smoke runs, not the benchmark")
    results = {row: [json.loads((train(row, seed, root) / "result.json").read_text()) for seed in args.seeds]
               for row in args.rows}
    print(table(results))
    if args.plot:
        from experiments.curve import load_runs, plot_curves

        groups = {row: load_runs([str(run_dir(root, row, s)) for s in args.seeds]) for row in args.rows}
        print(f"saved {plot_curves(groups, args.plot, bins=10, band='minmax')}")
    return results


if __name__ == "__main__":
    main()
