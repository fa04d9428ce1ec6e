"""Every notebook in notebooks/ runs top to bottom on its default checkpoint, the shipped miniature (small steps
via the environment)."""
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SMALL = {"P2P_NOTEBOOK_STEPS": "2",
         "P2P_NOTEBOOK_SIZE": "32", "P2P_NOTEBOOK_INNER": "2", "TQDM_DISABLE": "1",
         "OMP_NUM_THREADS": "1"}  # one thread: the test machine is shared


def test_notebooks_exist_and_are_stored_without_outputs():
    assert [p.stem for p in NOTEBOOKS][:2] == ["01_prompt_to_prompt", "02_attention_math"]
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has stored outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in code), f"{path.name} has no parameter cell"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, monkeypatch):
    for k, v in SMALL.items():          # the kernel inherits this process's environment
        monkeypatch.setenv(k, v)
    nb = nbformat.read(path, as_version=4)
    # a failing cell raises CellExecutionError naming the cell and its traceback
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert all(o.get("output_type") != "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
