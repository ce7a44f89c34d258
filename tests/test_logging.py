"""`worldmodels.logging`: the recent return covers recent env steps, not a count of episodes; the run
logger's records reach jsonl and an offline wandb run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from worldmodels import config as config_lib
from worldmodels.logging import RecentReturns, RunLogger, read_jsonl, recent_window


def test_recent_returns_cover_the_last_window_of_env_steps():
    recent = RecentReturns(window=1000)
    assert recent.mean() is None and recent.returns() == []
    for step, ret in [(100, 20.0), (300, 22.0), (2500, 300.0), (3100, 100.0)]:
        recent.add(step, ret)
    # at 3100 the window is (2100, 3100]: the two long episodes, not the short early ones
    assert recent.returns() == [300.0, 100.0]
    assert recent.mean() == 200.0
    assert recent.returns(3600) == [100.0]
    # no episode ended in the window: the last one is reported alone
    assert recent.returns(9000) == [100.0]


def test_recent_returns_round_trip_and_read_old_checkpoints():
    recent = RecentReturns(window=1000)
    for step, ret in [(100, 1.0), (1500, 2.0), (1800, 3.0)]:
        recent.add(step, ret)
    restored = RecentReturns(window=1000)
    restored.load(recent.state(), env_step=1800)
    assert restored.returns() == recent.returns() == [2.0, 3.0]
    # older checkpoints kept bare returns (the last 100 episodes): they count as ending at the checkpoint
    old = RecentReturns(window=1000)
    old.load([5.0, 7.0], env_step=4000)
    assert old.returns() == [5.0, 7.0] and old.returns(5001) == [7.0]


def test_recent_window_is_a_tenth_of_the_run():
    assert recent_window(12_000) == 1200
    assert recent_window(1_000_000) == 100_000
    assert recent_window(512) == 1000


def wandb_history(path):
    """The history rows of an offline wandb run file: its records are framed as LevelDB's log
    (32 KiB blocks; a 7-byte header per fragment: CRC, length, type), after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last fragment of one
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_run_logger_writes_an_offline_wandb_run_that_a_resume_continues(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(tmp_path, tensorboard=False, wandb_project="worldmodels-test", config={"run": {"steps": 30}})
    logger.metrics(10, {"loss/total": 1.5, "note": "not a scalar"})
    logger.score(8, "train", 3.0, 4)  # an episode logged after a later step's metrics (the device loop does)
    logger.metrics(20, {"loss/total": 0.5})
    logger.close()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} for row in wandb_history(run_file)]
    assert rows == [{"env_step": 10, "loss/total": 1.5}, {"env_step": 8, "train/return": 3, "train/length": 4},
                    {"env_step": 20, "loss/total": 0.5}]
    assert [r["env_step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20]

    run_id = (tmp_path / "wandb_id").read_text()
    resumed = RunLogger(tmp_path, tensorboard=False, start_step=20, wandb_project="worldmodels-test")
    resumed.metrics(30, {"loss/total": 0.25})
    resumed.close()
    assert {p.name.rsplit("-", 1)[-1] for p in tmp_path.glob("wandb/offline-run-*")} == {run_id}  # one wandb run
    last = max(tmp_path.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
    assert [r["loss/total"] for r in wandb_history(last)] == [0.25]


def test_wandb_without_the_extra_is_a_config_error(monkeypatch):
    real = config_lib.importlib.util.find_spec
    monkeypatch.setattr(config_lib.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = config_lib.make_config(["debug"], {"run.wandb": "my-project"})
    with pytest.raises(config_lib.ConfigError, match=r'pip install "worldmodels\[wandb\]"'):
        config_lib.validate(config)
