"""Train a world model alone on recorded episodes (no agent, no env):

    python -m experiments.train --preset size1m cartpole --run.save-episodes --run.logdir runs/record
    python -m experiments.train_world_model --data runs/record/episodes --preset size1m cartpole \
        --updates 2000 --run.logdir runs/wm
    python -m experiments.train --preset size1m cartpole --agent.init-world-model runs/wm --run.logdir runs/agent

`--data DIR`: a directory of `.npz` episodes and its `spaces.json` (see `worldmodels.offline`; the
host loop's `--run.save-episodes` writes them). Every `round(1 / --holdout)`-th episode is held out.
The model is the one `--preset`, `--model` and `--agent.*` options give (any sequence model, any size); batches are
`--run.batch-size` windows of `--run.seq-len` steps from a blank state, with `--agent.optim.*`.
Before training and every `--eval-every` updates it prints and logs (`metrics.jsonl`, TensorBoard)
the held-out losses (reconstruction, reward, continue, KL) and the open-loop prediction error per
horizon (observe 5 steps, imagine the rest with the recorded actions, within the episode the window
starts in), and checkpoints the model in
`<run.logdir>/checkpoints` at the end. Numbers are per step, as the training loss reports them.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported (see experiments/hugepages.py)
    from experiments.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments import train as train_cli
from worldmodels import offline
from worldmodels.config import VIDEO_CONTEXT, ConfigError, dumps, validate
from worldmodels.logging import RunLogger

HELD_OUT_WINDOWS = 64  # windows of held-out data each evaluation reads (at most)


def evaluate(state: offline.WorldModelState, windows: offline.Windows, config, key: jax.Array) -> dict[str, float]:
    batch = windows.tiling(HELD_OUT_WINDOWS)
    metrics, errors = offline.held_out(state.world_model, batch, key, VIDEO_CONTEXT, config)
    out = {f"heldout/{k.split('/', 1)[1]}": float(v) for k, v in metrics.items() if k.startswith("loss/")}
    for name, per_horizon in errors.items():
        per_horizon = np.asarray(per_horizon)
        out.update({f"heldout/open_loop_{name}/h{h + 1}": float(e) for h, e in enumerate(per_horizon)
                    if np.isfinite(e)})
        # over the horizons that some window reaches inside one episode
        out[f"heldout/open_loop_{name}/mean"] = float(np.nanmean(per_horizon))
    return out


def _summary(figures: dict[str, float]) -> str:
    """The held-out figures without the per-horizon errors past the first step ahead."""
    keep = {k: v for k, v in figures.items() if not re.search(r"/h\d+$", k) or k.endswith("/h1")}
    return ", ".join(f"{k.removeprefix('heldout/')} {v:.4g}" for k, v in sorted(keep.items()))


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--data", required="-h" not in argv and "--help" not in argv,
                     help="a directory of recorded episodes (*.npz) with its spaces.json")
    pre.add_argument("--updates", type=int, default=1000, help="world-model updates")
    pre.add_argument("--holdout", type=float, default=0.1, help="the share of episodes held out")
    pre.add_argument("--eval-every", type=int, default=250, help="updates between held-out evaluations")
    known, rest = pre.parse_known_args(argv)
    if "-h" in argv or "--help" in argv:
        pre.print_help()
    train_cli.enable_compile_cache()
    config, _ = train_cli._parse(rest)
    if os.environ.get(train_cli.SMOKE_STEPS):  # a smoke run of the command (the README test): 2 updates
        known.updates, known.eval_every = min(known.updates, 2), 1
        print(f"{train_cli.SMOKE_STEPS} is set: a smoke run of {known.updates} updates")
    try:
        validate(config)
        if known.updates < 1 or known.eval_every < 1:
            raise ConfigError(f"--updates {known.updates} / --eval-every {known.eval_every}: must be >= 1")
        episodes, obs_space, act_space = offline.load_episodes(known.data)
        train_eps, held_eps = offline.split_episodes(episodes, known.holdout)
        rc = config.run
        train_windows = offline.Windows(train_eps, rc.seq_len)
        held_steps = sum(len(e["reward"]) for e in held_eps)
        if held_steps <= VIDEO_CONTEXT + 1:
            raise ValueError(f"the held-out episodes hold {held_steps} steps; record more episodes or raise --holdout")
        # held-out windows as long as training's, or all the held-out steps when they hold fewer
        held_windows = offline.Windows(held_eps, min(rc.seq_len, held_steps))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, env=f"offline:{known.data}"))
    logdir = Path(rc.logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "config.json").write_text(dumps(config))
    print(f"data: {len(train_eps)} training episodes ({train_windows.size} steps), {len(held_eps)} held out "
          f"({held_windows.size} steps) from {known.data}")

    key = jax.random.PRNGKey(rc.seed)
    key, k_init = jax.random.split(key)
    state = offline.init(config, obs_space, act_space, k_init)
    rng = np.random.default_rng(rc.seed)
    logger = RunLogger(logdir, rc.tensorboard, wandb_project=rc.wandb, config=json.loads(dumps(config)))
    eval_key = jax.random.PRNGKey(rc.seed + 1)  # the same key at every evaluation: comparable figures
    before = evaluate(state, held_windows, config, eval_key)
    logger.metrics(0, before)
    print(f"held out, before training: {_summary(before)}")
    start, after = time.time(), before
    for update in range(1, known.updates + 1):
        key, k = jax.random.split(key)
        state, metrics = offline.train_step(state, train_windows.sample(rc.batch_size, rng), k, config)
        if update % known.eval_every == 0 or update == known.updates:
            after = evaluate(state, held_windows, config, eval_key)
            logger.metrics(update, {**{k: float(v) for k, v in metrics.items()}, **after})
            print(f"update {update}: held out {_summary(after)} ({time.time() - start:.0f} s)")
    logger.close()
    offline.save(logdir / "checkpoints", state, config, obs_space, act_space,
                 {"data": str(known.data), "updates": known.updates})
    result = {"updates": known.updates, "seconds": time.time() - start, "before": before, "after": after}
    (logdir / "result.json").write_text(json.dumps(result, indent=2))
    print(f"saved the world model in {logdir / 'checkpoints'} (start an agent from it with "
          f"--agent.init-world-model {logdir})")
    return result


if __name__ == "__main__":
    main()
