"""Env steps/s of the DMC suite on MJX (`envs.jax.mjx`) beside dm_control's host env (not a test).

    python -m experiments.mjx_speed                                   # cartpole-swingup, walker-walk
    python -m experiments.mjx_speed --tasks walker-walk --envs 1 64 --no-train
    python -m experiments.mjx_speed --vision --tasks cartpole-swingup --envs 1 16 64 --no-train

Rows, per task (env steps are agent steps: action repeat 2, as everywhere here):
- `mjx env`: the functional env alone, N envs vmapped with NEXT_STEP auto-reset (the device loop's
  `step_envs`), uniform random actions, `lax.scan` over steps, jitted (compiling excluded);
- `mjx device loop`: `worldmodels.device_loop` with training on `--train-envs` envs (`--preset`, default dreamer-dmc-cpu:
  size1m, train ratio 64), the rate after the first chunk (which compiles; training starts at once);
- `dmc host env`: dm_control's env (`envs.make('dmc/<task>')`) stepped in Python, random actions;
- `dmc parallel envs`: N dm_control envs in worker processes (`envs.parallel.ParallelVectorEnv`,
  what `--run.parallel-envs` uses).

`--vision`: the same rows with 64x64 images: `mjx-vision/` (MJX's batch renderer, Warp physics) and
`dmc-vision/` (dm_control's OpenGL renderer); the device loop's default preset becomes
dreamer-dmc-vision-cpu.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import envs  # noqa: E402
import envs.jax as jenvs  # noqa: E402
from envs.parallel import ParallelVectorEnv  # noqa: E402
from experiments.presets import register as register_presets  # noqa: E402
from worldmodels import device_loop  # noqa: E402
from worldmodels.config import make_config  # noqa: E402


def mjx_env_rate(task: str, num_envs: int, seconds: float = 5.0, family: str = "mjx") -> tuple[float, float]:
    """(steady env steps/s, compile seconds) of `num_envs` MJX envs stepped in one jitted scan."""
    env, params = jenvs.make(f"{family}/{task}")
    length = max(4, (256 if env.vision else 4096) // num_envs)  # env steps per jitted call, per env

    @jax.jit
    def run(carry, key):
        def body(carry, key):
            state, done = carry
            k_action, k_step = jax.random.split(key)
            actions = jax.random.uniform(k_action, (num_envs, env.action_size), minval=-1, maxval=1)
            state, done, timestep = device_loop.step_envs(env, params, state, done, actions, k_step)
            return (state, done), timestep.reward.sum()
        return jax.lax.scan(body, carry, jax.random.split(key, length))

    state, _ = jax.jit(jax.vmap(env.reset, in_axes=(None, 0)))(params, jax.random.split(jax.random.PRNGKey(0),
                                                                                        num_envs))
    state = (state, jnp.zeros(num_envs, bool))
    start = time.time()
    state, rewards = jax.block_until_ready(run(state, jax.random.PRNGKey(1)))
    compile_s, steps, start = time.time() - start, 0, time.time()
    while time.time() - start < seconds:
        state, rewards = jax.block_until_ready(run(state, jax.random.PRNGKey(steps)))
        steps += length * num_envs
    return steps / (time.time() - start), compile_s


def host_rate(task: str, num_envs: int, seconds: float = 5.0, family: str = "dmc") -> float:
    """Env steps/s of dm_control's env (1: in this process; more: in worker processes)."""
    factory = functools.partial(envs.make, f"{family}/{task}")
    rng = np.random.default_rng(0)
    if num_envs == 1:
        env = factory(seed=0)
        env.reset()
        steps, start = 0, time.time()
        while time.time() - start < seconds:
            _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
            steps += 1
            if terminated or truncated:
                env.reset()
        return steps / (time.time() - start)
    vector = ParallelVectorEnv([functools.partial(factory, seed=i) for i in range(num_envs)])
    try:
        vector.reset()
        steps, start = 0, time.time()
        while time.time() - start < seconds:
            vector.step(rng.uniform(-1, 1, vector.action_space.shape).astype(np.float32))
            steps += num_envs
        return steps / (time.time() - start)
    finally:
        vector.close()


def device_loop_rate(task: str, num_envs: int, presets: list[str], chunks: int, root: Path,
                     family: str = "mjx") -> tuple[float, float]:
    """(steady env steps/s, first chunk seconds) of the device loop training on `num_envs` MJX envs."""
    env, params = jenvs.make(f"{family}/{task}")
    base = make_config(presets)
    # each env fills a replay window in the first chunk, so the next ones train from their start
    per_env = max(base.run.window + 1, round(4 * base.run.batch_size * base.run.seq_len / base.run.train_ratio))
    chunk = per_env * num_envs
    config = make_config(presets, {"run.num_envs": num_envs, "run.steps": chunk * chunks, "run.log_every": chunk,
                                   "run.train_start": 0, "run.checkpoint_every": 0, "run.tensorboard": False,
                                   "run.final_eval_episodes": 0, "run.replay_capacity": max(chunk * chunks, 10_000),
                                   "run.logdir": str(root / f"{task}-{num_envs}")})
    summary = device_loop.run_on_device(config, env, params)
    assert summary["updates"] > 0, summary
    return summary["env_steps_per_s_after_first_chunk"], summary["first_chunk_seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["cartpole-swingup", "walker-walk"])
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 64, 1024], help="env counts for the MJX rows")
    parser.add_argument("--host-envs", type=int, nargs="*", default=[1, 2], help="env counts for the dm_control rows")
    parser.add_argument("--train-envs", type=int, nargs="*", default=[1, 16],
                        help="env counts for the device-loop rows (with training the loop is update-bound: a "
                             "train ratio of 64 makes one update per 16 env steps, whatever the env count)")
    parser.add_argument("--preset", nargs="+", default=None,
                        help="device-loop presets (default dreamer-dmc-cpu; with --vision dreamer-dmc-vision-cpu)")
    parser.add_argument("--vision", action="store_true", help="64x64 images: mjx-vision/ and dmc-vision/")
    parser.add_argument("--chunks", type=int, default=3, help="device-loop chunks per run (the first compiles)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-train", action="store_true", help="skip the device-loop rows")
    args = parser.parse_args(argv)
    host, mjx = ("dmc-vision", "mjx-vision") if args.vision else ("dmc", "mjx")
    presets = args.preset or (["dreamer-dmc-vision-cpu"] if args.vision else ["dreamer-dmc-cpu"])
    register_presets()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for task in args.tasks:
            for n in args.host_envs:
                rows.append((task, f"{host} host env" if n == 1 else f"{host} parallel envs", n,
                             host_rate(task, n, args.seconds, host), None))
                print(rows[-1], flush=True)
            for n in args.envs:
                rows.append((task, f"{mjx} env", n, *mjx_env_rate(task, n, args.seconds, mjx)))
                print(rows[-1], flush=True)
            if not args.no_train:
                for n in args.train_envs:
                    rows.append((task, f"{mjx} device loop ({'+'.join(presets)})", n,
                                 *device_loop_rate(task, n, presets, args.chunks, Path(root), mjx)))
                    print(rows[-1], flush=True)
    print(f"\n{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print("| task | what | envs | env steps/s | compile or first chunk s |\n|---|---|---|---|---|")
    for task, what, n, rate, first in rows:
        print(f"| {task} | {what} | {n} | {'-' if rate is None else f'{rate:,.0f}'} | {'-' if first is None else f'{first:.1f}'} |")


if __name__ == "__main__":
    main()
