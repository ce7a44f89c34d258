"""Learning curves from `scores.jsonl`: print key points and draw a PNG.

    python -m experiments.curve runs/default [runs/other ...] [--bins 10] [--mode train] [--out curve.png]

Each run's episode returns are averaged in `--bins` equal env-step bins; several runs (e.g. seeds)
are drawn as their mean with a min-max band.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from worldmodels.logging import read_jsonl


def binned(records: list[dict], bins: int, max_step: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin end steps [bins], mean return per bin [bins], NaN where a bin has no episode)."""
    edges = np.linspace(0, max_step, bins + 1)
    steps = np.array([r["env_step"] for r in records])
    returns = np.array([r["return"] for r in records])
    means = np.full(bins, np.nan)
    for i in range(bins):
        inside = (steps > edges[i]) & (steps <= edges[i + 1])
        if inside.any():
            means[i] = returns[inside].mean()
    return edges[1:], means


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--mode", default="train", choices=["train", "eval"])
    parser.add_argument("--last", type=int, default=100, help="episodes in the final mean")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run>/curve.png)")
    args = parser.parse_args(argv)

    runs = {run: [r for r in read_jsonl(Path(run) / "scores.jsonl") if r["mode"] == args.mode] for run in args.runs}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        raise SystemExit(f"no {args.mode} episodes in {args.runs}")
    max_step = max(r[-1]["env_step"] for r in runs.values())
    curves = []
    for run, records in runs.items():
        ends, means = binned(records, args.bins, max_step)
        curves.append(means)
        last = [r["return"] for r in records[-args.last:]]
        print(f"{run}: {len(records)} episodes; mean return of the first {min(args.last, len(records))}: "
              f"{np.mean([r['return'] for r in records[:args.last]]):.2f}, of the last {len(last)}: "
              f"{np.mean(last):.2f}")
        print("  env step  " + " ".join(f"{int(e):>8d}" for e in ends))
        print("  return    " + " ".join(f"{m:>8.2f}" for m in means))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = np.array(curves)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ends, np.nanmean(curves, 0), label=f"mean of {len(curves)} run(s)")
    if len(curves) > 1:
        ax.fill_between(ends, np.nanmin(curves, 0), np.nanmax(curves, 0), alpha=0.3)
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"{args.mode} episode return")
    ax.legend()
    ax.grid(alpha=0.3)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
