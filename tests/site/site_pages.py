"""Where the rendered site lives and which pages book/_toc.yml promises."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

BOOK = Path(__file__).resolve().parents[2] / "book"
SITE = BOOK / "_build" / "html"
CHROMIUM = os.environ.get("MINQWEN_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium phones home at start; offline that means refused connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000


def toc_entries() -> list[tuple[str | None, str]]:
    """(part caption, docname) for the root page and every chapter in book/_toc.yml, in order."""
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text())
    entries = [(None, toc["root"])]
    for part in toc.get("parts", []):
        entries += [(part["caption"], chapter["file"]) for chapter in part["chapters"]]
    return entries


def built_site() -> Path:
    """book/_build/html, failing the test with what to run when it has not been built."""
    if not (SITE / "index.html").is_file():
        pytest.fail(
            f"{SITE} holds no built site; run `make site` first (or `make site-check`, which builds it)"
        )
    return SITE
