"""`experiments.learning`: a run's figures from its logs (hand-computed), and a resumable smoke run."""

from __future__ import annotations

import json

import numpy as np

from experiments import learning


def _write(logdir, steps, scores, calls):
    logdir.mkdir(parents=True, exist_ok=True)
    (logdir / "config.json").write_text(json.dumps({"run": {"steps": steps}}))
    (logdir / "scores.jsonl").write_text("".join(json.dumps(s) + "\n" for s in scores))
    (logdir / "calls.jsonl").write_text("".join(json.dumps({"seconds": c, "exit": 0}) + "\n" for c in calls))


def test_summarise_a_run(tmp_path):
    train = lambda step, ret: {"env_step": step, "mode": "train", "return": ret, "length": 1}
    _write(tmp_path, 100, [train(5, 9.0), train(15, -7.0), train(95, 10.0),
                           {"env_step": 95, "mode": "eval", "return": 7.0, "length": 1},
                           {"env_step": 95, "mode": "eval", "return": 9.0, "length": 1}], [30.0, 12.5])
    result = learning.summarise(tmp_path, threshold=4.0)
    assert result["tenths"][:2] == [9.0, -7.0] and result["tenths"][-1] == 10.0
    assert np.isnan(result["tenths"][2:-1]).all()
    assert (result["final"], result["best"], result["greedy_eval"]) == (10.0, 10.0, 8.0)
    # the recent return (a tenth of a run, at least 1,000 steps: here all of it) is 9 at step 5, in the
    # run's first tenth (a lucky start does not count), 1 at 15, then 4 at 95
    assert result["steps_to_threshold"] == 95
    assert result["seconds"] == 42.5 and result["episodes"] == 3
    table = learning.table({"row": [result, {**result, "final": 2.0, "steps_to_threshold": None}]})
    assert "| row | 2 | 6.0 [2.0, 10.0] | 10.0 [10.0, 10.0] | 1/2 |" in table
    assert "95 [95, 95] (1/2 reach 4)" in table
    small = {**result, "final": 0.96, "best": 0.97, "greedy_eval": 1.0}  # bsuite-sized returns: two decimals
    assert "| row | 1 | 0.96 [0.96, 0.96] | 0.97 [0.97, 0.97] | 1/1 | 1.00 [1.00, 1.00] |" in learning.table({"row": [small]})


def test_episodes_that_end_at_one_step_reach_the_threshold_together(tmp_path):
    train = lambda step, ret: {"env_step": step, "mode": "train", "return": ret, "length": 1}
    # 4 envs end episodes at step 2,000 (the first tenth's end): 170 alone would pass 150, all 4 average 85
    _write(tmp_path, 20_000, [train(2000, r) for r in (170.0, 60.0, 50.0, 60.0)] +
           [train(4000, r) for r in (300.0, 280.0, 290.0, 310.0)], [1.0])
    assert learning.summarise(tmp_path, threshold=150.0)["steps_to_threshold"] == 4000


def test_smoke_run_is_resumable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLDMODELS_SMOKE_STEPS", "160")
    results = learning.main(["--rows", "default", "--seeds", "0", "--root", str(tmp_path)])
    run = tmp_path / "default" / "seed0"
    assert results["default"][0]["steps"] == 160 and results["default"][0]["episodes"] > 3
    assert results["default"][0]["greedy_eval"] is not None  # train's greedy episodes at the end
    out = capsys.readouterr().out
    assert "| default | 1 |" in out
    # a finished run is read again, not run again
    learning.main(["--rows", "default", "--seeds", "0", "--root", str(tmp_path)])
    assert len((run / "calls.jsonl").read_text().splitlines()) == 1
