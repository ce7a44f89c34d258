"""Speed benchmark (not a test): compile time and median time per train / policy step.

    python -m experiments.bench                      # the full table
    python -m experiments.bench --cases size1m       # one row
    python -m experiments.bench --sweep              # RSSM, S3M, FFM, Transformer over sequence lengths 64, 256, 1024
    python -m experiments.bench --params             # parameter counts of the four bsuite CPU presets
    python -m experiments.bench --cases size1m --compile-cache /tmp/wm-cache   # twice: warm start-up
    python -m experiments.bench --cli                # the training CLI's time to its first update
    python -m experiments.bench --compute-dtype bfloat16   # the networks in bfloat16 (for GPUs and TPUs)
    python -m experiments.bench --checkpoint 1       # save + restore of a replay holding 1 GiB of images
    python -m experiments.bench --devices 1 2 4      # the train step split over 1, 2, 4 devices (a mesh)

Rows: train step at batch 16 x 64 for size1m and size12m with vector observations and size12m with
64x64 images (start-up = agent init + first call, i.e. compile; then the median of `--repeats`
steps), policy step for 1 and 16 envs, and the process's peak RSS.

`--devices N ...`: the same train step with each batch split over N devices (`worldmodels.sharding`,
the host loop's mesh), one process per N; on a CPU the N devices are forced host devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`) sharing the same cores, so the table shows the
cost of splitting, not a speed-up.
"""

from __future__ import annotations

if __name__ == "__main__":  # first, before jax is imported (see experiments/hugepages.py)
    from experiments.hugepages import reexec_with_huge_pages

    reexec_with_huge_pages()

import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from experiments import hugepages  # noqa: E402
from worldmodels import agent as agent_lib  # noqa: E402
from worldmodels import sharding  # noqa: E402
from worldmodels.config import make_config  # noqa: E402

VECTOR = {"vector": ((16,), "float32")}
IMAGE = {"image": ((64, 64, 3), "uint8")}
CASES = {"size1m": ("size1m", VECTOR), "size12m": ("size12m", VECTOR), "size12m-image": ("size12m", IMAGE)}


def random_batch(spec, action_dim: int, b: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    batch = {}
    for k, (shape, dtype) in spec.items():
        if dtype == "uint8":
            batch[k] = rng.integers(0, 256, (b, t, *shape), dtype=np.uint8)
        else:
            batch[k] = rng.normal(size=(b, t, *shape)).astype(np.float32)
    is_first = rng.random((b, t)) < 0.02
    is_first[:, 0] = True
    batch.update({"action": np.eye(action_dim, dtype=np.float32)[rng.integers(0, action_dim, (b, t))],
                  "reward": rng.normal(size=(b, t)).astype(np.float32), "is_first": is_first,
                  "is_last": np.zeros((b, t), bool), "is_terminal": np.zeros((b, t), bool)})
    return batch


def huge_pages() -> str:
    on = hugepages.TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
    return f"malloc huge pages {'on' if on else 'off (WORLDMODELS_HUGEPAGES=0 or not Linux)'}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_train(preset: str, spec, b: int, t: int, repeats: int, compute_dtype: str = "float32",
                mesh=None) -> dict:
    """With a `mesh`, as the host loop trains on many devices: state and keys replicated, each batch
    split along B (one transfer per batch, timed with the step)."""
    config = make_config([preset], {"agent.compute_dtype": compute_dtype}).agent
    start = time.perf_counter()
    state = agent_lib.init(config, spec, agent_lib.ActionSpec(6, True), jax.random.PRNGKey(0))
    if mesh is not None:
        state = sharding.put_replicated(state, mesh)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - start
    batches = [random_batch(spec, 6, b, t, seed=i) for i in range(2)]

    def key(i):
        k = jax.random.PRNGKey(i)
        return k if mesh is None else sharding.put_replicated(k, mesh)

    def place(batch):
        return batch if mesh is None else sharding.put_split(batch, mesh)

    start = time.perf_counter()
    state, metrics, _ = agent_lib.train(state, place(batches[0]), key(0), mesh)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        state, metrics, _ = agent_lib.train(state, place(batches[i % 2]), key(i + 1), mesh)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    return {"params": agent_lib.count_params(state.params), "init_s": init_s, "compile_s": compile_s,
            "median_ms": 1000 * float(np.median(times)), "state": state}


def bench_policy(state, spec, envs: int, repeats: int) -> tuple[float, float]:
    carry = agent_lib.initial_carry(state, envs)
    obs = {k: v[:, 0] for k, v in random_batch(spec, 6, envs, 1).items() if k in spec}
    obs["is_first"] = np.zeros(envs, bool)
    start = time.perf_counter()
    action, carry = agent_lib.policy(state, carry, obs, jax.random.PRNGKey(0))
    np.asarray(action)
    compile_s = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        action, carry = agent_lib.policy(state, carry, obs, jax.random.PRNGKey(i))
        np.asarray(action)  # the host loop needs the action back on the host every step
        times.append(time.perf_counter() - start)
    return compile_s, 1000 * float(np.median(times))


