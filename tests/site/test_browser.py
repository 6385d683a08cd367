"""The site as a reader sees it: every page loaded in headless Chromium, from localhost and from disk.

A page passes when the browser logs no console error, no request fails or leaves the site, every image decodes,
every formula is typeset by the MathJax copy served with the site, and the sidebar lists every chapter.
"""

from __future__ import annotations

from urllib.parse import urldefrag, urljoin, urlsplit

import pytest

from site_pages import TIMEOUT_MS, toc_entries


class PageVisit:
    """One page opened in a fresh tab: what went wrong while it loaded, and what a reader would see."""

    def __init__(self, browser, base_url: str, url: str):
        self.base_url = base_url
        self.problems: list[str] = []
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.route("**/*", self._only_the_site)
        page.on(
            "console",
            lambda m: m.type == "error" and self.problems.append(f"console error: {m.text}"),
        )
        page.on("pageerror", lambda e: self.problems.append(f"uncaught exception: {e}"))
        page.on(
            "requestfailed",
            lambda r: self.problems.append(f"request failed: {r.url} ({r.failure})"),
        )
        page.on(
            "response",
            lambda r: r.status >= 400 and self.problems.append(f"HTTP {r.status}: {r.url}"),
        )
        try:
            page.goto(url, wait_until="load")
            self.images = page.evaluate(
                """async () => {
                    const images = Array.from(document.images);
                    await Promise.all(images.map((img) => img.decode().catch(() => null)));
                    return images.map((img) => [img.currentSrc || img.src, img.naturalWidth]);
                }"""
            )
            self.formulas = page.locator(".math").count()
            self.mathjax_source = page.evaluate(
                "() => Array.from(document.scripts).map((s) => s.src).find((src) => src.includes('mathjax')) || null"
            )
            self.typeset = self.tex_errors = 0
            if self.formulas:
                page.wait_for_function(
                    "() => window.MathJax && MathJax.startup && MathJax.startup.promise"
                )
                self.typeset, self.tex_errors = page.evaluate(
                    """async () => {
                        await MathJax.startup.promise;
                        return [document.querySelectorAll('.math mjx-container').length,
                                document.querySelectorAll('mjx-merror').length];
                    }"""
                )
            self.sidebar_links = page.eval_on_selector_all(
                "nav.bd-docs-nav a.reference.internal", "(links) => links.map((a) => a.href)"
            )
            self.sidebar_parts = page.eval_on_selector_all(
                "nav.bd-docs-nav .caption-text",
                "(captions) => captions.map((c) => c.textContent.trim())",
            )
            # Fonts and scripts that typesetting pulled in must have arrived too.
            page.wait_for_load_state("networkidle")
        finally:
            page.close()

    def _only_the_site(self, route):
        if route.request.url.startswith(self.base_url):
            route.continue_()
        else:
            self.problems.append(f"request outside the site: {route.request.url}")
            route.abort()


@pytest.fixture(scope="module")
def visits(browser, base_url) -> dict[str, PageVisit]:
    """Every page in _toc.yml, visited once; the tests below read what each visit saw."""
    return {
        doc: PageVisit(browser, base_url, urljoin(base_url, f"{doc}.html"))
        for _, doc in toc_entries()
    }


def test_index_opens_the_book(browser, base_url):
    """index.html, the page the README says to open, leads to the book's first page."""
    (_, root), *_ = toc_entries()
    page = browser.new_page()
    try:
        page.goto(urljoin(base_url, "index.html"))
        page.wait_for_url(urljoin(base_url, f"{root}.html"), timeout=TIMEOUT_MS)
    finally:
        page.close()


def test_pages_load_cleanly(visits):
    problems = {doc: v.problems for doc, v in visits.items() if v.problems}
    assert not problems, f"pages with console errors or failed requests: {problems}"


def test_every_image_decodes(visits):
    broken = {
        doc: bad
        for doc, v in visits.items()
        if (bad := [src for src, width in v.images if width == 0])
    }
    assert not broken, f"images that do not decode: {broken}"


def test_math_is_typeset_by_the_local_mathjax(visits, base_url):
    with_math = {doc: v for doc, v in visits.items() if v.formulas}
    assert with_math, "no page has math, so nothing checks that MathJax is served and works"
    for doc, v in with_math.items():
        assert v.mathjax_source and v.mathjax_source.startswith(base_url), (
            f"{doc}: MathJax comes from {v.mathjax_source!r}, not from the site"
        )
        assert (v.typeset, v.tex_errors) == (v.formulas, 0), (
            f"{doc}: {v.formulas} formulas, {v.typeset} typeset, {v.tex_errors} TeX errors"
        )


def test_sidebar_lists_every_chapter(visits, base_url):
    entries = toc_entries()
    expected_pages = [urljoin(base_url, f"{doc}.html") for _, doc in entries]
    expected_parts = list(dict.fromkeys(caption for caption, _ in entries if caption))
    for doc, v in visits.items():
        listed = {_page_url(href) for href in v.sidebar_links}
        missing = [page for page in expected_pages if page not in listed]
        assert not missing, f"{doc}: the sidebar does not link {missing}"
        assert v.sidebar_parts == expected_parts, (
            f"{doc}: sidebar parts {v.sidebar_parts}, _toc.yml {expected_parts}"
        )


def _page_url(href: str) -> str:
    """A link's page, without its #fragment; a link to "#" is the current page."""
    url = urldefrag(href).url
    return url if urlsplit(url).path.endswith(".html") else urljoin(url, "index.html")
