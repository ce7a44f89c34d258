"""`experiments.curve`: binned returns, a group's mean and band over runs, the CLI and its PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import curve


def _write_run(path, returns_by_step, mode="train"):
    path.mkdir(parents=True)
    with open(path / "scores.jsonl", "w") as f:
        for step, ret in returns_by_step:
            f.write(json.dumps({"env_step": step, "mode": mode, "return": ret, "length": 10, "time": 0.0}) + "\n")
        f.write(json.dumps({"env_step": 1, "mode": "eval", "return": -99.0, "length": 10, "time": 0.0}) + "\n")


def test_group_curve_mean_and_bands(tmp_path):
    # Three seeds, two bins of 100 steps: seed k returns k in the first bin and 10 + k in the second.
    for k in range(3):
        _write_run(tmp_path / f"s{k}", [(50, k), (100, k), (150, 10 + k), (200, 10 + k)])
    runs = curve.load_runs([str(tmp_path / f"s{k}") for k in range(3)])
    assert all(len(r) == 4 for r in runs.values())  # eval episodes left out
    ends, mean, low, high = curve.group_curve(runs, bins=2, max_step=200, band="minmax")
    np.testing.assert_allclose(ends, [100, 200])
    np.testing.assert_allclose(mean, [1, 11])
    np.testing.assert_allclose(low, [0, 10])
    np.testing.assert_allclose(high, [2, 12])
    _, mean, low, high = curve.group_curve(runs, bins=2, max_step=200, band="std")
    np.testing.assert_allclose(high - mean, np.std([0, 1, 2]))
    _, mean, low, high = curve.group_curve(runs, bins=2, max_step=200, band="sem")
    np.testing.assert_allclose(mean - low, np.std([0, 1, 2]) / np.sqrt(3))
    # A bin no run reached stays NaN (shorter runs than the longest group).
    _, mean, _, _ = curve.group_curve(runs, bins=4, max_step=400, band="std")
    assert np.isnan(mean[2:]).all() and not np.isnan(mean[:2]).any()
    with pytest.raises(ValueError, match="band"):
        curve.group_curve(runs, 2, 200, band="iqr")


def test_cli_keeps_the_single_group_interface(tmp_path, capsys):
    _write_run(tmp_path / "a", [(10 * i, float(i)) for i in range(1, 21)])
    _write_run(tmp_path / "b", [(10 * i, float(i) + 1) for i in range(1, 21)])
    curve.main([str(tmp_path / "a"), str(tmp_path / "b"), "--bins", "4"])
    out = capsys.readouterr().out
    assert "20 episodes" in out and "saved" in out
    assert (tmp_path / "a" / "curve.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_named_groups(tmp_path):
    for name in ("r2i-s0", "r2i-s1", "dv3-s0"):
        _write_run(tmp_path / name, [(10 * i, float(i)) for i in range(1, 11)])
    out = tmp_path / "plots" / "compare.png"
    curve.main(["--group", "r2i", str(tmp_path / "r2i-s0"), str(tmp_path / "r2i-s1"),
                "--group", "dreamer", str(tmp_path / "dv3-s0"), "--band", "std", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="--group"):
        curve.main([])
    with pytest.raises(FileNotFoundError, match="scores.jsonl"):
        curve.main([str(tmp_path / "missing")])


def test_legend_says_how_many_runs_and_what_the_band_is():
    from experiments.curve import legend_label

    assert legend_label("default", 1, "minmax") == "default (1 run)"
    assert legend_label("default", 3, "minmax") == "default (mean of 3 runs, min-max band)"
    assert legend_label("r2i", 2, "none") == "r2i (mean of 2 runs)"
