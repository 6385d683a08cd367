"""Every chapter page reads as a lesson: the skeleton CONTRIBUTING.md describes, measured in Chromium at 1400x1000.

A chapter page (a notebook under book/notebooks/) opens with a box saying what it teaches and what it needs, has
at least one figure, prints nothing on stderr, keeps its visible code to a share of the page's height, shows
code lines that fit the page width, and ends with a Summary (3-6 takeaways) and Exercises (2-4, each with an
executed solution folded away). The pages named in MATH_PAGES typeset at least two formulas. Run one page's
checks with `-k ch3/05`.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from urllib.parse import urljoin

import pytest

from site_pages import TIMEOUT_MS, toc_entries

VIEWPORT = {"width": 1400, "height": 1000}
CODE_SHARE_MAX = 0.45
CODE_SHARE_MEDIAN_MAX = 0.30
MATH_PAGES = {
    "notebooks/ch1/03_sampling",
    "notebooks/ch3/02_rope",
    "notebooks/ch3/03_gqa",
    "notebooks/ch3/04_swiglu",
    "notebooks/ch3/05_rmsnorm",
    "notebooks/ch4/05_performance",
    "notebooks/ch5/02_graphs",
    "notebooks/ch5/05_fused_kernels",
    "notebooks/ch5/06_scorecard",
}
# Paths of the machine that built the book, and words about how the book was commissioned.
LEAKS = re.compile(r"(/(?:root|home|tmp|work)/|site-packages|\bT-\d{3}\b|\bthe issue\b)", re.I)

MEASURE = """() => {
  const article = document.querySelector('article.bd-article');
  // Folded cells sit in a closed <details>, folded solutions in a toggled-off dropdown.
  const shown = (el) => el.checkVisibility() && !el.closest('details:not([open])');
  const inputs = Array.from(article.querySelectorAll('div.cell_input')).filter(shown);
  const before = (a, b) => !!(a.compareDocumentPosition(b) & Node.DOCUMENT_POSITION_FOLLOWING);
  const firstCell = article.querySelector('div.cell');
  const boxes = Array.from(article.querySelectorAll('div.admonition'))
    .filter((box) => !box.closest('div.cell') && (!firstCell || before(box, firstCell)))
    .map((box) => box.innerText.toLowerCase());
  const section = (name) => Array.from(article.querySelectorAll('section'))
    .find((s) => s.querySelector(':scope > h2') &&
                 s.querySelector(':scope > h2').textContent.replace('#', '').trim() === name);
  const h2 = Array.from(article.querySelectorAll('h2')).map((h) => h.textContent.replace('#', '').trim());
  const summary = section('Summary');
  const exercises = section('Exercises');
  const exerciseIds = exercises
    ? Array.from(exercises.querySelectorAll('div.exercise')).map((e) => e.id) : [];
  const solutions = exercises ? Array.from(exercises.querySelectorAll('div.solution')).map((s) => {
    const link = s.querySelector('.admonition-title a');
    return [link ? link.getAttribute('href').replace('#', '') : null,
            s.querySelectorAll('div.cell_input').length,
            s.querySelectorAll('div.cell_output').length];
  }) : [];
  return {
    articleHeight: article.getBoundingClientRect().height,
    codeHeight: inputs.reduce((sum, el) => sum + el.getBoundingClientRect().height, 0),
    overflowing: inputs.flatMap((el) => Array.from(el.querySelectorAll('pre')))
      .filter((pre) => pre.scrollWidth > pre.clientWidth + 1)
      .map((pre) => pre.innerText.split('\\n').reduce((a, b) => a.length >= b.length ? a : b)),
    openingBoxes: boxes,
    headings: h2,
    takeaways: summary ? summary.querySelectorAll(':scope > ul > li, :scope > ol > li').length : 0,
    exerciseIds: exerciseIds,
    solutions: solutions,
    figures: article.querySelectorAll('img, svg:not(mjx-container svg)').length,
    shrunk: Array.from(article.querySelectorAll('img')).filter(shown)
      .filter((img) => img.naturalWidth > 1.05 * img.getBoundingClientRect().width)
      .map((img) => img.naturalWidth + ' px drawn, ' + Math.round(img.getBoundingClientRect().width) + ' shown'),
    stderr: article.querySelectorAll('div.output.stderr').length,
    text: article.innerText,
  };
}"""


@dataclass
class Lesson:
    """What a reader of one chapter page sees."""

    doc: str
    article_height: float
    code_height: float
    overflowing: list[str]
    opening_boxes: list[str]
    headings: list[str]
    takeaways: int
    exercise_ids: list[str]
    solutions: list[list]
    figures: int
    shrunk: list[str]
    stderr: int
    formulas: int
    text: str = field(repr=False)

    @property
    def code_share(self) -> float:
        return self.code_height / self.article_height


def chapter_pages() -> list[str]:
    return [doc for _, doc in toc_entries() if doc.startswith("notebooks/")]


@pytest.fixture(scope="module")
def lessons(browser, served_site) -> dict[str, Lesson]:
    """Every chapter page, opened once at 1400x1000 with its formulas typeset."""
    result = {}
    context = browser.new_context(viewport=VIEWPORT)
    for doc in chapter_pages():
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(urljoin(served_site, f"{doc}.html"), wait_until="load")
            formulas = 0
            if page.locator(".math").count():
                page.wait_for_function("() => window.MathJax && MathJax.startup")
                formulas = page.evaluate(
                    "async () => { await MathJax.startup.promise;"
                    " return document.querySelectorAll('.math mjx-container').length; }"
                )
            seen = page.evaluate(MEASURE)
        finally:
            page.close()
        result[doc] = Lesson(
            doc=doc,
            article_height=seen["articleHeight"],
            code_height=seen["codeHeight"],
            overflowing=seen["overflowing"],
            opening_boxes=seen["openingBoxes"],
            headings=seen["headings"],
            takeaways=seen["takeaways"],
            exercise_ids=seen["exerciseIds"],
            solutions=seen["solutions"],
            figures=seen["figures"],
            shrunk=seen["shrunk"],
            stderr=seen["stderr"],
            formulas=formulas,
            text=seen["text"],
        )
    context.close()
    return result


pages = pytest.mark.parametrize("doc", chapter_pages())


@pages
def test_opens_with_what_you_will_learn_and_need(lessons, doc):
    boxes = lessons[doc].opening_boxes
    assert any("you will learn" in box and "you need" in box for box in boxes), (
        f"{doc}: no box before the first code cell says 'You will learn' and 'You need' "
        f"(boxes there: {boxes})"
    )


@pages
def test_ends_with_summary_then_exercises(lessons, doc):
    lesson = lessons[doc]
    assert lesson.headings[-2:] == ["Summary", "Exercises"], (
        f"{doc}: the last sections are {lesson.headings[-2:]}, not Summary then Exercises"
    )
    assert 3 <= lesson.takeaways <= 6, f"{doc}: the Summary lists {lesson.takeaways} takeaways"


@pages
def test_exercises_have_executed_solutions(lessons, doc):
    lesson = lessons[doc]
    assert 2 <= len(lesson.exercise_ids) <= 4, f"{doc}: {len(lesson.exercise_ids)} exercises"
    solved = {target for target, inputs, _ in lesson.solutions if inputs}
    unsolved = [e for e in lesson.exercise_ids if e not in solved]
    assert not unsolved, f"{doc}: exercises without a solution that runs code: {unsolved}"


@pages
def test_has_a_legible_figure(lessons, doc):
    assert lessons[doc].figures >= 1, f"{doc} shows no figure"
    assert not lessons[doc].shrunk, (
        f"{doc}: figures drawn wider than shown, so their text shrinks: {lessons[doc].shrunk}"
    )


@pages
def test_prints_nothing_on_stderr(lessons, doc):
    assert lessons[doc].stderr == 0, f"{doc} shows {lessons[doc].stderr} stderr outputs"


@pages
def test_visible_code_fits_the_page(lessons, doc):
    lesson = lessons[doc]
    assert lesson.code_share <= CODE_SHARE_MAX, (
        f"{doc}: visible code input is {lesson.code_share:.0%} of the page's height "
        f"(at most {CODE_SHARE_MAX:.0%}); fold machinery with the hide-input tag"
    )
    assert not lesson.overflowing, f"{doc}: code lines wider than the page: {lesson.overflowing}"


@pages
def test_speaks_of_its_subject_only(lessons, doc):
    leaks = sorted({m.group(0) for m in LEAKS.finditer(lessons[doc].text)})
    assert not leaks, f"{doc} shows build-machine paths or commissioning words: {leaks}"


def test_median_page_is_mostly_prose_and_results(lessons):
    shares = {doc: round(lesson.code_share, 3) for doc, lesson in lessons.items()}
    assert statistics.median(shares.values()) <= CODE_SHARE_MEDIAN_MAX, (
        f"median visible-code share above {CODE_SHARE_MEDIAN_MAX:.0%}: {shares}"
    )


@pytest.mark.parametrize("doc", sorted(MATH_PAGES))
def test_typesets_its_formulas(lessons, doc):
    assert lessons[doc].formulas >= 2, f"{doc} typesets {lessons[doc].formulas} formulas"
