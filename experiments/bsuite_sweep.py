"""Run the agent over the ids of a bsuite experiment, record bsuite CSVs and score them with bsuite.

    python -m experiments.bsuite_sweep --experiment memory_len [--ids 0 4 9 | --ids memory_len/3 ...]
        [--preset NAME ...] [--model rssm|s3m] (--steps N | --episodes N) [--seeds 0 1 2]
        [--out runs/bsuite] [--label NAME] [--score-only] [any experiments.train option, e.g. --run.train-ratio 64]

For every seed and id this trains a fresh agent with `worldmodels.loop.run`, configured as
`python -m experiments.train --preset ... --env bsuite/<id>` would be (the extra options go to
`experiments.train.parse`), with its training env recording bsuite's CSV log. Then every run under
`--out` is scored by bsuite's own analysis code (`experiments.bsuite_eval`) and a table, the success
plot per experiment (`success-<experiment>.png`), `per_id.csv` and `scores.csv` are written there.

Budget per id: `--steps` env steps (as `--run.steps` counts them), or `--episodes` bsuite episodes,
turned into steps from the id's episode length (measured on one episode of action 0; exact for
memory_len, memory_size, discounting_chain and catch, whose episodes have a fixed length). The
host loop spends one extra env step per episode on the reset (NEXT_STEP autoreset), so an episode
of L steps costs L + 1. bsuite's own protocol is 10,000 episodes per memory_len id and 1,000 per
discounting_chain id; shorter runs are scored at their last logged episode (see bsuite_eval).

Layout under `--out` (several labels, e.g. models, can share one `--out` and are compared):
    <label>/seed<k>/csv/bsuite_id_-_<id>.csv    bsuite's log: one results directory per run (seed)
    <label>/seed<k>/runs/<id>/                  the training run (config.json, scores.jsonl, ...)
    <label>/seed<k>/runs/<id>/done.json         written when the id's run finished; a rerun skips it
Runs are resumable: an interrupted id continues from its checkpoint (and its CSV log) on a rerun.

Examples:
    python -m experiments.bsuite_sweep --experiment memory_len --ids 0 4 --preset debug --steps 300
    python -m experiments.bsuite_sweep --experiment memory_len --ids 9 15 --preset r2i-bsuite-cpu \\
        --episodes 2000 --seeds 0 1 2 --out runs/bsuite --label r2i
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported (see experiments/hugepages.py)
    from experiments.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

import gymnasium
from bsuite.utils import wrappers as bsuite_wrappers

import envs
from experiments import bsuite_eval

DEFAULT_OUT = "runs/bsuite"


def experiment_ids(experiment: str, ids: list[str] | None = None) -> list[str]:
    """The bsuite ids to run: all of `experiment`'s (in sweep order) or the chosen ones.

    **Arguments:** `ids`: numbers (``"3"``) or full ids (``"memory_len/3"``); None for all.

    **Raises:** `SystemExit` naming the valid experiments or ids.
    """
    from bsuite import sweep

    every = [k for k in sweep.SETTINGS if k.split(sweep.SEPARATOR)[0] == experiment]
    if not every:
        experiments = sorted({k.split(sweep.SEPARATOR)[0] for k in sweep.SETTINGS})
        raise SystemExit(f"error: unknown bsuite experiment {experiment!r}; valid: {', '.join(experiments)}")
    if not ids:
        return every
    chosen = [i if sweep.SEPARATOR in i else f"{experiment}{sweep.SEPARATOR}{i}" for i in ids]
    unknown = [i for i in chosen if i not in every]
    if unknown:
        raise SystemExit(f"error: {', '.join(unknown)} not among the {experiment} ids "
                         f"{every[0]} ... {every[-1]}")
    return chosen


def episode_length(bsuite_id: str) -> int:
    """Steps of one episode of `bsuite_id` with action 0 (fixed for memory/chain/catch envs)."""
    from bsuite import sweep
    from bsuite.bsuite import EXPERIMENT_NAME_TO_ENVIRONMENT

    env = EXPERIMENT_NAME_TO_ENVIRONMENT[bsuite_id.split(sweep.SEPARATOR)[0]](**sweep.SETTINGS[bsuite_id])
    timestep, steps = env.reset(), 0
    while not timestep.last():
        timestep = env.step(0)
        steps += 1
    return steps


def recording_env(bsuite_id: str, results_dir: str, record_seed: int, seed: int) -> gymnasium.Env:
    """`envs.make("bsuite/<id>", seed)`, recording bsuite's CSV log for the training env's seed only.

    The loop builds its training env with `record_seed` (= run.seed) and an evaluation env with
    another seed; only the first writes the log (both would write the same file). Module level and
    used through `functools.partial`, so it pickles (env processes, checkpoints).
    """
    if seed != record_seed:
        return envs.make(f"bsuite/{bsuite_id}", seed=seed)
    env = envs.make(f"bsuite/{bsuite_id}", seed=seed, results_dir=results_dir)
    _make_log_loadable(env)
    return env


class _LoadableLogging(bsuite_wrappers.Logging):
    """bsuite's CSV `Logging` wrapper that pickle can restore (so a resumed run keeps its log).

    bsuite's `Logging.__getattr__` forwards every missing attribute to `self._env`, which does not
    exist yet while pickle rebuilds the object, so unpickling recurses until RecursionError. This
    subclass only answers dunder and `_env` lookups itself.
    """

    def __getattr__(self, attr: str):
        if attr.startswith("__") or attr == "_env":
            raise AttributeError(attr)
        return getattr(self._env, attr)


def _make_log_loadable(env: gymnasium.Env) -> None:
    """Switch the recording wrapper inside `env` to `_LoadableLogging` (same fields, in place)."""
    recorded = getattr(env.unwrapped, "dm_env", None)
    if type(recorded) is bsuite_wrappers.Logging:
        recorded.__class__ = _LoadableLogging


def run_one(bsuite_id: str, seed: int, steps: int, run_root: Path, train_args: list[str]) -> dict:
    """Train one agent on `bsuite_id` for `steps` env steps, recording to `run_root/csv`.

    **Returns:** the loop's summary (env steps, updates, episodes, recent return, seconds), also
    written to `<run dir>/done.json`.
    """
    from experiments import train
    from worldmodels import loop
    from worldmodels.config import override

    logdir = run_root / "runs" / bsuite_id.replace("/", "-")
    config = train.parse([*train_args, "--env", f"bsuite/{bsuite_id}"])
    for path, value in [("run.steps", steps), ("run.seed", seed), ("run.logdir", str(logdir))]:
        config = override(config, path, value)
    if config.run.num_envs != 1:
        raise SystemExit(f"error: the bsuite protocol records one env per id, but run.num_envs is "
                         f"{config.run.num_envs}; pass --run.num-envs 1")
    env_fn = functools.partial(recording_env, bsuite_id, str(run_root / "csv"), seed)
    with warnings.catch_warnings():
        # The loop reseeds its envs on reset; the recording env was seeded when built and keeps its log.
        warnings.filterwarnings("ignore", message="DmEnvToGymnasium has no factory")
        summary = loop.run(config, env_fn)
    summary.pop("state", None)
    (logdir / "done.json").write_text(json.dumps(summary))
    return summary


def score(out: Path, plot: bool = True) -> str:
    """Score every run under `out` (``<label>/seed<k>/csv``), write tables and plots, return the report."""
    runs: dict[str, list[str]] = {}
    for csv_dir in sorted(out.glob("*/seed*/csv")):
        if any(csv_dir.glob("bsuite_id_-_*.csv")):
            runs.setdefault(csv_dir.parent.parent.name, []).append(str(csv_dir))
    if not runs:
        raise SystemExit(f"error: no recorded bsuite runs under {out} (expected <label>/seed<k>/csv/*.csv)")
    df = bsuite_eval.load(runs)
    ids = bsuite_eval.per_id(df)
    ids.to_csv(out / "per_id.csv", index=False)
    bsuite_eval.experiment_scores(df).to_csv(out / "scores.csv", index=False)
    text = bsuite_eval.report(df)
    if plot:
        for experiment in ids["bsuite_env"].unique():
            path = bsuite_eval.plot_success(ids, experiment, out / f"success-{experiment}.png")
            text += f"\nsaved {path}"
    (out / "report.txt").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="bsuite experiment, e.g. memory_len, discounting_chain")
    parser.add_argument("--ids", nargs="+", default=None, help="id numbers or full ids (default: all)")
    parser.add_argument("--preset", nargs="+", default=[], help="experiments.train presets, applied in order")
    parser.add_argument("--model", default=None, choices=["rssm", "s3m"])
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, default=None, help="env steps per id")
    budget.add_argument("--episodes", type=int, default=None, help="bsuite episodes per id")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--label", default=None, help="name of this agent's runs (default: presets and model)")
    parser.add_argument("--score-only", action="store_true", help="only score what is under --out")
    parser.add_argument("--no-plot", action="store_true")
    args, train_rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)

    if not args.score_only:
        from experiments import train

        ids = experiment_ids(args.experiment, args.ids)
        label = args.label or "+".join([*args.preset, *([args.model] if args.model else [])]) or "default"
        train_args = [*(["--preset", *args.preset] if args.preset else []),
                      *(["--model", args.model] if args.model else []), *train_rest]
        train.enable_compile_cache()
        for seed in args.seeds:
            run_root = out / label / f"seed{seed}"
            for bsuite_id in ids:
                if args.episodes is not None:
                    steps = args.episodes * (episode_length(bsuite_id) + 1)
                elif args.steps is not None:
                    steps = args.steps
                else:
                    steps = train.parse(train_args).run.steps  # the presets' budget
                done = run_root / "runs" / bsuite_id.replace("/", "-") / "done.json"
                if done.exists() and json.loads(done.read_text())["env_steps"] >= steps:
                    print(f"{label} seed {seed} {bsuite_id}: done, skipping ({done})")
                    continue
                print(f"=== {label} seed {seed} {bsuite_id}: {steps} env steps")
                summary = run_one(bsuite_id, seed, steps, run_root, train_args)
                print(f"=== {bsuite_id}: {summary}")
    print(score(out, plot=not args.no_plot))


if __name__ == "__main__":
    main()
