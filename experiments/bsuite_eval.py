"""Score bsuite runs with bsuite's own analysis code, per experiment and per id, and plot success.

    python -m experiments.bsuite_eval RESULTS_DIR [RESULTS_DIR ...] [--labels NAME ...] [--plot out.png]

A results directory holds the CSV files that bsuite's logger writes (one per bsuite id), e.g. what
``envs.make("bsuite/<id>", results_dir=DIR)`` records or what `experiments.bsuite_sweep` writes.
Several directories are several runs (seeds); runs with the same label (``--labels``, default: one
label per directory) are averaged in the success plot.

What is computed (all from bsuite's own code: `bsuite.logging.csv_load.load_bsuite` to read,
`bsuite.experiments.summary_analysis.bsuite_score` and each experiment's ``analysis.score``):

* Experiment score (`experiment_scores`): bsuite's score of each run on each experiment, e.g.
  memory_len: the fraction of memory lengths whose regret ratio is < 0.75; discounting_chain:
  clip(1 - 10 * (1.1 - mean return), 0, 1). `finished` says whether every id reached bsuite's
  episode count (memory_len 10,000, discounting_chain 1,000, catch 10,000).
* Per id (`per_id`): ``id_score``, bsuite's experiment score computed on that id's rows alone.
  This is the per-setting "success" the plot shows:
  - memory_len / memory_size: 1 if the id's regret ratio is < 0.75 (bsuite's ``LEARNING_THRESH``),
    else 0. bsuite's regret ratio is (episodes - correct episodes) / (0.5 * episodes) over the
    WHOLE run (a random agent scores 1.0, a perfect one 0.0), so success means more than 62.5% of
    all episodes answered correctly. The success rate at a memory length is the fraction of runs
    (seeds) that succeed there, and bsuite's memory_len score is the mean success over lengths.
    The table also gives ``accuracy`` (fraction correct over the run) and ``final_accuracy``
    (fraction correct between the last two logged episodes: the latest policy).
  - discounting_chain: the run's fraction of episodes that took the bonus chain (returns are 1.0
    or 1.1, so bsuite's clip(1 - 10 * (1.1 - mean return)) is that fraction); grouped by the reward
    delay of the bonus chain, (1, 3, 10, 30, 100)[mapping_seed % 5], as R2I plots it.
  - any other experiment: bsuite's score of that id alone.
  We read R2I's "success rate" this way because the paper's figure matches it (a random agent is at
  0 on memory_len, and a myopic one at 0 on long discounting chains); its exact formula is not
  published with the figure.
* Partial runs: bsuite scores a run at its last logged episode (capped at the experiment's episode
  count), so a short run is scored on the episodes it has. bsuite logs at episodes 1-10, 12, 14,
  17, 20, 25, 30, 40, ... (log spaced), so the last few episodes after a log point are not counted.
"""

from __future__ import annotations

import argparse
import importlib
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from experiments.curve import save_png

# bsuite's memory threshold (bsuite.experiments.memory_len.analysis.LEARNING_THRESH), restated for
# the docs; the scores themselves come from bsuite's functions.
MEMORY_REGRET_THRESHOLD = 0.75
DISCOUNTING_HORIZONS = (1, 3, 10, 30, 100)  # reward delay of chain k (bsuite's _HORIZONS)
MEMORY_EXPERIMENTS = ("memory_len", "memory_size")
# The swept variable of an experiment, the x axis of its success plot.
SETTING_COLUMN = {"memory_len": "memory_length", "memory_size": "num_bits",
                  "discounting_chain": "reward_delay"}


def _analysis(experiment: str):
    """bsuite's analysis module of `experiment` (its `score` and `NUM_EPISODES`)."""
    return importlib.import_module(f"bsuite.experiments.{experiment}.analysis")


def load(runs: str | Sequence[str] | Mapping[str, str | Sequence[str]]) -> pd.DataFrame:
    """Read bsuite CSV results with `bsuite.logging.csv_load.load_bsuite`.

    **Arguments:**
    - `runs`: one results directory, several (one run each), or label -> directory(ies): runs under
      one label (e.g. seeds of one agent) are averaged in `success_by_setting`.

    **Returns:** bsuite's DataFrame (one row per logged episode count per id, joined with the
    sweep settings), with ``agent_name`` = the run's directory and ``label`` = its label.

    **Raises:** `FileNotFoundError` when a directory holds no bsuite CSV.
    """
    from bsuite.logging import csv_load

    if isinstance(runs, (str, Path)):
        runs = [str(runs)]
    if not isinstance(runs, Mapping):
        runs = {str(d): str(d) for d in runs}
    labels = {}
    for label, dirs in runs.items():
        for d in [dirs] if isinstance(dirs, (str, Path)) else dirs:
            if not list(Path(d).glob("bsuite_id_-_*.csv")):
                raise FileNotFoundError(f"No bsuite CSV files (bsuite_id_-_*.csv) in {d}: record runs with "
                                        f"envs.make('bsuite/<id>', results_dir=...) or experiments.bsuite_sweep.")
            labels[str(d)] = str(label)
    df, _ = csv_load.load_bsuite({d: d for d in labels})
    df["label"] = df["agent_name"].map(labels)
    return df


