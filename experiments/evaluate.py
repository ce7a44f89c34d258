"""Evaluate trained runs by their benchmark's protocol: `python -m experiments.evaluate RUN_DIR [RUN_DIR ...]`.

Each run directory (what `experiments.train` writes: `config.json`, `checkpoints/`, `scores.jsonl`)
is restored from its latest checkpoint (or `--step`) and plays `--episodes` evaluation episodes on
its own env (`config.run.env`), greedy by default (`--sample` samples actions). The figures follow
the benchmark's protocol:

* Memory Maze (`memory_maze/<size>`): the score (mean episode return: targets reached per episode)
  and its fraction of the human and of the maximum score for the maze size.
* DMC (`dmc/<domain>-<task>`, `dmc-vision/...`): the episode return of the standard episodes
  (1000 control steps at action repeat 2: 500 env steps; returns in [0, 1000]).
* POPGym (`popgym/<Env><Easy|Medium|Hard>`): the final episode return, per task and difficulty.
* Anything else (`gym:`, `bsuite/`): the mean episode return.

Every run also reports `final_train_return`: the mean of its last `--final-window` training
episodes from `scores.jsonl`. Results are printed as tables (one row per run; one per env over runs,
e.g. seeds; a task x difficulty table for POPGym) and written to `<run>/evaluation.json`
(`--out FILE` also writes all of them and the aggregates to one file).

Examples:
    python -m experiments.evaluate runs/maze-seed0 runs/maze-seed1 --episodes 10 --num-envs 4 --parallel
    python -m experiments.evaluate runs/popgym-* --episodes 20 --out popgym.json
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported (see experiments/hugepages.py)
    from experiments.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

import argparse
import functools
import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import gymnasium as gym
import jax
import numpy as np

import envs
from envs.parallel import ParallelVectorEnv
from worldmodels import agent as agent_lib
from worldmodels import spaces
from worldmodels.logging import read_jsonl
from worldmodels.policy import load_config, restore_agent

# Memory Maze (Pasukonis et al. 2022), per maze size: human and maximum (oracle) scores.
MEMORY_MAZE_HUMAN = {"9x9": 26.4, "11x11": 44.3, "13x13": 55.5, "15x15": 67.7}
MEMORY_MAZE_MAX = {"9x9": 34.8, "11x11": 58.0, "13x13": 74.5, "15x15": 87.7}
# DMC's standard protocol: 1000 control steps per episode; `envs.make("dmc/...")` repeats actions twice.
DMC_CONTROL_STEPS = 1000
DMC_ACTION_REPEAT = 2
POPGYM_DIFFICULTIES = ("Easy", "Medium", "Hard")
# Evaluation envs get seeds apart from the training envs (seed + i) and the loop's eval env (+100_000).
EVAL_SEED_OFFSET = 1_000_000


@dataclass(frozen=True)
class Benchmark:
    """What an env name means for evaluation: `family` (``memory_maze``, ``dmc``, ``dmc-vision``,
    ``popgym``, ``bsuite``, ``gym`` or ``other``), the `task` within it (``9x9``, ``walker-walk``,
    ``RepeatPrevious``, ...) and the POPGym `difficulty` (None elsewhere)."""

    family: str
    task: str
    difficulty: str | None = None


def benchmark_of(env_name: str) -> Benchmark:
    """Parse an `envs.make` name, e.g. ``popgym/RepeatPreviousEasy`` -> (popgym, RepeatPrevious, Easy)."""
    for prefix in ("memory_maze/", "dmc-vision/", "dmc/", "popgym/", "bsuite/"):
        if env_name.startswith(prefix):
            family, task = prefix[:-1], env_name[len(prefix):]
            if family == "popgym":
                for difficulty in POPGYM_DIFFICULTIES:
                    if task.endswith(difficulty) and len(task) > len(difficulty):
                        return Benchmark(family, task[:-len(difficulty)], difficulty)
                raise ValueError(f"POPGym env {env_name!r} does not end in a difficulty "
                                 f"({', '.join(POPGYM_DIFFICULTIES)}), e.g. popgym/RepeatPreviousEasy")
            return Benchmark(family, task)
    if env_name.startswith("gym:"):
        return Benchmark("gym", env_name[len("gym:"):])
    return Benchmark("other", env_name)


def episode_stats(returns: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (ddof 1; 0 for one episode), standard error, min and max of episode returns."""
    x = np.asarray(returns, np.float64)
    if x.size == 0:
        raise ValueError("no episodes to summarise")
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    return {"return_mean": float(x.mean()), "return_std": std, "return_stderr": std / math.sqrt(x.size),
            "return_min": float(x.min()), "return_max": float(x.max()), "episodes": int(x.size)}


def memory_maze_fractions(score: float, size: str) -> dict[str, float]:
    """A Memory Maze score and its fractions of the human and maximum scores for `size` (e.g. 9x9)."""
    if size not in MEMORY_MAZE_HUMAN:
        raise ValueError(f"unknown Memory Maze size {size!r}; valid sizes: {', '.join(MEMORY_MAZE_HUMAN)}")
    human, best = MEMORY_MAZE_HUMAN[size], MEMORY_MAZE_MAX[size]
    return {"score": score, "human_score": human, "max_score": best, "human_fraction": score / human,
            "max_fraction": score / best}