# Sequence-length sweep: the four sequence models at comparable width (deter 512, hidden/width 128), B x T = 4096.
SWEEP_MODELS = {
    "rssm": {"agent.world_model.sequence.model": "rssm", "agent.world_model.sequence.rssm.deter": 512,
             "agent.world_model.sequence.rssm.hidden": 128, "agent.world_model.units": 128,
             "agent.actor_critic.units": 128},
    "s3m": {"agent.world_model.sequence.model": "s3m", "agent.world_model.sequence.s3m.deter": 512,
            "agent.world_model.sequence.s3m.width": 128, "agent.world_model.sequence.s3m.state_size": 128,
            "agent.world_model.sequence.s3m.layers": 3, "agent.world_model.sequence.s3m.hidden": 128,
            "agent.world_model.units": 128, "agent.actor_critic.units": 128},
    "ffm": {"agent.world_model.sequence.model": "ffm", "agent.world_model.sequence.ffm.deter": 512,
            "agent.world_model.sequence.ffm.width": 128, "agent.world_model.sequence.ffm.memory": 32,
            "agent.world_model.sequence.ffm.contexts": 4, "agent.world_model.sequence.ffm.hidden": 128,
            "agent.world_model.units": 128, "agent.actor_critic.units": 128},
    # Width 128 (its output h is 128 wide, not 512), 3 layers as the S3M's, a 64-step window at every T.
    "transformer": {"agent.world_model.sequence.model": "transformer", "agent.world_model.sequence.transformer.width": 128,
                    "agent.world_model.sequence.transformer.layers": 3, "agent.world_model.sequence.transformer.heads": 4,
                    "agent.world_model.sequence.transformer.ffn": 256, "agent.world_model.sequence.transformer.window": 64,
                    "agent.world_model.sequence.transformer.hidden": 128, "agent.world_model.units": 128,
                    "agent.actor_critic.units": 128},
}
# The bsuite CPU presets of the four sequence models (their parameter counts within 10% of each other).
MEMORY_PRESETS = ("dreamer-bsuite-cpu", "r2i-bsuite-cpu", "ffm-bsuite-cpu", "transformer-bsuite-cpu")


def preset_params(presets=MEMORY_PRESETS, obs=((3,), "float32"), actions: int = 2) -> dict[str, dict[str, int]]:
    """Parameter counts (agent, world model, sequence model) of each preset for bsuite memory_len's
    spaces (3 numbers, 2 actions), from shapes alone."""
    from experiments.presets import register

    register()
    out = {}
    for name in presets:
        config = make_config([name]).agent
        state = jax.eval_shape(lambda key: agent_lib.init(config, {"vector": obs}, agent_lib.ActionSpec(actions, True),
                                                          key), jax.random.PRNGKey(0))
        count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
        out[name] = {"agent": count(state.params), "world_model": count(state.world_model),
                     "sequence_model": count(state.world_model.dynamics)}
    return out


def bench_world_model(state, batch, repeats: int) -> tuple[float, float]:
    """(compile s, median ms) of the world-model loss and its gradient alone (no imagination)."""
    import equinox as eqx

    b = batch["is_first"].shape[0]

    @eqx.filter_jit
    def wm_grad(wm, batch, key):
        return eqx.filter_value_and_grad(lambda m: m.loss(batch, m.dynamics.initial(b), key)[0])(wm)

    start = time.perf_counter()
    jax.block_until_ready(wm_grad(state.world_model, batch, jax.random.PRNGKey(0)))
    compile_s = time.perf_counter() - start
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(wm_grad(state.world_model, batch, jax.random.PRNGKey(i)))
        times.append(time.perf_counter() - start)
    return compile_s, 1000 * float(np.median(times))