def experiment_scores(df: pd.DataFrame) -> pd.DataFrame:
    """bsuite's score per run and experiment (`summary_analysis.bsuite_score` by ``agent_name``).

    **Returns:** columns agent_name, label, bsuite_env, score, finished, ids (how many ids the run
    has for the experiment), episodes (the fewest episodes any of those ids was scored at).
    """
    from bsuite.experiments import summary_analysis

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        scores = summary_analysis.bsuite_score(df, ["agent_name"])
    scores = scores.drop(columns=[c for c in scores.columns if c.startswith("level_")])
    ids = per_id(df)
    extra = ids.groupby(["agent_name", "bsuite_env"]).agg(ids=("bsuite_id", "size"), episodes=("episodes", "min"))
    scores = scores.merge(extra.reset_index(), on=["agent_name", "bsuite_env"])
    scores["label"] = scores["agent_name"].map(df.groupby("agent_name")["label"].first())
    return scores[["label", "agent_name", "bsuite_env", "score", "finished", "ids", "episodes"]]


def _window_rate(rows: pd.DataFrame, column: str) -> float:
    """Per-episode rate of a cumulative column between the last two logged episodes."""
    if len(rows) < 2:
        return float(rows[column].iloc[-1] / rows["episode"].iloc[-1])
    last, before = rows.iloc[-1], rows.iloc[-2]
    return float((last[column] - before[column]) / (last["episode"] - before["episode"]))