def protocol_figures(env_name: str, returns: Sequence[float], lengths: Sequence[int]) -> dict[str, Any]:
    """The benchmark's figures for evaluation episodes of `env_name` (returns and lengths in env steps).

    **Returns:** ``benchmark``, ``task`` (and ``difficulty`` for POPGym), `episode_stats`, the mean
    length, and: for Memory Maze, `memory_maze_fractions` of the mean return; for DMC, the control
    steps per episode (warns when they are not the protocol's 1000).
    """
    bench = benchmark_of(env_name)
    figures: dict[str, Any] = {"env": env_name, "benchmark": bench.family, "task": bench.task,
                               **episode_stats(returns), "length_mean": float(np.mean(lengths))}
    if bench.family == "memory_maze":
        figures.update(memory_maze_fractions(figures["return_mean"], bench.task))
    elif bench.family in ("dmc", "dmc-vision"):
        control = [int(n) * DMC_ACTION_REPEAT for n in lengths]
        figures.update(action_repeat=DMC_ACTION_REPEAT, control_steps_mean=float(np.mean(control)))
        if any(c != DMC_CONTROL_STEPS for c in control):
            warnings.warn(f"{env_name}: episodes of {sorted(set(control))} control steps, not the protocol's "
                          f"{DMC_CONTROL_STEPS}; the returns are not comparable with published DMC scores")
    elif bench.family == "popgym":
        figures["difficulty"] = bench.difficulty
    return figures


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per env over runs (e.g. seeds): the mean and sample std over runs of each run's mean return
    (and of the Memory Maze fractions), and the number of runs and episodes.

    **Arguments:** `results`: `evaluate_run` outputs (each with ``figures``).
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for result in results:
        groups[result["figures"]["env"]].append(result["figures"])
    rows = []
    for env_name, figs in groups.items():
        row: dict[str, Any] = {key: figs[0][key] for key in ("env", "benchmark", "task", "difficulty")
                               if key in figs[0]}
        row.update(runs=len(figs), episodes=sum(f["episodes"] for f in figs))
        for key in ("return_mean", "human_fraction", "max_fraction"):
            if key in figs[0]:
                x = np.array([f[key] for f in figs], np.float64)
                row[key] = float(x.mean())
                row[key.replace("_mean", "") + "_std_over_runs"] = float(x.std(ddof=1)) if x.size > 1 else 0.0
        rows.append(row)
    return rows


