"""Many hosts on this CPU: two `jax.distributed` processes on 127.0.0.1, 2 forced CPU devices each, train
catch together, are killed after a checkpoint, resume and finish; each owns its replay shard and both hold
the same parameters. Bad set-ups fail with errors that name the problem."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

import worldmodels

SPREAD_OVER_WORKERS = True  # each test runs its own processes: tests/conftest.py spreads them over workers

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(cache: Path) -> dict:
    # a compile cache of the test's own (many processes do not use it: see experiments.train.main)
    return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT),
            "WORLDMODELS_HUGEPAGES": "0", "WORLDMODELS_COMPILE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def launch(logdir: Path, port: int, steps: int, cache: Path, processes: int = 2) -> list[subprocess.Popen]:
    argv = [sys.executable, str(ROOT / "tests" / "multiprocess_train.py"), "--preset", "debug", "--env",
            "bsuite/catch/0", "--run.steps", str(steps), "--run.train-start", "16", "--run.train-ratio", "8",
            "--run.checkpoint-every", "32",
            "--run.final-eval-episodes", "1", "--run.logdir", str(logdir), "--run.no-progress"]
    if processes > 1:
        argv += ["--run.coordinator", f"127.0.0.1:{port}", "--run.num-processes", str(processes)]
    return [subprocess.Popen([*argv, *(["--run.process-id", str(k)] if processes > 1 else [])], cwd=logdir.parent,
                             env=environment(cache), stdout=open(logdir.parent / f"{logdir.name}.{port}.{k}.log", "w"),
                             stderr=subprocess.STDOUT)
            for k in range(processes)]


def output(logdir: Path, port: int, k: int) -> str:
    return (logdir.parent / f"{logdir.name}.{port}.{k}.log").read_text()


def wait_all(processes: list[subprocess.Popen], timeout: float = 900) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for p in processes:
        try:
            codes.append(p.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    return codes


def test_two_processes_train_are_killed_resume_and_keep_the_same_parameters(tmp_path):
    logdir, cache = tmp_path / "run", tmp_path / "cache"
    logdir.mkdir()
    port = free_port()
    first = launch(logdir, port, 96, cache)
    # killed once both processes hold a checkpoint after some updates (process 0: the agent and its
    # replay; process 1: its shard)
    shard = logdir / "process1" / "checkpoints"
    deadline = time.monotonic() + 900
    while not ((logdir / "checkpoints" / "64").is_dir() and (shard / "64").is_dir()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in first), \
            output(logdir, port, 0)[-3000:] + output(logdir, port, 1)[-3000:]
        time.sleep(0.5)
    for p in first:
        p.send_signal(signal.SIGKILL)
    wait_all(first)

    port2 = free_port()
    second = launch(logdir, port2, 96, cache)
    assert wait_all(second) == [0, 0], output(logdir, port2, 0)[-3000:] + output(logdir, port2, 1)[-3000:]
    outs = [output(logdir, port2, k) for k in (0, 1)]
    resumed = [out.split("resumed from ")[1].split("\n")[0] for out in outs if "resumed from" in out]
    assert len(resumed) == 2 and resumed[0] == resumed[1]  # the same step in both, after some updates
    assert int(resumed[0].split("at env step ")[1].split()[0]) >= 64 and "(0 updates)" not in resumed[0]
    for out in outs:
        assert "mesh: 4 devices on the data axis (cpu, 2 processes)" in out
        assert "'env_steps': 96" in out.split("summary: ")[-1]
    assert "greedy evaluation" in outs[0] and "greedy evaluation" not in outs[1]  # process 0 evaluates and logs

    # the same parameters in both processes, and they trained (they differ from a fresh agent's)
    params = [np.load(logdir / f"params.process{k}.npz") for k in (0, 1)]
    assert len(params[0].files) > 20
    for name in params[0].files:
        np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)
    # each process's replay shard: its own envs' episodes
    mine = dict(np.load(shard / "96" / "arrays.npz"))["replay/data/vector"]
    main = ocp.PyTreeCheckpointer().restore(logdir / "checkpoints" / "96" / "replay")["data/vector"]
    assert mine.shape == main.shape == (1, 48, 50)
    assert not np.array_equal(mine, main)
    scores = [(logdir / "scores.jsonl").read_text(), (logdir / "process1" / "scores.jsonl").read_text()]
    assert scores[0] and scores[1] and scores[0] != scores[1]
    # the agent was written once, by process 0, and loads in this one-device process
    policy = worldmodels.load(logdir)
    assert policy.step == 96
    for got, saved in zip(jax_leaves(policy.agent_state.params), params[0].values()):
        np.testing.assert_array_equal(got, saved)

    # another process count is refused, naming both counts
    alone = launch(logdir, 0, 128, cache, processes=1)
    assert wait_all(alone) != [0]
    assert "holds a run of 2 process(es); this one has 1" in output(logdir, 0, 0)


def jax_leaves(tree):
    import equinox as eqx
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def test_an_unreachable_coordinator_is_an_error_naming_it_in_bounded_time(tmp_path):
    port = free_port()  # nobody listens there
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "experiments.train", "--preset", "debug", "--env", "bsuite/catch/0",
                           "--run.coordinator", f"127.0.0.1:{port}", "--run.num-processes", "2",
                           "--run.process-id", "1", "--run.coordinator-timeout", "3",
                           "--run.logdir", str(tmp_path / "run")],
                          cwd=tmp_path, env=environment(tmp_path / "cache"), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"the coordinator at 127.0.0.1:{port} could not be reached within 3 s" in done.stderr + done.stdout
    assert time.monotonic() - start < 120


def test_a_process_shard_checkpoint_round_trips_exactly_and_a_crashed_save_leaves_no_step(tmp_path):
    import jax.numpy as jnp

    from worldmodels.checkpoint import CheckpointMismatchError, ProcessShardCheckpointer

    shard = ProcessShardCheckpointer(tmp_path / "shard", max_to_keep=2)
    rng = np.random.default_rng(0)
    agent = {"carry": (jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),), "key": jnp.arange(2, dtype=jnp.uint32)}
    replay = {"data/obs": rng.normal(size=(2, 5, 4)).astype(np.float32), "counter/written": np.array(7, np.int64),
              "loop/episode_length": np.array([3, 4], np.int64)}
    for step in (10, 20, 30):
        shard.save(step, agent, replay, {"counters": {"env_steps": step}}, {"envs": b"\x00pickled\xff"})
    assert shard.all_steps() == [20, 30]  # max_to_keep
    (tmp_path / "shard" / "40.tmp").mkdir()  # a save that crashed before its rename
    shard = ProcessShardCheckpointer(tmp_path / "shard")
    assert shard.all_steps() == [20, 30] and not (tmp_path / "shard" / "40.tmp").exists()
    into = {k: np.zeros_like(v) for k, v in replay.items()}
    got_agent, got_replay, meta, blobs = shard.restore(agent, into)
    assert meta == {"counters": {"env_steps": 30}} and blobs == {"envs": b"\x00pickled\xff"}
    for k, v in replay.items():
        assert got_replay[k].dtype == v.dtype
        np.testing.assert_array_equal(got_replay[k], v)
    assert got_replay["data/obs"] is into["data/obs"]  # filled in place
    np.testing.assert_array_equal(got_agent["carry"][0], agent["carry"][0])
    np.testing.assert_array_equal(got_agent["key"], agent["key"])
    with pytest.raises(CheckpointMismatchError, match="does not match the expected replay state"):
        shard.restore(agent, {"data/obs": np.zeros((2, 6, 4), np.float32)})