def sweep(lengths: list[int], total: int, repeats: int, models=tuple(SWEEP_MODELS)) -> None:
    print(f"\nsequence-length sweep, B x T = {total}, vector observations (16), 6 actions")
    print(f"{'model':<12}{'T':>6}{'B':>5}{'params':>11}{'compile s':>11}{'train ms':>10}{'wm compile s':>14}"
          f"{'wm+grad ms':>12}")
    for t in lengths:
        for name in models:
            config = make_config([], SWEEP_MODELS[name]).agent
            state = agent_lib.init(config, VECTOR, agent_lib.ActionSpec(6, True), jax.random.PRNGKey(0))
            batch = random_batch(VECTOR, 6, total // t, t)
            wm_compile, wm_ms = bench_world_model(state, batch, repeats)
            start = time.perf_counter()
            state, metrics, _ = agent_lib.train(state, batch, jax.random.PRNGKey(0))
            jax.block_until_ready(metrics)
            compile_s = time.perf_counter() - start
            times = []
            for i in range(repeats):
                start = time.perf_counter()
                state, metrics, _ = agent_lib.train(state, batch, jax.random.PRNGKey(i + 1))
                jax.block_until_ready(metrics)
                times.append(time.perf_counter() - start)
            print(f"{name:<12}{t:>6}{total // t:>5}{agent_lib.count_params(state.params):>11,}{compile_s:>11.2f}"
                  f"{1000 * np.median(times):>10.1f}{wm_compile:>14.2f}{wm_ms:>12.1f}", flush=True)


def cli_start_up() -> None:
    """The README's default training run (size1m on CartPole) up to its first update, in fresh processes:
    cold (an empty compile cache), then warm (the cache the cold run wrote)."""
    import ast
    import subprocess
    import sys
    import tempfile

    print("training CLI (size1m, CartPole-v1) until its first update, a fresh process each")
    with tempfile.TemporaryDirectory() as tmp:
        for i, label in enumerate(["cold compile cache", "warm compile cache"]):
            cmd = [sys.executable, "-m", "experiments.train", "--preset", "size1m", "cartpole", "--run.steps", "1040",
                   "--run.logdir", os.path.join(tmp, f"run{i}"), "--run.eval-every", "0", "--run.no-progress"]
            env = {**os.environ, "WORLDMODELS_COMPILE_CACHE": os.path.join(tmp, "xla")}
            start = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            wall = time.perf_counter() - start
            summary = ast.literal_eval(out.rsplit("summary: ", 1)[1].strip())
            print(f"{label}: first update {summary['first_update_seconds']:.2f} s after the loop started "
                  f"({summary['updates']} updates); whole process {wall:.2f} s", flush=True)


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 2**20


class PeakRSS:
    """The process's peak resident memory over a `with` block, sampled every 2 ms (GiB)."""

    def __enter__(self) -> "PeakRSS":
        import threading

        self.peak, self._done = rss_gib(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, rss_gib())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, rss_gib())


def checkpoint_bench(gib: float) -> None:
    """A checkpoint of an image replay (64x64x3 frames, 4 envs) holding `gib` GiB of images in a ring
    twice that size: the time `Checkpointer.save` takes and the memory it needs on top of the replay's,
    then the same for restoring it into a fresh buffer, as a resumed run does."""
    import tempfile

    from worldmodels.checkpoint import Checkpointer
    from worldmodels.replay import ReplayBuffer

    num_envs, frame = 4, (64, 64, 3)
    spec = {"image": (frame, np.uint8), "reward": ((), np.float32), "is_first": ((), bool),
            "action": ((6,), np.float32)}
    stored = max(1, int(gib * 2**30 / (num_envs * np.prod(frame))))
    frames = np.random.default_rng(0).integers(0, 256, (64, num_envs, *frame), dtype=np.uint8)
    replay = ReplayBuffer(spec, 2 * stored * num_envs, num_envs)
    for t in range(stored):
        replay.add({"image": frames[t % 64], "reward": np.full(num_envs, t, np.float32),
                    "is_first": np.zeros(num_envs, bool), "action": np.ones((num_envs, 6), np.float32)})
    print(f"{replay.describe()}, holding {stored} steps per env ({gib:g} GiB of images)")
    with tempfile.TemporaryDirectory() as tmp, Checkpointer(tmp) as ckpt:
        before = rss_gib()
        with PeakRSS() as peak:
            start = time.perf_counter()
            ckpt.save(1, {"step": np.zeros(())}, replay.state_dict(), {"stored": stored})
            returned = time.perf_counter() - start
            ckpt.wait()
            written = time.perf_counter() - start
        print(f"save: returned after {returned:.2f} s, written after {written:.2f} s; "
              f"peak RSS {peak.peak:.2f} GiB, {peak.peak - before:+.2f} GiB over the {before:.2f} GiB before")
        expected = {k: v.copy() for k, v in replay.state_dict().items()}
        del replay
        fresh = ReplayBuffer(spec, 2 * stored * num_envs, num_envs)
        with PeakRSS() as peak:
            start = time.perf_counter()
            _, state, _, _ = ckpt.restore({"step": np.zeros(())}, fresh.state_template(stored))
            fresh.load_state_dict(state)
            elapsed = time.perf_counter() - start
        del state
        exact = all(np.array_equal(fresh.state_dict()[k], v) for k, v in expected.items())
        after = rss_gib()
        print(f"restore into a fresh buffer: {elapsed:.2f} s; peak RSS {peak.peak:.2f} GiB, "
              f"{peak.peak - after:+.2f} GiB over the {after:.2f} GiB held after it; restored exactly: {exact}")


