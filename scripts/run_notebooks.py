"""Execute the book's notebooks from their jupytext py:percent sources, without Jupyter or jupytext.

For machines that have torch and transformers but none of the notebook tooling (the lent GPU machines). Each
notebook runs in a fresh Python process, as a kernel would: its code cells in order, in one namespace, with the
notebook's folder as working directory and book/ on sys.path. Markdown cells are skipped and outputs are not
compared; what is checked is that every cell runs, which includes every `assert` of minqwen against HF.

    python3 scripts/run_notebooks.py --out DIR [NOTEBOOK.py ...]

writes DIR/gpu-runs.md (a table: notebook, result, seconds, first error line) and DIR/gpu-runs.log (the output
of every failed notebook), rewriting both after each notebook so a run cut short still reports what it finished.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
CELL = re.compile(r"^# %%(.*)$", re.M)


def code_cells(source: str) -> list[tuple[int, str]]:
    """(line number, code) of each code cell of a py:percent file; the jupytext header is comments only."""
    marks = list(CELL.finditer(source))
    cells = []
    for mark, following in zip(marks, marks[1:] + [None]):
        if "[markdown]" in mark.group(1) or "[md]" in mark.group(1):
            continue
        body = source[mark.end() : following.start() if following else len(source)]
        cells.append((source.count("\n", 0, mark.start()) + 2, body.strip("\n")))
    return cells


def run_one(notebook: Path) -> None:
    """Run every code cell of `notebook` in this process; on failure, name the cell and re-raise."""
    os.chdir(notebook.parent)
    namespace = {"__name__": "__main__"}
    for line, code in code_cells(notebook.read_text()):
        try:
            exec(compile(code, f"{notebook.name}:{line}", "exec"), namespace)
        except BaseException:
            print(f"FAILED in the cell at line {line} of {notebook.name}:", file=sys.stderr)
            traceback.print_exc()
            raise SystemExit(1) from None


def environment() -> str:
    import helpers

    import torch
    import transformers

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return (
        f"{card}; torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
        f"Python {platform.python_version()}; MINQWEN_MODEL={helpers.MODEL_SOURCE}, "
        f"device {helpers.DEVICE}, dtype {str(helpers.DTYPE).removeprefix('torch.')}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "notebooks", nargs="*", type=Path, help="default: every book/notebooks/*/*.py"
    )
    parser.add_argument("--out", type=Path, help="folder for gpu-runs.md and gpu-runs.log")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per notebook")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path[:0] = [str(BOOK), str(ROOT)]  # what a kernel started in the book would see
    if args.one:
        run_one(args.one.resolve())
        return 0
    if args.out is None:
        parser.error("--out DIR is required")
    notebooks = [n.resolve() for n in args.notebooks] or sorted(BOOK.glob("notebooks/*/*.py"))
    missing = [str(n) for n in notebooks if not n.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    args.out.mkdir(parents=True, exist_ok=True)
    header = [
        f"Executed {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {environment()}.",
        "",
        "| notebook | result | seconds | first error |",
        "|---|---|---|---|",
    ]
    rows, log = [], []
    for notebook in notebooks:
        name = str(notebook.relative_to(BOOK)) if notebook.is_relative_to(BOOK) else str(notebook)
        start = time.monotonic()
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--one", str(notebook)],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            failed, output = done.returncode != 0, done.stdout + done.stderr
        except subprocess.TimeoutExpired as error:
            failed = True
            stderr = error.stderr or b""  # bytes even with text=True
            stderr = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr
            output = f"{stderr}\ntimed out after {args.timeout} s"
        seconds = time.monotonic() - start
        error_line = (
            next((ln for ln in reversed(output.splitlines()) if ln.strip()), "") if failed else ""
        )
        result = "FAIL" if failed else "pass"
        rows.append(f"| {name} | {result} | {seconds:.0f} | {error_line.replace('|', '/')[:160]} |")
        if failed:
            log.append(f"===== {name}\n{output}")
        print(rows[-1], flush=True)
        (args.out / "gpu-runs.md").write_text("\n".join(header + rows) + "\n")
        (args.out / "gpu-runs.log").write_text("\n".join(log))
    passed = sum(" | pass | " in row for row in rows)
    print(f"{passed} of {len(rows)} notebooks passed")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
