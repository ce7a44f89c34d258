"""Checkpoint faults: a truncated or corrupt latest checkpoint makes resume fall back to the one
before it, with a warning naming it; a run with no readable checkpoint says so and how to start fresh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import envs
from envs import jax as jax_envs
from worldmodels import loop
from worldmodels.config import make_config
from worldmodels.resume import NoUsableCheckpointError


def cartpole(seed):
    return envs.make("gym:CartPole-v1", seed=seed)


def debug_config(logdir, steps, **run):
    return make_config(["debug"], {"run.logdir": str(logdir), "run.steps": steps, "run.checkpoint_every": 128,
                                   "run.final_eval_episodes": 0, **{f"run.{k}": v for k, v in run.items()}})


def truncate_arrays(step_dir: Path) -> None:
    """Cut every array data file of a checkpoint to half its size, as a crash mid-copy would."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def test_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
    loop.run(debug_config(tmp_path, 256), cartpole)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [128, 256]
    truncate_arrays(tmp_path / "checkpoints" / "256")
    with pytest.warns(UserWarning, match="checkpoint of step 256 .* cannot be read .* the one before it, step 128"):
        resumed = loop.run(debug_config(tmp_path, 320), cartpole)
    assert resumed["env_steps"] == 320
    # the logs of the steps after 128 were dropped and written again: no step twice
    steps = [r["env_step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").open())]
    assert steps == sorted(set(steps)) and 128 in steps and 320 in steps


def test_no_readable_checkpoint_says_how_to_start_fresh(tmp_path):
    loop.run(debug_config(tmp_path, 256), cartpole)
    for step in ("128", "256"):
        truncate_arrays(tmp_path / "checkpoints" / step)
    with pytest.warns(UserWarning, match="step 256"), \
            pytest.raises(NoUsableCheckpointError, match="has no usable checkpoint: step 256 .*step 128 .*"
                                                         "pass a new --run.logdir"):
        loop.run(debug_config(tmp_path, 320), cartpole)


def test_device_loop_falls_back_past_corrupt_metadata(tmp_path):
    env, params = jax_envs.make("catch/0")
    config = lambda steps: debug_config(tmp_path, steps, train_ratio=16.0)
    loop.run_on_device(config(256), env, params, chunk_env_steps=64)
    (tmp_path / "checkpoints" / "256" / "meta" / "metadata").write_text("{not json")
    with pytest.warns(UserWarning, match="checkpoint of step 256 .* step 128"):
        resumed = loop.run_on_device(config(320), env, params, chunk_env_steps=64)
    assert resumed["env_steps"] == 320


def test_a_full_disk_keeps_the_previous_checkpoint_and_training_goes_on(tmp_path, monkeypatch):
    import errno

    from worldmodels.checkpoint import Checkpointer

    save = Checkpointer.save

    def disk_full_from_256(self, step, *args, **kwargs):
        if step >= 256:  # as the disk fills up: every save from here on fails
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", disk_full_from_256)
    with pytest.warns(UserWarning, match="is full: the checkpoint of step 256 was not written .* the checkpoint of "
                                         "step 128 stays the one to resume from"):
        summary = loop.run(debug_config(tmp_path, 320), cartpole)
    assert summary["env_steps"] == 320  # the run went on to its end
    monkeypatch.setattr(Checkpointer, "save", save)
    with Checkpointer(tmp_path / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [128]
    resumed = loop.run(debug_config(tmp_path, 320), cartpole)  # from the intact checkpoint of step 128
    assert resumed["env_steps"] == 320 and resumed["updates"] == summary["updates"]
    # any other error in a save is not hidden
    monkeypatch.setattr(Checkpointer, "save", lambda self, *a, **k: (_ for _ in ()).throw(PermissionError("denied")))
    with pytest.raises(PermissionError):
        loop.run(debug_config(tmp_path / "other", 200), cartpole)
