"""Many devices on this CPU (forced host devices, in subprocesses): one update and one policy step on
4 devices equal those on 1 with the same global batch and keys; the 4-device program is compiled
once and reduces across devices; the host loop trains and resumes on a mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import worldmodels
from worldmodels import sharding

ROOT = Path(__file__).resolve().parents[1]
SPREAD_OVER_WORKERS = True  # its tests run their own processes; those that share `steps` run together
SHARED_STEPS = pytest.mark.xdist_group("test_sharding.steps")


def run_on(devices: int, argv: list[str], cwd: Path, compile_cache: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONPATH": str(ROOT), "WORLDMODELS_HUGEPAGES": "0", "WORLDMODELS_COMPILE_CACHE": compile_cache}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """{devices or mesh spec: the .npz of tests/sharded_step.py on that mesh}."""
    out = {}
    for devices, spec in ((1, "data"), (4, "data"), (4, "data=2,fsdp=2")):
        path = tmp_path_factory.mktemp("sharded") / "step.npz"
        done = run_on(devices, [str(ROOT / "tests" / "sharded_step.py"), str(path), spec], ROOT)
        assert done.returncode == 0, done.stderr[-3000:]
        out[devices if spec == "data" else spec] = dict(np.load(path))
    return out


@SHARED_STEPS
def test_one_update_and_policy_step_on_4_devices_equal_1(steps):
    one, four = steps[1], steps[4]
    assert (int(one["devices"]), int(four["devices"])) == (1, 4)
    assert "'data': 4" in str(four["state_sharding"]) and "spec=P()" in str(four["state_sharding"])  # replicated
    names = [k for k in one if k.startswith(("metric/", "param/"))]
    assert set(names) == {k for k in four if k.startswith(("metric/", "param/"))}
    assert sum(k.startswith("param/") for k in names) > 20
    for name in names:  # forced devices reorder float sums: equal to rounding after two updates
        np.testing.assert_allclose(four[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    assert float(one["metric/loss/total"]) > 0
    np.testing.assert_array_equal(four["action"], one["action"])  # one-hot samples from the same keys
    np.testing.assert_array_equal(four["action_greedy"], one["action_greedy"])
    np.testing.assert_allclose(four["latent"], one["latent"], rtol=1e-4, atol=1e-5)


@SHARED_STEPS
def test_an_fsdp_axis_splits_the_big_state_arrays_and_updates_as_one_device_does(steps):
    one, fsdp = steps[1], steps["data=2,fsdp=2"]
    assert int(fsdp["devices"]) == 4 and int(fsdp["traces"]) == 1
    # the parameters and optimiser moments of at least FSDP_MIN_SIZE elements: each device holds half
    assert int(fsdp["split_leaves"]) >= 6 and int(fsdp["split_bytes"]) > 0.3 * int(fsdp["state_bytes"])
    assert int(fsdp["split_shard_bytes"]) * 2 == int(fsdp["split_bytes"])
    assert bool(fsdp["all_gather"]) and bool(fsdp["all_reduce"])  # XLA gathers the split arrays
    for name in [k for k in one if k.startswith(("metric/", "param/"))]:
        np.testing.assert_allclose(fsdp[name], one[name], rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(fsdp["action"], one["action"])


@SHARED_STEPS
def test_the_4_device_program_compiles_once_and_reduces_across_devices(steps):
    assert int(steps[4]["traces"]) == 1  # lowered once; the two updates after it reuse it
    assert bool(steps[4]["all_reduce"])  # XLA's gradient reduction across the data axis
    assert not bool(steps[1]["all_reduce"])


def test_host_loop_trains_on_4_devices_with_fsdp_and_resumes_on_2(tmp_path):
    common = ["-m", "experiments.train", "--preset", "debug", "--env", "bsuite/catch/0", "--run.num-envs", "4",
              "--run.train-ratio", "16", "--run.logdir", str(tmp_path / "run"), "--run.final-eval-episodes", "1"]
    first = run_on(4, [*common, "--run.steps", "192", "--run.mesh", "data=2,fsdp=2"], tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "mesh: 4 devices on the data axis" in first.stdout and "and the env batch" in first.stdout
    assert "the agent state's big arrays split over 2 (fsdp)" in first.stdout
    # the checkpoint holds whole arrays and replay is on the host: another mesh and device count resumes
    second = run_on(2, [*common, "--run.steps", "256"], tmp_path)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in second.stdout and "at env step 192" in second.stdout
    summary = second.stdout.split("summary: ")[-1]
    assert "'env_steps': 256" in summary
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["updates"] > metrics[0]["updates"] > 0 and np.isfinite(metrics[-1]["loss/total"])
    # written on 2 devices, loaded and acting in this 1-device process (as a GPU run loads on a CPU)
    policy = worldmodels.load(tmp_path / "run")
    assert policy.step == 256
    assert {d for leaf in jax.tree.leaves(policy.agent_state) for d in leaf.devices()} == {jax.devices()[0]}
    assert policy.act(np.zeros(policy.observation_space.shape, np.float32)) in (0, 1, 2)
    # a batch that 4 devices do not split: refused before compiling, naming the nearest sizes
    bad = run_on(4, [*common[:-2], "--run.logdir", str(tmp_path / "bad"), "--run.batch-size", "6",
                     "--run.steps", "64"], tmp_path)
    assert bad.returncode != 0
    assert "--run.batch-size 6 does not split over the mesh's 4 devices" in bad.stderr + bad.stdout
    assert "nearest: 4 or 8" in bad.stderr + bad.stdout


def test_device_loop_trains_on_4_devices_and_resumes(tmp_path):
    common = ["-m", "experiments.train", "--device-loop", "--preset", "debug", "--env", "bsuite/catch/0",
              "--run.num-envs", "4", "--run.log-every", "128", "--run.train-start", "64", "--run.logdir",
              str(tmp_path / "run"), "--run.final-eval-episodes", "1"]
    cache = str(tmp_path / "cache")  # the resumed run loads the first one's chunk program
    first = run_on(4, [*common, "--run.steps", "128"], tmp_path, cache)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "mesh: 4 devices (cpu); the 4 envs and their replay split over them" in first.stdout
    second = run_on(4, [*common, "--run.steps", "256"], tmp_path, cache)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "resumed from" in second.stdout and "at env step 128" in second.stdout
    assert "'env_steps': 256" in second.stdout.split("summary: ")[-1]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["updates"] > metrics[0]["updates"] > 0 and np.isfinite(metrics[-1]["loss/total"])
    bad = run_on(4, [*common[:7], "--run.num-envs", "6", "--run.logdir", str(tmp_path / "bad")], tmp_path)
    assert bad.returncode != 0 and "--run.num-envs 6 does not split over the mesh's 4 devices" in bad.stdout + bad.stderr


class FakeMesh:
    shape = {"data": 4}
    devices = np.zeros((4,))


def test_batch_sizes_the_data_axis_does_not_divide_are_refused_with_the_nearest():
    sharding.check_batch("--run.batch-size", 16, FakeMesh())
    with pytest.raises(ValueError, match=r"--run.batch-size 10 does not split over the mesh's 4 devices: use a "
                                         r"multiple of 4 \(nearest: 8 or 12\)"):
        sharding.check_batch("--run.batch-size", 10, FakeMesh())
    with pytest.raises(ValueError, match=r"nearest: 4\)"):
        sharding.check_batch("--run.batch-size", 2, FakeMesh())


def test_mesh_specs():
    assert sharding.data_size(sharding.make_mesh("data")) == 1  # this process: one CPU device
    with pytest.raises(ValueError, match="asks for 2 devices; 1 are visible"):
        sharding.make_mesh("data=2")
    with pytest.raises(ValueError, match="use 'data'"):
        sharding.make_mesh("model=2")
    assert sharding.parse_mesh("data=2,fsdp=4") == (2, 4) and sharding.parse_mesh("fsdp=2") == (None, 2)
    assert sharding.devices_asked("data=2,fsdp=4") == 8 and sharding.devices_asked("fsdp=2") is None
    for bad in ("fsdp", "data=2,data=2", "data=0", "fsdp=x"):
        with pytest.raises(ValueError, match="is not a mesh this agent runs on"):
            sharding.parse_mesh(bad)
    with pytest.raises(ValueError, match="asks for 2 devices; 1 are visible"):
        sharding.make_mesh("fsdp=2")
