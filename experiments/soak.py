"""Kill -9 soak: a training run killed with SIGKILL at random moments, restarted in its run dir each time.

    python -m experiments.soak --kills 20                  # host loop, envs in processes (--run.parallel-envs)
    python -m experiments.soak --kills 20 --device-loop    # the device loop (JAX env, one compiled chunk)

Each life of the run is `python -m experiments.train` (the debug preset on bsuite catch/0, which is
deterministic for a seed) in the same run dir, and is killed with SIGKILL (as the OOM killer or a
preemption does: no handler runs) at one of three kinds of moments, in turn: while a checkpoint is
being written (the soak watches for orbax's temporary step directory), during start-up (restore,
compile), or at a random env step. After each kill the soak checks every checkpoint left in the run
dir (its metadata and arrays must read), counts the env processes left behind, keeps a copy of the
run dir as it was, and starts the next life. The last life runs to the end. Then:

- env steps lost per kill: the last env step the killed life logged minus the step the next life
  resumed from (it must be <= `run.checkpoint_every`; logs come every `run.log_every` steps);
- continuation: the training records (every logged loss and metric but times and speeds, every
  episode's return and length) of each life after a restore are compared with a clean resume from
  the copy of the same checkpoint, run to the step that life reached: they must be bit-identical.
  With the device loop the whole run, its final checkpoint's arrays included, must equal an
  uninterrupted run from the same seed; the host loop's envs start new episodes after a restore (env
  processes are not saved), so there the first life and each continuation are compared instead.

It exits 1 if any check fails. Run dirs go to `--dir` (default: a new temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# What a record of the run's logs may differ in between identical runs: wall-clock times and speeds.
UNTIMED = ("time", "env_steps_per_s", "updates_per_s")
RESUMED = re.compile(r"resumed from .* at env step (\d+)")
TMP_MARK = ".orbax-checkpoint-tmp"


@dataclass
class Life:
    """One process of the run: where it started, how it ended."""

    index: int
    kill: str  # "checkpoint write", "start-up", "random step" or "" (ran to the end)
    resumed_from: int = 0
    last_logged: int = 0  # the last env step in metrics.jsonl when it was killed (or ended)
    exit_code: int | None = None
    seconds: float = 0.0
    orphans: int = 0  # env processes still alive 10 s after the kill
    corrupt: list[str] = field(default_factory=list)
    snapshot: Path | None = None  # a copy of the run dir as this life left it


def train_argv(device_loop: bool, logdir: Path, steps: int, checkpoint_every: int, log_every: int,
               seed: int, final_eval: int = 5) -> list[str]:
    argv = [sys.executable, "-m", "experiments.train", "--preset", "debug", "--env", "bsuite/catch/0",
            "--run.steps", str(steps), "--run.checkpoint-every", str(checkpoint_every),
            "--run.log-every", str(log_every), "--run.seed", str(seed), "--run.logdir", str(logdir),
            "--run.final-eval-episodes", str(final_eval), "--run.train-ratio", "16", "--run.no-progress"]
    if device_loop:
        return argv + ["--device-loop", "--run.num-envs", "4"]
    return argv + ["--run.parallel-envs", "--run.num-envs", "2"]


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def log_records(path: Path, skip: set[str] = frozenset()) -> list[dict]:
    """The records of a JSON-lines log, but the lines in `skip` and a last line cut by a kill."""
    lines = [line for line in log_lines(path) if line not in skip]
    if lines and not lines[-1].endswith("}"):
        lines = lines[:-1]
    return [json.loads(line) for line in lines]


def last_logged_step(logdir: Path, earlier: set[str] = frozenset(), default: int = 0) -> int:
    """The last env step in metrics.jsonl among the lines not in `earlier` (`default` if none)."""
    return max((r["env_step"] for r in log_records(logdir / "metrics.jsonl", earlier)), default=default)


def records(logdir: Path, after: int, upto: int, modes: tuple[str, ...] = ("train",)) -> list[tuple]:
    """The run's records in (after, upto]: metrics without times and speeds, and the scores of `modes`."""
    return [(name, *sorted((k, v) for k, v in r.items() if k not in UNTIMED))
            for name in ("metrics.jsonl", "scores.jsonl") for r in log_records(logdir / name)
            if after < r["env_step"] <= upto and r.get("mode", "train") in modes]


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def check_checkpoints(logdir: Path) -> list[str]:
    """Every finalised checkpoint's metadata and arrays must read; returns what did not."""
    import warnings

    import orbax.checkpoint as ocp

    from worldmodels.checkpoint import Checkpointer

    warnings.filterwarnings("ignore", message="Sharding info not provided")  # a raw read: no template
    problems = []
    with Checkpointer(logdir / "checkpoints") as ckpt:
        for step in ckpt.all_steps():
            try:
                ckpt.read_meta(step)
                for item in ("agent", "replay"):
                    path = Path(ckpt.directory) / str(step) / item
                    if path.exists():
                        ocp.PyTreeCheckpointer().restore(path)
            except Exception as e:  # noqa: BLE001 (any failure to read is what is counted)
                problems.append(f"step {step}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return problems


def final_arrays(logdir: Path) -> dict:
    """The arrays of the last checkpoint's agent item (the device loop's whole carry), as numpy."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from worldmodels.checkpoint import Checkpointer

    with Checkpointer(logdir / "checkpoints") as ckpt:
        step = ckpt.latest_step()
        tree = ocp.PyTreeCheckpointer().restore(Path(ckpt.directory) / str(step) / "agent")
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def arrays_equal(a: dict, b: dict) -> list[str]:
    """The leaves that differ (bitwise), or are missing on one side."""
    import numpy as np

    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in a or k not in b or a[k].shape != b[k].shape
            or a[k].tobytes() != b[k].tobytes() or not np.array_equal(a[k].dtype, b[k].dtype)]


def wait_for(predicate, process: subprocess.Popen, timeout: float, poll: float) -> bool:
    """Poll `predicate` until it holds (True) or the process ends or `timeout` passes (False)."""
    end = time.time() + timeout
    while time.time() < end and process.poll() is None:
        if predicate():
            return True
        time.sleep(poll)
    return False


def live(index: int, kill: str, argv: list[str], logdir: Path, log: Path, args, rng: random.Random,
         resumed_from: int) -> Life:
    """Start one life of the run and kill it the chosen way (or, with kill "", let it end)."""
    life = Life(index, kill, resumed_from=resumed_from)
    earlier = set(log_lines(logdir / "metrics.jsonl"))  # what earlier lives logged: this life's progress is in new lines
    start = time.time()
    with open(log, "w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    ckpt_dir = logdir / "checkpoints"
    if kill == "checkpoint write":  # watch for orbax's temporary step directory, kill the moment it shows
        caught = wait_for(lambda: ckpt_dir.exists() and any(TMP_MARK in p for p in os.listdir(ckpt_dir)),
                          process, args.life_timeout, 0.0005)
        if not caught:
            life.kill = "random step (no checkpoint write caught)"
    elif kill == "start-up":
        wait_for(lambda: False, process, rng.uniform(0.5, args.startup_seconds), 0.05)
    elif kill == "random step":  # at a random env step within 1.5 checkpoint intervals of the restore
        target = resumed_from + rng.uniform(0.1, 1.5) * args.checkpoint_every
        target = min(target, args.steps - args.log_every)
        wait_for(lambda: last_logged_step(logdir, earlier) >= target, process, args.life_timeout, 0.02)
        time.sleep(rng.uniform(0.0, 0.3))
    if kill:
        kids = children(process.pid)
        process.send_signal(signal.SIGKILL)
    life.exit_code = process.wait(timeout=None if not kill else 60)
    life.seconds = time.time() - start
    if kill:
        deadline = time.time() + 10
        while time.time() < deadline and any(alive(k) for k in kids):
            time.sleep(0.1)
        life.orphans = sum(alive(k) for k in kids)
        for k in kids:  # do not leave them running whatever the count says
            if alive(k):
                os.kill(k, signal.SIGKILL)
    # a life killed before it logged anything reached only the step it (would have) resumed from
    life.last_logged = last_logged_step(logdir, earlier, default=resumed_from)
    return life


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--device-loop", action="store_true", help="soak the device loop instead of the host loop")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (and the kill moments')")
    parser.add_argument("--checkpoint-every", type=int, default=256, help="env steps between checkpoints")
    parser.add_argument("--log-every", type=int, default=32, help="env steps between logs (device loop: a chunk)")
    parser.add_argument("--steps", type=int, default=None,
                        help="the run's env steps (default: (kills / 2 + 2) checkpoint intervals)")
    parser.add_argument("--startup-seconds", type=float, default=8.0, help="start-up kills come 0.5-this s in")
    parser.add_argument("--life-timeout", type=float, default=300.0, help="seconds a life may take to reach its kill")
    parser.add_argument("--dir", default=None, help="where the run dirs go (default: a new temporary folder)")
    args = parser.parse_args(argv)
    if args.checkpoint_every % args.log_every:
        raise SystemExit("error: --checkpoint-every must be a multiple of --log-every")
    if args.steps is None:
        args.steps = (args.kills // 2 + 2) * args.checkpoint_every
    root = Path(args.dir or tempfile.mkdtemp(prefix="soak-"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir, snapshots = root / "run", root / "snapshots"
    for path in (run_dir, snapshots, root / "uninterrupted", root / "references"):
        shutil.rmtree(path, ignore_errors=True)
    snapshots.mkdir()
    rng = random.Random(args.seed)
    loop_name = "device loop" if args.device_loop else "host loop, parallel envs"
    print(f"soak of the {loop_name}: {args.kills} kills, {args.steps} env steps, a checkpoint every "
          f"{args.checkpoint_every}, logs every {args.log_every}; run dirs in {root}", flush=True)
    argv_for = lambda logdir, steps=args.steps, final_eval=5: train_argv(
        args.device_loop, logdir, steps, args.checkpoint_every, args.log_every, args.seed, final_eval)

    lives: list[Life] = []
    kinds = ["checkpoint write", "start-up", "random step", "random step"]
    resumed_from = 0
    for i in range(args.kills + 1):
        kill = kinds[i % len(kinds)] if i < args.kills else ""
        log = root / f"life{i:02d}.log"
        life = live(i, kill, argv_for(run_dir), run_dir, log, args, rng, resumed_from)
        found = RESUMED.search(log.read_text())
        if found:  # else it was killed before it restored: the newest checkpoint stays the guess
            life.resumed_from = int(found.group(1))
        if kill:  # copy the run dir as the kill left it, then check the copy (opening it cleans up)
            life.snapshot = snapshots / f"after{i:02d}"
            shutil.copytree(run_dir, life.snapshot)
            life.corrupt = check_checkpoints(life.snapshot)
        lives.append(life)
        # the step the next life resumes from is read from its log; until then, the newest checkpoint
        steps = sorted(int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()) if kill else []
        resumed_from = steps[-1] if steps else 0
        print(f"life {i:2d}: resumed from {life.resumed_from:5d}, " + (
            f"killed ({life.kill}) after {life.seconds:5.1f} s, last logged step {life.last_logged:5d}, "
            f"checkpoints {steps}, corrupt {len(life.corrupt)}, env processes left {life.orphans}" if kill else
            f"ran to the end in {life.seconds:.1f} s, exit {life.exit_code}"), flush=True)
    final = lives[-1]
    final.snapshot = run_dir

    failures = []
    # a kill is survived when the next life resumed from a checkpoint at or past the one before and
    # went on (until killed in turn, or to the end with exit code 0)
    survived = sum(after.exit_code in (0, -signal.SIGKILL) and after.resumed_from >= before.resumed_from
                   for before, after in zip(lives[:-1], lives[1:]))
    if final.exit_code != 0:
        failures.append(f"the last life exited with {final.exit_code} (see {root / f'life{final.index:02d}.log'})")
    lost = []
    for before, after in zip(lives[:-1], lives[1:]):
        lost.append(max(before.last_logged - after.resumed_from, 0))
        if after.resumed_from > before.last_logged + args.log_every:
            failures.append(f"life {after.index} resumed from step {after.resumed_from}, beyond what life "
                            f"{before.index} reached ({before.last_logged})")
    if max(lost, default=0) > args.checkpoint_every:
        failures.append(f"a kill lost {max(lost)} env steps, more than the checkpoint interval")
    corrupt = sum(len(life.corrupt) for life in lives)
    if corrupt:
        failures.append(f"{corrupt} corrupt checkpoints: {[c for life in lives for c in life.corrupt]}")
    orphans = sum(life.orphans for life in lives)
    if orphans:
        failures.append(f"{orphans} env processes outlived their killed parent by 10 s")

    print("the uninterrupted run from the same seed ...", flush=True)
    clean = root / "uninterrupted"
    with open(root / "uninterrupted.log", "w") as out:
        code = subprocess.call(argv_for(clean), stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        failures.append(f"the uninterrupted run exited with {code}")

    checks = []  # (what, identical)
    if args.device_loop:  # the whole run, its greedy episodes at the end included
        modes = ("train", "eval")
        got, want = records(run_dir, 0, args.steps, modes), records(clean, 0, args.steps, modes)
        checks.append((f"the whole run's logged losses, metrics and episodes ({len(want)} records)",
                       got == want and len(want) > 0))
        differ = arrays_equal(final_arrays(run_dir), final_arrays(clean))
        checks.append((f"the final checkpoint's loop carry ({len(final_arrays(clean))} arrays)", not differ))
        if differ:
            print("  differing arrays:", differ[:8])
    else:  # up to the first kill the run is the uninterrupted one
        upto = lives[0].last_logged
        got, want = records(lives[0].snapshot, 0, upto), records(clean, 0, upto)
        checks.append((f"life 0 (no restore) vs the uninterrupted run, steps 0-{upto} ({len(want)} records)",
                       got == want))
    # Each life after a restore vs a clean resume from a copy of the run dir it started from.
    for life in lives[1:]:
        if life.resumed_from == 0 or life.last_logged <= life.resumed_from:
            continue  # started afresh (no checkpoint yet), or killed before it logged anything new
        reference = root / "references" / f"life{life.index:02d}"
        shutil.copytree(lives[life.index - 1].snapshot, reference)
        upto = life.last_logged
        ref_log = root / "references" / f"life{life.index:02d}.log"
        with open(ref_log, "w") as out:
            code = subprocess.call(argv_for(reference, steps=upto, final_eval=0), stdout=out, stderr=subprocess.STDOUT)
        found = RESUMED.search(ref_log.read_text())
        start = int(found.group(1)) if found else -1
        got, want = records(life.snapshot, start, upto), records(reference, start, upto)
        ok = code == 0 and start == life.resumed_from and got == want and len(got) > 0
        checks.append((f"life {life.index}: steps {start}-{upto} after the restore ({len(got)} records)", ok))
        print(f"  {checks[-1][0]}: {'identical' if ok else 'DIFFERENT'}", flush=True)
    failures += [f"not identical: {what}" for what, ok in checks if not ok]

    kinds_done: dict[str, int] = {}
    for life in lives[:-1]:
        kinds_done[life.kill] = kinds_done.get(life.kill, 0) + 1
    print(f"\nsoak of the {loop_name}, seed {args.seed}")
    print(f"kills survived: {survived} / {args.kills} ({', '.join(f'{n} {k}' for k, n in kinds_done.items())})")
    print(f"env steps lost per kill: max {max(lost, default=0)}, mean {sum(lost) / max(len(lost), 1):.0f} "
          f"(checkpoint interval {args.checkpoint_every}; counted to the last step logged, every {args.log_every})")
    print(f"corrupt checkpoints found: {corrupt}; env processes left behind: {orphans}")
    print(f"continuations bit-identical: {sum(ok for _, ok in checks)} / {len(checks)}")
    for what, ok in checks:
        print(f"  {'identical' if ok else 'DIFFERENT'}: {what}")
    print(f"final summary, killed run:        {read_summary(root / f'life{final.index:02d}.log')}")
    print(f"final summary, uninterrupted run: {read_summary(root / 'uninterrupted.log')}"
          + ("" if args.device_loop else " (the host loop's env processes start new episodes after a restore)"))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures))
        return 1
    print("PASSED")
    return 0


def read_summary(log: Path) -> str:
    text = log.read_text() if log.exists() else ""
    found = re.findall(r"^summary: (.*)$", text, re.M)
    if not found:
        return "-"
    keep = re.findall(r"'(env_steps|updates|episodes|recent_return|eval_return)': ([^,}]+)", found[-1])
    return ", ".join(f"{k} {v}" for k, v in keep)


if __name__ == "__main__":
    sys.exit(main())
