"""scripts/run_notebooks.py, the runner for machines without jupytext, reads the same code cells jupytext does."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(ROOT.glob("book/notebooks/*/*.py"))
spec = importlib.util.spec_from_file_location(
    "run_notebooks", ROOT / "scripts" / "run_notebooks.py"
)
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_code_cells_are_jupytexts(notebook):
    """The same cells in the same order; IPython magics stay the comments jupytext wrote them as (MPLBACKEND=Agg)."""
    code = [cell.source for cell in jupytext.read(notebook).cells if cell.cell_type == "code"]
    expected = [re.sub(r"^([%!])", r"# \1", source, flags=re.M) for source in code]
    assert [code for _, code in run_notebooks.code_cells(notebook.read_text())] == expected


def test_a_failing_cell_fails_the_notebook_and_is_reported(tmp_path):
    notebook = tmp_path / "broken.py"
    notebook.write_text(
        '# %% [markdown]\n# A note.\n\n# %%\nx = 1\n\n# %%\nassert x == 2, "x is not 2"\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "run_notebooks.py"),
            "--out",
            str(tmp_path),
            str(notebook),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert f"| {notebook} | FAIL |" in (tmp_path / "gpu-runs.md").read_text()
    assert "AssertionError: x is not 2" in (tmp_path / "gpu-runs.md").read_text()
    assert "FAILED in the cell at line 8 of broken.py" in (tmp_path / "gpu-runs.log").read_text()
