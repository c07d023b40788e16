"""The notebooks: committed without outputs, and every one executes headless on the toy world.

Execution uses nbclient in a fresh kernel per notebook (what nbmake does, but inside the default
``pytest`` run). The kernel inherits this process's environment: the repository on PYTHONPATH, one
thread, outputs under a temporary folder, and the model the notebooks read from ANYMS_NOTEBOOK_MODEL
(the toy world; the tiny random SDXL only while the toy weights are not in the tree).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
EXPECTED = [
    "01_quickstart.ipynb",
    "02_how_attention_decoupling_works.ipynb",
    "03_ablation_explorer.ipynb",
    "04_appendix_figures.ipynb",
    "05_sdxl.ipynb",
    "06_sweep_and_score.ipynb",
]
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TIME_LIMITS_S = {"01_quickstart.ipynb": 120}  # the quickstart promises "under 2 minutes on a CPU"


def test_the_notebooks_are_all_there():
    assert [path.name for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    dirty = [index for index, cell in enumerate(notebook.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs or execution counts; run `nbstripout {path}`."
    assert "widgets" not in notebook.metadata, f"{path.name} stores widget state; run `nbstripout {path}`."


@pytest.mark.skipif(shutil.which("nbstripout") is None, reason="nbstripout is not installed (pip install -e '.[dev]')")
def test_nbstripout_would_change_nothing():
    result = subprocess.run([shutil.which("nbstripout"), "--verify", *map(str, NOTEBOOKS)], capture_output=True, text=True)
    assert result.returncode == 0, f"Run `nbstripout notebooks/*.ipynb` before committing:\n{result.stdout}{result.stderr}"


def notebook_model() -> str:
    if os.environ.get("ANYMS_NOTEBOOK_MODEL"):
        return os.environ["ANYMS_NOTEBOOK_MODEL"]
    try:
        from anyms_core.models import load_pipeline

        load_pipeline("toy")
    except (ImportError, FileNotFoundError, OSError) as error:
        warnings.warn(f"The toy world is not loadable ({error}); executing the notebooks on 'tiny-sdxl' instead.")
        return "tiny-sdxl"
    return "toy"


@pytest.fixture(scope="module")
def model() -> str:
    return notebook_model()


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_headless(path: Path, model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ANYMS_NOTEBOOK_MODEL", model)
    monkeypatch.setenv("ANYMS_OUTPUT_DIR", str(tmp_path / "outputs"))
    monkeypatch.setenv("ANYMS_FIGURE_DPI", "100")  # the export path is the same; 300 dpi only costs time
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # shared small CPUs: one thread is faster and steadier
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.outputs if output.output_type == "error"]
    assert not errors
    limit = TIME_LIMITS_S.get(path.name)
    if limit is not None:
        assert elapsed < limit, f"{path.name} took {elapsed:.0f} s; it promises under {limit} s."
