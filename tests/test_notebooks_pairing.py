"""Each committed .ipynb must hold exactly the cells its jupytext .py source gives (not trusting timestamps)."""

from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "book" / "notebooks").glob("*/*.py"))


def _cells(notebook):
    return [(cell.cell_type, cell.source.strip()) for cell in notebook.cells]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no book/notebooks/<chapter>/*.py found"


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ipynb_matches_py(source):
    paired = source.with_suffix(".ipynb")
    assert paired.is_file(), (
        f"{paired} is missing: run `make execute` (or jupytext --to ipynb --execute {source})"
    )
    expected = _cells(jupytext.read(source))
    actual = _cells(nbformat.read(paired, as_version=4))
    assert actual == expected, (
        f"{paired} is out of date with {source}: re-execute it with `make execute`"
    )


@pytest.mark.parametrize("source", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ipynb_is_executed(source):
    notebook = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), (
        f"{source.with_suffix('.ipynb')} has unexecuted cells"
    )
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{source.with_suffix('.ipynb')} was committed with an error output"
