"""experiments.memory: the short-/long-term label on hand-computed cases, the grid's cells, and one
smoke cell run end to end whose JSON alone rebuilds the table."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import memory

SPREAD_OVER_WORKERS = True  # the smoke cell runs its own processes


@pytest.mark.parametrize("xi, seq_len, window, context, kind, bridge", [
    (8, 32, None, 32, "short-term", ""),
    (32, 32, None, 32, "short-term", ""),  # xi = K is still inside the context
    (33, 32, None, 32, "long-term", "recurrent state only"),
    (96, 32, None, 32, "long-term", "replay-context carry"),
    (24, 32, 16, 16, "long-term", "none: beyond the attention window"),  # K = min(T, W)
    (16, 32, 16, 16, "short-term", ""),
    (48, 32, 64, 32, "long-term", "recurrent state only"),  # W > T: T bounds the gradients, W the reach
    (96, 32, 64, 32, "long-term", "none: beyond the attention window"),
])
def test_memory_label(xi, seq_len, window, context, kind, bridge):
    replay_context = bridge == "replay-context carry"
    assert memory.memory_label(xi, seq_len, window, replay_context) == memory.MemoryLabel(context, kind, bridge)


def test_memory_label_refuses_nonsense():
    with pytest.raises(ValueError, match="must be >= 1"):
        memory.memory_label(0, 32, None, True)


def test_the_cpu_grid_has_cells_on_both_sides_of_t_with_and_without_replay_context():
    grid = memory.GRIDS["cpu"]
    cells = grid.cells(list(memory.PRESETS), [0, 1])
    for model in memory.PRESETS:
        mine = [c for c in cells if c.model == model]
        assert sum(c.xi <= grid.seq_len for c in mine) >= 2 * 2 and sum(c.xi > grid.seq_len for c in mine) >= 2 * 2
        long = {c.replay_context for c in mine if c.xi > grid.seq_len}
        assert long == ({False} if model == "transformer" else {True, False})
    cell = memory.Cell("s3m", "tmaze", 48, False, 1)
    assert cell.env == "tmaze/47" and cell.name == "s3m-tmaze-xi48-noctx-seed1"
    args = grid.args(cell)
    assert args[:4] == ["--preset", "r2i-bsuite-cpu", "--env", "tmaze/47"] and "--run.no-replay-context" in args
    assert memory.Cell("ffm", "tmaze-variable", 24, True, 0).env == "tmaze/1-23"


def test_a_smoke_cell_writes_its_json_and_the_table_comes_from_the_files_alone(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "WORLDMODELS_SMOKE_STEPS": "300"}
    run = [sys.executable, "-m", "experiments.memory", "--models", "ffm", "--seeds", "0", "--xis", "8",
           "--root", str(tmp_path / "runs"), "--results", str(results)]
    out = subprocess.run(run, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [path] = results.glob("*.json")
    cell = json.loads(path.read_text())
    assert path.name == "ffm-tmaze-xi8-ctx-seed0.json"
    assert cell["label"] == {"context": 32, "kind": "short-term", "bridge": ""} and cell["env"] == "tmaze/7"
    assert cell["episodes"] > 0 and 0.0 <= cell["final"] <= 1.0 and cell["commit"]
    # The table and the plot again, from the JSON files alone (the runs deleted).
    shutil.rmtree(tmp_path / "runs")
    again = subprocess.run([sys.executable, "-m", "experiments.memory", "--table", "--results", str(results)],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert again.returncode == 0, again.stderr[-2000:]
    assert "| ffm | tmaze | 8 | 32 | - | on | short-term | 0 |" in again.stdout
    assert (results / "success_vs_xi.png").stat().st_size > 1000
