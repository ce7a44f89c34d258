"""The notebooks run top to bottom against the current API (with a tiny model and a short run)."""

import json
import os
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest

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


REPO = NOTEBOOKS.parent


def execute_quick(name: str, cwd: Path, monkeypatch, timeout: int = 900):
    """Run a notebook top to bottom in a Jupyter kernel (nbclient) with `QUICK = True` in its
    `parameters` cell, in `cwd`. **Returns:** the executed notebook and the seconds it took."""
    nbformat = pytest.importorskip("nbformat", reason="the notebook extra")
    nbclient = pytest.importorskip("nbclient", reason="the notebook extra")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    (params,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert "QUICK = False" in params.source, f"{name}: its parameters cell must set QUICK = False"
    params.source = params.source.replace("QUICK = False", "QUICK = True")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    start = time.time()
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook, time.time() - start


def _outputs(notebook, kind: str) -> list:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind in o.get("data", {})]


def test_quickstart_runs(tmp_path, monkeypatch):
    notebook, seconds = execute_quick("quickstart.ipynb", tmp_path, monkeypatch)
    print(f"quickstart.ipynb: {seconds:.0f} s")
    assert (tmp_path / "runs" / "quickstart" / "checkpoints").is_dir()
    assert _outputs(notebook, "image/png")  # the learning curve
    assert any("greedy returns" in "".join(o.get("text", "")) for c in notebook.cells
               for o in c.get("outputs", []))
    assert any("<script" in "".join(o["data"]["text/html"]) for o in _outputs(notebook, "text/html"))  # animation


def test_your_own_data_runs(tmp_path, monkeypatch):
    notebook, seconds = execute_quick("your_own_data.ipynb", tmp_path, monkeypatch)
    print(f"your_own_data.ipynb: {seconds:.0f} s")
    assert len(list((tmp_path / "data" / "pendulum").glob("*.npz"))) == 12
    assert len(_outputs(notebook, "image/png")) == 2  # the losses and the imagined trajectories


def test_dreams_runs(tmp_path, monkeypatch):
    notebook, seconds = execute_quick("dreams.ipynb", tmp_path, monkeypatch)
    print(f"dreams.ipynb: {seconds:.0f} s")
    text = "".join("".join(o.get("text", "")) for c in notebook.cells for o in c.get("outputs", []))
    assert "video (50, 128, 192, 3) uint8" in text
    assert any("<script" in "".join(o["data"]["text/html"]) for o in _outputs(notebook, "text/html"))


def test_memory_runs(tmp_path, monkeypatch):
    notebook, seconds = execute_quick("memory.ipynb", tmp_path, monkeypatch)
    print(f"memory.ipynb: {seconds:.0f} s")
    text = "".join("".join(o.get("text", "")) for c in notebook.cells for o in c.get("outputs", []))
    assert "DreamerV3 (RSSM): cue read back at steps 0..10" in text and "R2I (S3M): cue read back" in text
    assert _outputs(notebook, "image/png")