def per_id(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run and bsuite id: bsuite's score of the id alone and what it is made of.

    **Returns:** columns label, agent_name, bsuite_env, bsuite_id, setting (the swept variable:
    memory_length, num_bits, reward_delay, else the id's number), episodes (the episode count the
    id is scored at), mean_return (over those episodes), final_return (mean episode return between
    the last two logged episodes), id_score, and for memory experiments accuracy, final_accuracy,
    regret_ratio. Sorted by run, experiment and setting.
    """
    rows = []
    for (agent, bsuite_id), sub in df.groupby(["agent_name", "bsuite_id"], sort=False):
        experiment = sub["bsuite_env"].iloc[0]
        analysis = _analysis(experiment)
        n_eps = int(min(sub["episode"].max(), analysis.NUM_EPISODES))
        scored = sub[sub["episode"] <= n_eps].sort_values("episode")
        last = scored.iloc[-1]
        row = {"label": sub["label"].iloc[0] if "label" in sub else agent, "agent_name": agent,
               "bsuite_env": experiment, "bsuite_id": bsuite_id, "episodes": n_eps,
               "mean_return": float(last["total_return"] / n_eps),
               "final_return": _window_rate(scored, "total_return")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
            row["id_score"] = float(analysis.score(sub))
        if experiment in MEMORY_EXPERIMENTS:
            row["setting"] = int(last[SETTING_COLUMN[experiment]])
            row["accuracy"] = float(last["total_perfect"] / n_eps)
            row["final_accuracy"] = _window_rate(scored, "total_perfect")
            row["regret_ratio"] = 2.0 * (1.0 - row["accuracy"])  # bsuite's memory_preprocess
        elif experiment == "discounting_chain":
            row["setting"] = DISCOUNTING_HORIZONS[int(last["mapping_seed"]) % len(DISCOUNTING_HORIZONS)]
        else:
            row["setting"] = int(bsuite_id.split("/")[-1])
        rows.append(row)
    out = pd.DataFrame(rows)
    return out.sort_values(["label", "agent_name", "bsuite_env", "setting"], kind="stable").reset_index(drop=True)


def success_by_setting(ids: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """Success rate per label and setting: the mean `id_score` over runs (and ids) of one experiment.

    **Arguments:** `ids`: `per_id`'s table; `experiment`: e.g. ``"memory_len"``.

    **Returns:** columns label, setting, success_rate, runs, episodes (fewest), and for memory
    experiments final_accuracy (mean over runs).
    """
    sub = ids[ids["bsuite_env"] == experiment]
    if sub.empty:
        raise ValueError(f"No {experiment} results; experiments present: {sorted(ids['bsuite_env'].unique())}.")
    aggs = {"success_rate": ("id_score", "mean"), "runs": ("agent_name", "nunique"), "episodes": ("episodes", "min")}
    if "final_accuracy" in sub and sub["final_accuracy"].notna().any():
        aggs["final_accuracy"] = ("final_accuracy", "mean")
    return sub.groupby(["label", "setting"]).agg(**aggs).reset_index()


def plot_success(ids: pd.DataFrame, experiment: str, out: str | Path, title: str | None = None) -> Path:
    """Draw the R2I-style success-rate plot of one experiment as a PNG (matplotlib; bsuite's own
    plotnine plots break with current pandas).

    One line per label: success rate (see the module docstring) against the swept setting (memory
    length, reward delay, ...); for memory experiments also the accuracy of the latest episodes
    (dotted), whose chance level is 0.5.

    **Returns:** the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = success_by_setting(ids, experiment)
    # bsuite's plotting module switches matplotlib to its own global style on import: draw in the default.
    with plt.style.context("default"):
        fig, ax = plt.subplots(figsize=(6, 4))
        groups = list(table.groupby("label", sort=False))
        for i, (label, sub) in enumerate(groups):
            color, marker = f"C{i}", "osD^v<>"[i % 7]
            size = 4 + 3 * (len(groups) - 1 - i)  # earlier labels drawn larger: equal values stay visible
            runs = int(sub["runs"].max())
            ax.plot(sub["setting"], sub["success_rate"], "-", marker=marker, markersize=size, color=color,
                    label=f"{label} ({runs} run(s))")
            if "final_accuracy" in sub:
                ax.plot(sub["setting"], sub["final_accuracy"], ":", marker=marker, markersize=size, color=color,
                        alpha=0.6, fillstyle="none", label=f"{label}: accuracy of the latest episodes")
        xlabel = {"memory_length": "memory length", "num_bits": "number of bits",
                  "reward_delay": "reward delay of the bonus chain"}.get(SETTING_COLUMN.get(experiment, ""),
                                                                         "bsuite id")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("success rate")
        ax.set_ylim(-0.05, 1.05)
        if experiment == "discounting_chain":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        episodes = int(table["episodes"].min())
        ax.set_title(title or f"bsuite {experiment}\n(scored at >= {episodes} episodes per id)", fontsize=10)
        fig.tight_layout()
    return save_png(fig, out)


def format_table(table: pd.DataFrame, floats: str = "{:.3f}") -> str:
    """A plain-text table (no extra dependency): one line per row, columns padded."""
    cells = [[str(c) for c in table.columns]]
    for _, row in table.iterrows():
        cells.append([floats.format(v) if isinstance(v, float) and not math.isnan(v) else str(v) for v in row])
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def report(df: pd.DataFrame) -> str:
    """The per-id table and the experiment scores, as text."""
    ids = per_id(df)
    columns = [c for c in ("label", "bsuite_id", "setting", "episodes", "mean_return", "final_return", "accuracy",
                           "final_accuracy", "regret_ratio", "id_score") if c in ids]
    return (f"per id (id_score: bsuite's score of the id alone)\n{format_table(ids[columns])}\n\n"
            f"bsuite scores\n{format_table(experiment_scores(df).drop(columns='agent_name'))}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", help="bsuite results directories (one run each)")
    parser.add_argument("--labels", nargs="+", default=None, help="one label per directory (same label: seeds)")
    parser.add_argument("--plot", default=None, help="PNG path; one file per experiment: <stem>-<experiment>.png "
                                                      "when the results hold several")
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.results):
        raise SystemExit(f"--labels needs one label per results directory ({len(args.results)}), "
                         f"got {len(args.labels)}")
    runs: dict[str, list[str]] = {}
    for d, label in zip(args.results, args.labels or args.results):
        runs.setdefault(label, []).append(d)
    df = load(runs)
    print(report(df))
    if args.plot:
        ids = per_id(df)
        experiments = list(ids["bsuite_env"].unique())
        for experiment in experiments:
            out = Path(args.plot)
            if len(experiments) > 1:
                out = out.with_name(f"{out.stem}-{experiment}{out.suffix}")
            print(f"saved {plot_success(ids, experiment, out)}")


if __name__ == "__main__":
    main()
