"""The notebooks run top to bottom against the current API (with a tiny model and a short run)."""

import json
from pathlib import Path

import matplotlib
import numpy as np

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def code_cells(name: str) -> list[str]:
    notebook = json.loads((NOTEBOOKS / name).read_text())
    return ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]


def test_world_model_tour_runs(tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # its run directory goes here
    cells = code_cells("world_model_tour.ipynb")
    # The same code with the debug model and a short run; each replacement must still find its text.
    first = cells[0]
    for old, new in [('["size1m", "cartpole"]', '["size1m", "cartpole", "debug"]'),
                     ('"run.steps": 4000', '"run.steps": 300, "run.train_start": 100')]:
        assert old in first, f"the notebook's first cell no longer contains {old}: update this test"
        first = first.replace(old, new)
    namespace: dict = {}
    for i, source in enumerate([first, *cells[1:]]):
        exec(compile(source, f"world_model_tour.ipynb cell {i}", "exec"), namespace)
    namespace["plt"].close("all")
    assert namespace["summary"]["env_steps"] == 300 and namespace["summary"]["updates"] > 0
    assert (tmp_path / "runs" / "notebook" / "scores.jsonl").exists()
    T = namespace["T"]
    assert namespace["recon"].shape == (1, T, 4) and np.isfinite(namespace["recon"]).all()
    p_continue = np.asarray(namespace["wm"].cont(namespace["feat"]).mean())
    assert p_continue.shape == (T, 1 + 15) and ((p_continue >= 0) & (p_continue <= 1)).all()
