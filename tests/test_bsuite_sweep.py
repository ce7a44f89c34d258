"""`experiments.bsuite_sweep`: id selection, budgets, the recording env, scoring a sweep directory,
and one tiny end-to-end sweep (debug preset) through the real training loop."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest

from experiments import bsuite_sweep


def test_experiment_ids():
    assert bsuite_sweep.experiment_ids("memory_len")[:3] == ["memory_len/0", "memory_len/1", "memory_len/2"]
    assert len(bsuite_sweep.experiment_ids("memory_len")) == 23
    assert bsuite_sweep.experiment_ids("memory_len", ["3", "memory_len/9"]) == ["memory_len/3", "memory_len/9"]
    with pytest.raises(SystemExit, match="valid: .*discounting_chain"):
        bsuite_sweep.experiment_ids("memory_length")
    with pytest.raises(SystemExit, match="memory_len/0 ... memory_len/22"):
        bsuite_sweep.experiment_ids("memory_len", ["23"])


@pytest.mark.parametrize("bsuite_id, length", [("memory_len/0", 2), ("memory_len/4", 6), ("memory_len/22", 101),
                                               ("discounting_chain/3", 100), ("catch/0", 9)])
def test_episode_length(bsuite_id, length):
    assert bsuite_sweep.episode_length(bsuite_id) == length


def _episodes(env, n, action=0):
    for _ in range(n):
        env.reset()
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(action)
            done = terminated or truncated


def test_recording_env_logs_only_the_training_seed_and_resumes_from_pickle(tmp_path):
    bsuite_sweep.recording_env("memory_len/0", str(tmp_path / "eval"), 0, seed=100_000)  # an eval env
    assert not (tmp_path / "eval").exists()

    env = bsuite_sweep.recording_env("memory_len/0", str(tmp_path), 0, seed=0)
    _episodes(env, 10)
    restored = pickle.loads(pickle.dumps(env))  # what a checkpoint does; plain bsuite Logging recurses here
    _episodes(restored, 4)  # episode 14 is a log point
    log = pd.read_csv(tmp_path / "bsuite_id_-_memory_len-0.csv")
    assert log["episode"].tolist() == [*range(1, 11), 12, 14]
    assert (np.diff(log["total_perfect"]) >= 0).all()


def _record(csv_dir, bsuite_id, episodes, correct):
    env = bsuite_sweep.recording_env(bsuite_id, str(csv_dir), 0, seed=0)
    for _ in range(episodes):
        obs, _ = env.reset()
        answer = int(obs[0, 2] > 0) if correct else int(obs[0, 2] < 0)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(answer)
            done = terminated or truncated


def test_score_a_sweep_directory(tmp_path):
    for label, correct in [("good", True), ("bad", False)]:
        for seed in (0, 1):
            for bsuite_id in ("memory_len/0", "memory_len/3"):
                _record(tmp_path / label / f"seed{seed}" / "csv", bsuite_id, 20, correct)
    text = bsuite_sweep.score(tmp_path)
    assert "memory_len/3" in text and (tmp_path / "report.txt").read_text().strip() == text.strip()
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert sorted(scores.groupby("label")["score"].mean().items()) == [("bad", 0.0), ("good", 1.0)]
    assert len(pd.read_csv(tmp_path / "per_id.csv")) == 8
    assert (tmp_path / "success-memory_len.png").read_bytes()[:4] == b"\x89PNG"


def test_tiny_sweep_end_to_end(tmp_path):
    """Two memory_len ids through experiments.train's config and the real loop (debug preset)."""
    out = tmp_path / "sweep"
    argv = ["--experiment", "memory_len", "--ids", "0", "1", "--preset", "debug", "--episodes", "40",
            "--out", str(out), "--label", "tiny", "--run.train-start", "32", "--run.train-ratio", "8", "--no-plot"]
    bsuite_sweep.main(argv)
    per_id = pd.read_csv(out / "per_id.csv")
    # 40 episodes were budgeted (L + 1 steps each, plus the loop's reset step); 40 is a log point.
    assert per_id["bsuite_id"].tolist() == ["memory_len/0", "memory_len/1"]
    assert per_id["episodes"].tolist() == [40, 40]
    for bsuite_id in per_id["bsuite_id"]:
        assert (out / "tiny" / "seed0" / "runs" / bsuite_id.replace("/", "-") / "scores.jsonl").exists()
    bsuite_sweep.main(argv)  # a rerun skips the finished ids and rescores
    assert len(pd.read_csv(out / "per_id.csv")) == 2