def devices_table(args) -> None:
    """`--devices`: one process per device count (forced host devices on a CPU), a row per case each."""
    platform = jax.devices()[0].platform
    print(f"jax {jax.__version__} on {platform} ({jax.device_count()} visible); batch {args.batch} x {args.seq} "
          f"split over the devices; {args.compute_dtype} compute; median of {args.repeats}")
    if platform == "cpu":
        print(f"forced host devices on {os.cpu_count()} cores: this shows the cost of splitting, not a speed-up")
    print(f"{'case':<15}{'devices':>8}{'batch per device':>18}{'compile s':>11}{'ms/update':>12}")
    for n in args.devices:
        env = dict(os.environ)
        if platform == "cpu":
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        argv = [sys.executable, "-m", "experiments.bench", "--on-mesh", str(n), "--cases", *args.cases,
                "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats),
                "--compute-dtype", args.compute_dtype]
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: --devices {n}: {done.stderr.strip().splitlines()[-1]}")
        print(done.stdout, end="", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep", action="store_true", help="only the sequence-length sweep of the four models")
    parser.add_argument("--models", nargs="+", default=list(SWEEP_MODELS), choices=list(SWEEP_MODELS),
                        help="the sweep's sequence models")
    parser.add_argument("--params", action="store_true",
                        help="only the parameter counts of the four bsuite CPU presets")
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--total", type=int, default=4096, help="B x T of the sweep")
    parser.add_argument("--compile-cache", metavar="DIR", default=None,
                        help="use JAX's persistent compilation cache in DIR (as the training CLI does): run "
                             "twice to measure a warm start-up")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the networks' compute dtype (parameters stay float32)")
    parser.add_argument("--cli", action="store_true",
                        help="only the training CLI's time to its first update, with a cold and a warm compile cache")
    parser.add_argument("--checkpoint", type=float, metavar="GIB", default=None,
                        help="only a checkpoint's save and restore of a replay holding GIB GiB of images")
    parser.add_argument("--devices", type=int, nargs="+", default=None, metavar="N",
                        help="only the train step on a mesh of N devices, for each N (a process each)")
    parser.add_argument("--on-mesh", type=int, default=None, help=argparse.SUPPRESS)  # one --devices process
    args = parser.parse_args()
    if args.params:
        print(f"{'preset':<24}{'agent':>10}{'world model':>13}{'sequence model':>16}")
        for name, n in preset_params().items():
            print(f"{name:<24}{n['agent']:>10,}{n['world_model']:>13,}{n['sequence_model']:>16,}")
        return
    if args.devices:
        devices_table(args)
        return
    if args.on_mesh:
        mesh = sharding.make_mesh(f"data={args.on_mesh}")
        sharding.check_batch("--batch", args.batch, mesh)
        mesh = mesh if args.on_mesh > 1 else None  # one device: the plain program, as the host loop runs it
        for name in args.cases:
            preset, spec = CASES[name]
            r = bench_train(preset, spec, args.batch, args.seq, args.repeats, args.compute_dtype, mesh)
            print(f"{name:<15}{args.on_mesh:>8}{args.batch // args.on_mesh:>18}{r['compile_s']:>11.2f}"
                  f"{r['median_ms']:>12.1f}", flush=True)
        return
    if args.checkpoint is not None:
        checkpoint_bench(args.checkpoint)
        return
    if args.cli:
        cli_start_up()
        return
    if args.compile_cache:
        from experiments.train import enable_compile_cache

        enable_compile_cache(args.compile_cache)
    if args.sweep:
        print(f"jax {jax.__version__} on {jax.devices()[0].platform}; float32; {huge_pages()}")
        sweep(args.lengths, args.total, args.repeats, args.models)
        print(f"peak RSS: {peak_rss_mib():.0f} MiB")
        return
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; batch {args.batch} x {args.seq}; "
          f"{args.compute_dtype} compute; {huge_pages()}")
    print(f"{'case':<15}{'params':>12}{'init s':>9}{'compile s':>11}{'start-up s':>12}{'ms/step':>10}")
    first_state = None
    for name in args.cases:
        preset, spec = CASES[name]
        r = bench_train(preset, spec, args.batch, args.seq, args.repeats, args.compute_dtype)
        print(f"{name:<15}{r['params']:>12,}{r['init_s']:>9.2f}{r['compile_s']:>11.2f}"
              f"{r['init_s'] + r['compile_s']:>12.2f}{r['median_ms']:>10.1f}", flush=True)
        if first_state is None:
            first_state, first_spec, first_name = r["state"], spec, name
    for envs in (1, 16):
        compile_s, ms = bench_policy(first_state, first_spec, envs, 200)
        print(f"policy step ({first_name}, {envs:>2} envs): compile {compile_s:.2f} s, median {ms:.2f} ms")
    print(f"peak RSS: {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
