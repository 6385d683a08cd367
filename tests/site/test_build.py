"""The build itself: a page for every _toc.yml entry, each with real content."""

from __future__ import annotations

import re

from site_pages import BOOK, built_site, toc_entries


def test_every_toc_entry_has_a_source():
    sources = {doc: [BOOK / f"{doc}{ext}" for ext in (".md", ".ipynb")] for _, doc in toc_entries()}
    missing = [doc for doc, paths in sources.items() if not any(path.is_file() for path in paths)]
    assert not missing, f"_toc.yml names pages with no .md or .ipynb source: {missing}"


def test_every_toc_entry_has_a_page_with_content():
    site = built_site()
    for _, doc in toc_entries():
        page = site / f"{doc}.html"
        assert page.is_file(), f"{page} was not built although _toc.yml lists {doc}"
        article = re.search(r'<article class="bd-article">(.*?)</article>', page.read_text(), re.S)
        assert article, f"{page} has no article body"
        text = re.sub(r"<[^>]+>", " ", article.group(1))
        assert len(text.split()) > 50, f"{page} has almost no text ({len(text.split())} words)"
        assert "<h1" in article.group(1), f"{page} has no title heading"


def test_pages_ask_nothing_of_a_cdn():
    """Every script, stylesheet and image is referenced by a relative path; the browser test proves they load."""
    site = built_site()
    for page in site.rglob("*.html"):
        remote = re.findall(
            r'<(?:script|link|img)[^>]+(?:src|href)="((?:https?:)?//[^"]+)"', page.read_text()
        )
        assert not remote, f"{page.relative_to(site)} loads {remote}"


def test_the_package_page_shows_every_module():
    """book/package.md includes the source of every module of minqwen, so the site carries the whole code."""
    page = (BOOK / "package.md").read_text()
    included = set(re.findall(r"\{literalinclude\} \.\./(minqwen/\S+\.py)", page))
    modules = {str(p.relative_to(BOOK.parent)) for p in (BOOK.parent / "minqwen").rglob("*.py")}
    modules -= {
        "minqwen/model/__init__.py",
        "minqwen/engine/__init__.py",
        "minqwen/tools/__init__.py",
    }
    assert included == modules, (
        f"missing: {sorted(modules - included)}, gone: {sorted(included - modules)}"
    )
