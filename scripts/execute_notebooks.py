"""Execute notebooks from their jupytext sources into the paired .ipynb files, reproducibly.

`make execute` (and so `make book`) runs this on every chapter. Re-executing an unchanged notebook must leave
`git status` clean, so two things that jupytext and nbconvert would otherwise change on every run are fixed:

- cell ids are derived from each cell's type and source, not drawn at random;
- no execution timestamps are recorded in the cell metadata.

Each notebook runs in a fresh kernel with its own folder as the working directory, as nbval runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

TIMEOUT_S = 1800


def stable_ids(notebook) -> None:
    """Give each cell an id that depends on its content only (a repeated cell gets a suffix)."""
    seen: dict[str, int] = {}
    for cell in notebook.cells:
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:12]
        count = seen.get(digest, 0)
        seen[digest] = count + 1
        cell.id = digest if count == 0 else f"{digest}-{count}"


def execute(source: Path) -> Path:
    """Run `source` (a py:percent notebook) and write its paired .ipynb with the outputs."""
    notebook = jupytext.read(source)
    notebook.nbformat, notebook.nbformat_minor = 4, 5
    stable_ids(notebook)
    client = NotebookClient(
        notebook,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(source.parent)}},
    )
    client.execute()
    target = source.with_suffix(".ipynb")
    nbformat.validate(notebook)
    target.write_text(nbformat.writes(notebook) + "\n")
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path, help="py:percent notebook sources")
    args = parser.parse_args(argv)
    for source in args.sources:
        if source.suffix != ".py" or not source.is_file():
            parser.error(f"{source} is not a .py notebook source")
    for source in args.sources:
        print(f"executing {source}", flush=True)
        try:
            execute(source)
        except CellExecutionError as error:
            print(f"{source} failed:\n{error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
