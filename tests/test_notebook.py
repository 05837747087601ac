"""examples/quickstart.ipynb runs headless, top to bottom, as a user would run it (so it never rots), and it
is kept in the repository without outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    assert all(not c.get("outputs") and not c.get("execution_count") for c in cells if c["cell_type"] == "code")


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path: Path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    out = tmp_path / "quickstart-output"
    assert (out / "resnet18-scores.png").stat().st_size > 10_000
    assert len(list(out.glob("*.zarr"))) == 2
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    # the scores table names resnet18's layer3 (the planted read-out) the best layer
    table = next(o for o in nb.cells[-2].outputs if o.output_type == "execute_result")["data"]["text/plain"]
    best = [line for line in table.splitlines() if line.rstrip().endswith("True")]
    assert best and "layer3" in best[-1], table
