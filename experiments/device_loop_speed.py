"""Env steps/s of the device loop vs the host loop on the same bsuite task and config (not a test).

    python -m experiments.device_loop_speed                                  # catch/0 and memory_len/9, debug agent
    python -m experiments.device_loop_speed --envs catch/0 --preset dreamer-bsuite-cpu --steps 3000

For each env and train ratio, both loops run the same config from scratch: the host loop
(`worldmodels.loop.run` on `envs.make('bsuite/<id>')`, a gymnasium env stepped in Python around the
jitted policy and train step) and the device loop (`worldmodels.device_loop.run_on_device` on
`envs.jax.make(<id>)`, everything in one compiled `lax.scan` chunk). Train ratio 0 means no
training: env + policy only.

Steady-state speed is read from each run's `metrics.jsonl`, one line every `--log-every` env steps
(the device loop logs once per chunk of that size): env steps between the first line written after
training started (or the first line, without training) and the last one, over the time between them.
So compiling, which happens before that first line, is left out of both; it is shown separately
(the device loop's first chunk, which includes compiling its whole program).

Measured on this project's 2-core CPU while another training run used it (so absolute figures are
low and noisy), steady env steps/s, host -> device:
- debug agent, train ratio 64 (one update per env step): catch/0 53 -> 85, memory_len/9 57 -> 88;
- dreamer-bsuite-cpu as it was then (32 x 4 latents, since cut to 4 x 4), catch/0, train ratio 256: 15 -> 27;
- debug agent, no training (env + policy): catch/0 887 -> 33,676, memory_len/9 1,026 -> 68,173;
  8 envs, catch/0: 7,725 -> 215,073.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported (see experiments/hugepages.py)
    from experiments.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

import argparse
import functools
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import envs  # noqa: E402
import envs.jax as jenvs  # noqa: E402
from experiments.presets import register as register_presets  # noqa: E402
from worldmodels import device_loop, loop  # noqa: E402
from worldmodels.config import make_config  # noqa: E402


def steady_rate(logdir: Path, trained: bool) -> float | None:
    """Env steps/s between the first metrics line after training started (any line without training)
    and the last line; None if fewer than two such lines."""
    lines = [json.loads(x) for x in (logdir / "metrics.jsonl").read_text().splitlines()]
    first = next((i for i, m in enumerate(lines) if not trained or m["updates"] > 0), None)
    if first is None or first >= len(lines) - 1:
        return None
    a, b = lines[first], lines[-1]
    return (b["env_step"] - a["env_step"]) / (b["time"] - a["time"])


def measure(bsuite_id: str, presets: list[str], steps: int, train_ratio: float, log_every: int,
            num_envs: int, root: Path) -> dict:
    overrides = {"run.steps": steps, "run.train_ratio": train_ratio, "run.log_every": log_every,
                 "run.num_envs": num_envs, "run.checkpoint_every": 0, "run.tensorboard": False,
                 "run.progress": False}
    tag = f"{bsuite_id.replace('/', '-')}-r{train_ratio:g}"
    result = {"env": bsuite_id, "train_ratio": train_ratio}

    config = make_config(presets, {**overrides, "run.logdir": str(root / f"device-{tag}")})
    env, params = jenvs.make(bsuite_id)
    start = time.time()
    summary = device_loop.run_on_device(config, env, params)
    result.update(device_total_s=time.time() - start, device_first_chunk_s=summary["first_chunk_seconds"],
                  device_steps_per_s=steady_rate(Path(config.run.logdir), train_ratio > 0),
                  device_updates=summary["updates"],
                  effective_ratio=summary["schedule"].effective_train_ratio(config.run.batch_size,
                                                                            config.run.seq_len))

    config = make_config(presets, {**overrides, "run.logdir": str(root / f"host-{tag}")})
    start = time.time()
    summary = loop.run(config, functools.partial(envs.make, f"bsuite/{bsuite_id}"))
    result.update(host_total_s=time.time() - start, host_steps_per_s=steady_rate(Path(config.run.logdir),
                                                                                 train_ratio > 0),
                  host_updates=summary["updates"])
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["catch/0", "memory_len/9"], help="bsuite ids with a JAX env")
    parser.add_argument("--preset", nargs="+", default=["debug"])
    parser.add_argument("--steps", type=int, default=1500, help="env steps per run")
    parser.add_argument("--train-ratios", type=float, nargs="+", default=None,
                        help="default: the preset's train_ratio, then 0 (env + policy only)")
    parser.add_argument("--log-every", type=int, default=250, help="env steps per metrics line (= device chunk)")
    parser.add_argument("--num-envs", type=int, default=1)
    args = parser.parse_args(argv)
    register_presets()
    ratios = args.train_ratios or [make_config(args.preset).run.train_ratio, 0.0]
    results = []
    with tempfile.TemporaryDirectory() as root:
        for bsuite_id in args.envs:
            for ratio in ratios:
                results.append(measure(bsuite_id, args.preset, args.steps, ratio, args.log_every, args.num_envs,
                                       Path(root)))
    fmt = lambda x: "-" if x is None else f"{x:.0f}"
    print(f"\npreset {'+'.join(args.preset)}, {args.num_envs} env(s), {args.steps} env steps per run; "
          "steady env steps/s (compiling excluded)")
    print(f"{'env':<14} {'ratio':>6} {'eff.':>6} {'host/s':>8} {'device/s':>9} {'speedup':>8} "
          f"{'dev 1st chunk s':>16} {'host total s':>13} {'dev total s':>12} {'upd host/dev':>13}")
    for r in results:
        speedup = (r["device_steps_per_s"] / r["host_steps_per_s"]
                   if r["device_steps_per_s"] and r["host_steps_per_s"] else None)
        print(f"{r['env']:<14} {r['train_ratio']:>6g} {r['effective_ratio']:>6g} {fmt(r['host_steps_per_s']):>8} "
              f"{fmt(r['device_steps_per_s']):>9} {'-' if speedup is None else f'{speedup:.1f}x':>8} "
              f"{r['device_first_chunk_s']:>16.1f} {r['host_total_s']:>13.1f} {r['device_total_s']:>12.1f} "
              f"{r['host_updates']:>6}/{r['device_updates']}")
    return results


if __name__ == "__main__":
    main()
