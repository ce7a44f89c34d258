"""The notebooks run top to bottom against the current API (with a tiny model and a short run)."""

import os
import time
from pathlib import Path

import pytest

SPREAD_OVER_WORKERS = True  # each test runs its own processes: tests/conftest.py spreads them over workers

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
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
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", os.environ["WORLDMODELS_COMPILE_CACHE"])  # this worker's
    start = time.time()
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()
    return notebook, time.time() - start


def _text(notebook) -> str:
    """What the cells printed and the values they ended with, as text."""
    return "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                   for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))


def _outputs(notebook, kind: str) -> list:
    return [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if kind in o.get("data", {})]


def test_quickstart_runs(tmp_path, monkeypatch):
    notebook, seconds = execute_quick("quickstart.ipynb", tmp_path, monkeypatch)
    print(f"quickstart.ipynb: {seconds:.0f} s")
    assert (tmp_path / "runs" / "quickstart" / "checkpoints").is_dir()
    assert _outputs(notebook, "image/png")  # the learning curve
    assert "greedy returns" in _text(notebook)
    assert any("<script" in "".join(o["data"]["text/html"]) for o in _outputs(notebook, "text/html"))  # animation


def test_your_own_data_runs(tmp_path, monkeypatch):
    notebook, seconds = execute_quick("your_own_data.ipynb", tmp_path, monkeypatch)
    print(f"your_own_data.ipynb: {seconds:.0f} s")
    assert len(list((tmp_path / "data" / "pendulum").glob("*.npz"))) == 12
    assert len(_outputs(notebook, "image/png")) == 2  # the losses and the imagined trajectories


def test_dreams_runs(tmp_path, monkeypatch):
    pytest.importorskip("dm_control", reason="the dmc extra (its dmc-vision cartpole; not on Python 3.13)")
    notebook, seconds = execute_quick("dreams.ipynb", tmp_path, monkeypatch)
    print(f"dreams.ipynb: {seconds:.0f} s")
    text = _text(notebook)
    assert "video (50, 128, 192, 3) uint8" in text
    assert any("<script" in "".join(o["data"]["text/html"]) for o in _outputs(notebook, "text/html"))


def test_memory_runs(tmp_path, monkeypatch):
    notebook, seconds = execute_quick("memory.ipynb", tmp_path, monkeypatch)
    print(f"memory.ipynb: {seconds:.0f} s")
    text = _text(notebook)
    assert "DreamerV3 (RSSM): cue read back at steps 0..10" in text and "R2I (S3M): cue read back" in text
    assert _outputs(notebook, "image/png")


def test_world_model_tour_runs(tmp_path, monkeypatch):
    notebook, seconds = execute_quick("world_model_tour.ipynb", tmp_path, monkeypatch)
    print(f"world_model_tour.ipynb: {seconds:.0f} s")
    text = _text(notebook)
    assert "'env_steps': 300" in text and (tmp_path / "runs" / "notebook" / "scores.jsonl").exists()
    assert "reconstructed (1, " in text and ", 4) finite: True" in text
    assert "P(continue) (" in text and ", 16) in [0, 1]: True" in text  # 15 imagined steps and the start
    assert len(_outputs(notebook, "image/png")) == 2