def popgym_table(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{task: {difficulty: mean return over runs}} from `aggregate` rows of POPGym envs."""
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for row in rows:
        if row["benchmark"] == "popgym":
            table[row["task"]][row["difficulty"]] = row["return_mean"]
    return dict(table)


def final_train_return(run_dir: Path, window: int) -> float | None:
    """The mean return of the last `window` training episodes in `scores.jsonl` (None if none)."""
    returns = [r["return"] for r in read_jsonl(run_dir / "scores.jsonl") if r.get("mode") == "train"]
    return float(np.mean(returns[-window:])) if returns else None


# -- running episodes ---------------------------------------------------------------------------


def run_episodes(state: agent_lib.AgentState, envs_: gym.vector.VectorEnv, episodes: int, key: jax.Array,
                 seed: int | None, greedy: bool = True, max_episode_steps: int = 1_000_000) -> list[tuple[float, int]]:
    """Play `episodes` episodes on a NEXT_STEP-autoreset vector env; env i plays an equal share
    (so short episodes are not favoured). An episode of an env restarted after a crash
    (``info["restarted"]``) is dropped and played again.

    **Returns:** [(return, length in env steps)], env by env.
    """
    n = envs_.num_envs
    quota = [episodes // n + (i < episodes % n) for i in range(n)]
    obs_space, act_space = envs_.single_observation_space, envs_.single_action_space
    done: list[list[tuple[float, int]]] = [[] for _ in range(n)]
    obs, _ = envs_.reset(seed=seed)
    carry = agent_lib.initial_carry(state, n)
    first = np.ones(n, bool)
    ended = np.zeros(n, bool)  # the previous step ended the episode: this step resets
    ret, length = np.zeros(n), np.zeros(n, np.int64)
    while any(len(d) < q for d, q in zip(done, quota)):
        key, k = jax.random.split(key)
        batch = {**spaces.batch_obs(obs_space, obs, n), "is_first": first}
        action, carry = agent_lib.policy(state, carry, batch, k, greedy)
        obs, reward, terminated, truncated, info = envs_.step(spaces.env_actions(act_space, np.asarray(action)))
        first = ended | np.asarray(info.get("restarted", np.zeros(n, bool)), bool)
        ret = np.where(first, 0.0, ret + reward)
        length = np.where(first, 0, length + 1)
        if (length >= max_episode_steps).any():
            raise RuntimeError(f"an evaluation episode reached {max_episode_steps} steps without ending; give "
                               "the env a time limit (e.g. gymnasium's TimeLimit) or raise max_episode_steps")
        ended = (terminated | truncated) & ~first
        for i in np.flatnonzero(ended):
            if len(done[i]) < quota[i]:
                done[i].append((float(ret[i]), int(length[i])))
    return [episode for d in done for episode in d]


def evaluate_run(run_dir: str | Path, episodes: int = 10, *, greedy: bool = True, step: int | None = None,
                 num_envs: int = 1, parallel: bool = False, seed: int | None = None,
                 final_window: int = 100, write: bool = True) -> dict[str, Any]:
    """Evaluate one run directory by its benchmark's protocol (see the module docstring).

    **Arguments:** `episodes` to play with `num_envs` envs (in processes if `parallel`); `seed` of
    the evaluation envs (default: the run's seed + 1_000_000; env i gets seed + i); `write`: save
    ``<run_dir>/evaluation.json``.

    **Returns:** ``run``, ``env``, ``checkpoint_step``, ``trained_env_steps``, ``greedy``,
    ``seed``, ``episodes`` ([{return, length}]), ``figures`` (`protocol_figures`) and
    ``final_train_return``.
    """
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    env_name = config.run.env
    seed = config.run.seed + EVAL_SEED_OFFSET if seed is None else seed
    num_envs = max(1, min(num_envs, episodes))
    fns = [functools.partial(envs.make, env_name) for _ in range(num_envs)]
    if parallel:
        vector_env: gym.vector.VectorEnv = ParallelVectorEnv(fns)
    else:
        vector_env = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    try:
        state, step, counters = restore_agent(run_dir, config, vector_env.single_observation_space,
                                              vector_env.single_action_space, step)
        played = run_episodes(state, vector_env, episodes, jax.random.PRNGKey(seed), seed, greedy)
    finally:
        vector_env.close()
    returns, lengths = [r for r, _ in played], [n for _, n in played]
    result = {"run": str(run_dir), "env": env_name, "checkpoint_step": step,
              "trained_env_steps": counters["env_steps"], "greedy": greedy, "seed": seed,
              "episodes": [{"return": r, "length": n} for r, n in played],
              "figures": protocol_figures(env_name, returns, lengths),
              "final_train_return": final_train_return(run_dir, final_window)}
    if write:
        (run_dir / "evaluation.json").write_text(json.dumps(result, indent=2))
    return result


# -- tables -------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table: `columns` are (header, row key, format spec); missing values print as -."""
    cells = [[header for header, _, _ in columns]]
    cells += [[_fmt(row.get(key), spec) for _, key, spec in columns] for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(results: Sequence[dict[str, Any]]) -> str:
    """The tables printed by the CLI: per run, per env over runs, and POPGym task x difficulty."""
    per_run = [{"run": r["run"], "step": r["trained_env_steps"], **r["figures"],
                "final_train": r["final_train_return"]} for r in results]
    text = ["per run:", format_table(per_run, [
        ("run", "run", ""), ("env", "env", ""), ("env steps", "step", "d"), ("episodes", "episodes", "d"),
        ("return", "return_mean", ".2f"), ("± std", "return_std", ".2f"), ("length", "length_mean", ".0f"),
        ("human frac", "human_fraction", ".3f"), ("max frac", "max_fraction", ".3f"),
        ("final train return", "final_train", ".2f")])]
    rows = aggregate(results)
    text += ["", "per env, over runs:", format_table(rows, [
        ("env", "env", ""), ("runs", "runs", "d"), ("episodes", "episodes", "d"), ("return", "return_mean", ".2f"),
        ("± std over runs", "return_std_over_runs", ".2f"), ("human frac", "human_fraction", ".3f"),
        ("max frac", "max_fraction", ".3f")])]
    table = popgym_table(rows)
    if table:
        pop_rows = [{"task": task, **cells} for task, cells in sorted(table.items())]
        text += ["", "POPGym final episode return (task x difficulty):", format_table(
            pop_rows, [("task", "task", "")] + [(d, d, ".3f") for d in POPGYM_DIFFICULTIES])]
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (their --run.logdir)")
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes per run")
    parser.add_argument("--sample", action="store_true", help="sample actions instead of the greedy mode")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    parser.add_argument("--num-envs", type=int, default=1, help="envs playing the episodes together")
    parser.add_argument("--parallel", action="store_true", help="run the envs in processes (slow envs)")
    parser.add_argument("--seed", type=int, default=None, help="evaluation env seed (default: run seed + 1e6)")
    parser.add_argument("--final-window", type=int, default=100,
                        help="training episodes averaged for final_train_return")
    parser.add_argument("--out", type=Path, default=None, help="also write every result and the aggregates here")
    args = parser.parse_args(argv)
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    results = [evaluate_run(run, args.episodes, greedy=not args.sample, step=args.step, num_envs=args.num_envs,
                            parallel=args.parallel, seed=args.seed, final_window=args.final_window)
               for run in args.runs]
    print(report(results))
    if args.out is not None:
        rows = aggregate(results)
        args.out.write_text(json.dumps({"runs": results, "per_env": rows, "popgym": popgym_table(rows)}, indent=2))
    return results


if __name__ == "__main__":
    main()
