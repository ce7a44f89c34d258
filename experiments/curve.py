"""Learning curves from `scores.jsonl`: print key points and draw a PNG.

    python -m experiments.curve runs/default [runs/other ...] [--bins 10] [--mode train] [--out curve.png]
    python -m experiments.curve --group r2i runs/r2i-s0 runs/r2i-s1 --group dreamer runs/dv3-s0 runs/dv3-s1 \\
        [--band std] [--out compare.png]

Each run's episode returns are averaged in `--bins` equal env-step bins (the same bins for every
run, up to the largest env step of any run). The runs of a group (e.g. the seeds of one agent) are
drawn as one line, their mean per bin, with a shaded band over the runs: min-max (the default),
one standard deviation (`--band std`), the standard error (`--band sem`) or none. Positional runs
form one group; `--group NAME RUN [RUN ...]` (repeatable) adds named groups.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

from worldmodels.logging import read_jsonl

BANDS = ("minmax", "std", "sem", "none")


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


def load_runs(runs: list[str], mode: str = "train") -> dict[str, list[dict]]:
    """Run directory -> its `mode` episodes from `<run>/scores.jsonl` (runs without any are left out).

    **Raises:** `FileNotFoundError` naming the run without a `scores.jsonl`.
    """
    out = {}
    for run in runs:
        path = Path(run) / "scores.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist: pass run directories written by experiments.train")
        records = [r for r in read_jsonl(path) if r["mode"] == mode]
        if records:
            out[run] = records
    return out


def group_curve(runs: dict[str, list[dict]], bins: int, max_step: int,
                band: str = "minmax") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One group's curve over its runs.

    **Returns:** (bin end steps [bins], mean [bins], band low [bins], band high [bins]); NaN where no
    run has an episode in a bin. With one run (or `band` "none") the band is the mean itself.
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, got {band!r}")
    curves = np.array([binned(records, bins, max_step)[1] for records in runs.values()])  # [runs, bins]
    ends = np.linspace(0, max_step, bins + 1)[1:]
    with warnings.catch_warnings():  # all-NaN bins stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(curves, 0)
        if band == "minmax":
            low, high = np.nanmin(curves, 0), np.nanmax(curves, 0)
        elif band in ("std", "sem"):
            spread = np.nanstd(curves, 0)
            if band == "sem":
                spread = spread / np.sqrt(np.maximum(np.sum(~np.isnan(curves), 0), 1))
            low, high = mean - spread, mean + spread
        else:
            low = high = mean
    return ends, mean, low, high


def plot_curves(groups: dict[str, dict[str, list[dict]]], out: str | Path, bins: int = 10, band: str = "minmax",
                ylabel: str = "train episode return", title: str | None = None) -> Path:
    """Draw one line (mean over its runs) with a shaded band per group, return vs env steps, as a PNG.

    **Arguments:** `groups`: group name -> (run -> episode records with ``env_step`` and ``return``);
    `band`: one of `BANDS`.

    **Returns:** the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    max_step = max(r[-1]["env_step"] for runs in groups.values() for r in runs.values())
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (name, runs) in enumerate(groups.items()):
            ends, mean, low, high = group_curve(runs, bins, max_step, band)
            ok = ~np.isnan(mean)
            ax.plot(ends[ok], mean[ok], color=f"C{i}", label=legend_label(name, len(runs), band))
            if len(runs) > 1 and band != "none":
                ax.fill_between(ends[ok], low[ok], high[ok], color=f"C{i}", alpha=0.25, linewidth=0)
        ax.set_xlabel("environment steps")
        ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
    return save_png(fig, out)


def legend_label(name: str, runs: int, band: str) -> str:
    """A group's legend entry: its name, and for several runs how many and what the band shows."""
    if runs == 1:
        return f"{name} (1 run)"
    shaded = {"minmax": ", min-max band", "std": ", ±1 std band", "sem": ", ±1 s.e.m. band", "none": ""}[band]
    return f"{name} (mean of {runs} runs{shaded})"


def save_png(fig, out: str | Path) -> Path:
    """Write a matplotlib figure to `out` (parent folders created), close it, return the path."""
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run directories, drawn as one group")
    parser.add_argument("--group", nargs="+", action="append", default=[], metavar=("NAME", "RUN"),
                        help="a named group of runs (e.g. seeds): NAME RUN [RUN ...]; repeatable")
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--mode", default="train", choices=["train", "eval"])
    parser.add_argument("--band", default="minmax", choices=BANDS, help="shaded band over a group's runs")
    parser.add_argument("--title", default=None)
    parser.add_argument("--out", default=None, help="PNG path (default: <first run>/curve.png)")
    args = parser.parse_args(argv)

    named: dict[str, list[str]] = {}
    if args.runs:
        named[Path(args.runs[0]).name if len(args.runs) == 1 else "runs"] = args.runs
    for group in args.group:
        if len(group) < 2:
            raise SystemExit(f"error: --group needs a name and at least one run, got {group}")
        named[group[0]] = group[1:]
    if not named:
        raise SystemExit("error: give run directories, or --group NAME RUN [RUN ...]")

    groups = {}
    for name, runs in named.items():
        loaded = load_runs(runs, args.mode)
        if loaded:
            groups[name] = loaded
    if not groups:
        raise SystemExit(f"no {args.mode} episodes in {[r for runs in named.values() for r in runs]}")
    max_step = max(r[-1]["env_step"] for runs in groups.values() for r in runs.values())
    for name, runs in groups.items():
        if len(groups) > 1:
            print(f"[{name}]")
        for run, records in runs.items():
            ends, means = binned(records, args.bins, max_step)
            # the last bin's episodes: a count of episodes would reach back to the short early ones
            last = [r["return"] for r in records if r["env_step"] > max_step * (1 - 1 / args.bins)]
            print(f"{run}: {len(records)} episodes; mean return in the first bin {means[0]:.2f}, in the last bin "
                  f"{np.mean(last) if last else float('nan'):.2f} ({len(last)} episodes)")
            print("  env step  " + " ".join(f"{int(e):>8d}" for e in ends))
            print("  return    " + " ".join(f"{m:>8.2f}" for m in means))

    first_run = next(iter(named.values()))[0]
    out = Path(args.out) if args.out else Path(first_run) / "curve.png"
    path = plot_curves(groups, out, args.bins, args.band, ylabel=f"{args.mode} episode return", title=args.title)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
