"""The book (``python -m labkit book``): its pages, its failures, and a small built book in Chromium.

The pure parts (labels, the benchmark pages, a staged chapter, the landing page) are checked directly. A failing
notebook must stop the build naming the notebook and cell, or, with ``keep_going``, be listed on the landing page.
Then a small book is built as CI can afford (two notebooks, their decks, the Chinese companion) and Chromium,
through Playwright, visits every page: a broken internal link or anchor, a missing image, an error output, a page
that does not render, or any request that leaves the disk fails; the search page finds a term from each lab.

``LABKIT_BOOK_HTML=book/_build/html`` points the browser checks at a full build instead (the maintainer's check
before a release: ``bash labkit.sh book`` then ``python -m pytest tests/test_book.py -k browser``).
"""
from __future__ import annotations

import json
import os
import re
import sys
import urllib.parse
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from labkit.book import BookError, build, section_label, section_labels, split_benchmarks, stage_notebook
from labkit.book.build import Job, run_jobs
from labkit.book.pages import WIDGET_NOTE, landing_page
from labkit.tour import LABS

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("LABKIT_CHROMIUM", "/usr/bin/chromium")
CHROME_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
# a word each lab's chapter uses that the search must find (lowercase; Sphinx's search stems English words)
SEARCH_TERMS = {"00": "pool", "01": "busbw", "02": "bucketed", "03": "SplitConvBlock", "04": "bubble",
                "05": "partitioner", "06": "k-means", "07": "FixMatch", "08": "ablation", "09": "checkpointing",
                "10": "ZeRO", "11": "mesh", "12": "zigzag"}
SMALL_BOOK = ["00", "03"]
INFO = {"cpu": "Test CPU", "cores": 2, "gpu": None, "torch": "2.x", "python": "3.11", "date": "2026-12-08 00:00 UTC",
        "seconds": 12.0}


# ----------------------------------------------------------------------------- pure parts
def test_section_labels_follow_the_rule_and_refuse_bad_input():
    assert section_label("04", "## 3. Measure: the bubble against *m*") == "lab04-s3"
    assert section_label("06", "## Going further") == "lab06-going-further"
    with pytest.raises(ValueError, match=r"number='4'.*two-digit"):
        section_label("4", "## 1. x")
    with pytest.raises(ValueError, match=r"heading='# Title'.*'## '"):
        section_label("04", "# Title")
    labels = section_labels(REPO / "notebooks" / "04_pipeline.ipynb")
    assert "lab04-s1" in labels and "lab04-summary" in labels
    assert all(h.startswith("## ") for h in labels.values())


def test_every_notebook_title_reads_lab_nn_dash_title():
    """The book's sidebar and course map show the titles: one form for all (``# Lab 04 — Pipeline ...``)."""
    from labkit.book.pages import notebook_title

    for lab in LABS:
        nb = nbformat.read(str(REPO / "notebooks" / lab.notebook), as_version=4)
        assert re.fullmatch(rf"Lab {lab.number} — \S.*", notebook_title(nb)), (lab.notebook, notebook_title(nb))


def test_every_lab_has_a_search_term_and_its_notebook_uses_it():
    for lab in LABS:
        text = (REPO / "notebooks" / lab.notebook).read_text(encoding="utf-8").lower()
        assert SEARCH_TERMS[lab.number].lower() in text, (lab.number, SEARCH_TERMS[lab.number])


def test_benchmark_pages_lose_no_section_and_reach_every_lab_with_a_bench():
    text = (REPO / "benchmarks" / "README.md").read_text(encoding="utf-8")
    benches = {lab.bench: lab.number for lab in LABS if lab.bench}
    pages = split_benchmarks(text, benches)
    assert set(pages.labs) == set(benches.values()), sorted(pages.labs)
    assert "# Benchmarks" in pages.overview and "## GPU figures" in pages.overview
    everything = pages.overview + "\n".join(pages.labs.values())
    for line in text.splitlines():
        if re.match(r"^#{2,4} ", line):   # every heading lands somewhere (promoted by at most one level)
            assert line.lstrip("#") in everything, line
    assert "(index.md#gpu-figures)" in "".join(pages.labs.values()) or "(#gpu-figures)" in pages.overview
    assert "## pipeline (`python -m labkit bench pipeline`)" in pages.labs["04"]
    assert "Lab 07" in pages.labs["07"] and "Lab 07" not in pages.overview


def test_a_staged_chapter_has_its_machine_labels_links_and_no_widget_or_answer():
    nb = new_notebook(cells=[
        new_markdown_cell("# Lab 98: a test"),
        new_markdown_cell("## 1. First\ntext\n## Summary"),
        new_code_cell("interact(...)", outputs=[nbformat.from_dict({
            "output_type": "display_data", "metadata": {},
            "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "VBox()"}})]),
        new_code_cell("answer = 42", metadata={"tags": ["solution"]}),
    ])
    nb.metadata["widgets"] = {"state": {}}
    staged = stage_notebook(nb, "98", INFO, {"lecture deck": "../slides/98.slides.html"})
    cells = staged.cells
    assert "Test CPU (2 cores), GPU: none; torch 2.x" in cells[1].source and "98.slides.html" in cells[1].source
    assert "(lab98-s1)=\n## 1. First" in cells[2].source and "(lab98-summary)=\n## Summary" in cells[2].source
    assert cells[3].outputs[0]["data"] == {"text/html": WIDGET_NOTE}
    assert "remove-input" in cells[4].metadata["tags"]
    assert "widgets" not in staged.metadata and "widgets" in nb.metadata   # a copy: the input is untouched


def test_landing_page_lists_the_chapters_and_a_kept_going_failure():
    chapters = [{"number": "00", "title": "Lab 00 — Start here", "doc": "labs/00_start_here.ipynb", "deck": None}]
    page = landing_page(chapters, INFO, [{"notebook": "98_broken", "where": "cell 2 ('1 / 0')", "what": "raised",
                                          "detail": ""}], True, ["00"])
    assert "| 00 | [Start here](labs/00_start_here.ipynb) |" in page and "[tables](bench/lab00.md)" in page
    assert "**98_broken**, cell 2 ('1 / 0') raised" in page and "zh/index" in page


# ----------------------------------------------------------------------------- failures
def _broken(path: Path) -> Path:
    nb = new_notebook(cells=[new_markdown_cell("# Lab 98: broken on purpose"), new_code_cell("x = 1"),
                             new_code_cell("# the broken one\n1 / 0"), new_code_cell("print('never runs')")])
    nbformat.write(nb, str(path))
    return path


def test_bad_arguments_are_refused_by_name(tmp_path, capsys):
    from labkit.book.build import main

    assert main(["99", "--out", str(tmp_path)]) == 1
    assert "labs=['99']: no lab matches; pass lab numbers (00 .. 12)" in capsys.readouterr().err
    assert main(["--jobs", "0", "--out", str(tmp_path)]) == 1
    assert "jobs=0: pass how many notebooks to run at once" in capsys.readouterr().err
    with pytest.raises(BookError, match=r"notebooks=\[.*nowhere.ipynb.*\]: no such file"):
        build(notebooks=[tmp_path / "nowhere.ipynb"], out=tmp_path)
    assert not list(tmp_path.rglob("*.html"))


def test_a_job_past_its_timeout_is_killed_and_named(tmp_path):
    jobs = [Job("sleeper", "notebook", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "s.log")]
    (failed,) = run_jobs(jobs, 1, job_timeout=2, keep_going=False, say=lambda s: None)
    assert "ran past the 2 s notebook timeout" in failed.error["what"] and failed.seconds < 60


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_failed_cell_stops_the_build_or_is_listed_with_keep_going(tmp_path):
    bad = _broken(tmp_path / "98_broken.ipynb")
    with pytest.raises(BookError, match=r"(?s)notebook 98_broken: cell 2 \('# the broken one'\) raised.*"
                                        r"ZeroDivisionError"):
        build(notebooks=[bad], out=tmp_path / "stop", decks=False, zh=False, fetch=False, say=lambda s: None)
    assert not (tmp_path / "stop" / "html").exists()
    html = build(notebooks=[bad], out=tmp_path / "go", decks=False, zh=False, keep_going=True, reuse=True,
                 fetch=False, say=lambda s: None)
    landing = (html / "index.html").read_text(encoding="utf-8")
    assert "98_broken" in landing and "raised" in landing
    chapter = (html / "labs" / "98_broken.html").read_text(encoding="utf-8")
    assert "ZeroDivisionError" in chapter and "never runs" in chapter   # the rest shown, not run
    assert _error_outputs(chapter), "the failing cell's error output must show in its chapter"


def _error_outputs(page_html: str) -> list[str]:
    return re.findall(r'class="[^"]*\b(?:output traceback|cell_output[^"]*\berror)\b', page_html)


# ----------------------------------------------------------------------------- the small book in Chromium
@pytest.fixture(scope="module")
def small_book(tmp_path_factory):
    given = os.environ.get("LABKIT_BOOK_HTML")
    if given:
        html = Path(given)
        if not (html / "index.html").is_file():
            pytest.fail(f"LABKIT_BOOK_HTML={given}: no index.html there; build the book first (bash labkit.sh book)")
        return html, None
    out = tmp_path_factory.mktemp("book")
    lines: list[str] = []
    html = build(SMALL_BOOK, out=out, jobs=2, fetch=False, say=lines.append)   # MathJax, reveal.js: cached only
    return html, lines


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_small_book_builds_with_chapters_decks_and_the_companion(small_book):
    html, lines = small_book
    if lines is None:
        pytest.skip("LABKIT_BOOK_HTML: checking a given build, not building one")
    assert (html / "labs" / "00_start_here.html").is_file() and (html / "labs" / "03_model_parallel.html").is_file()
    assert (html / "zh" / "index.html").is_file() and (html / "zh" / "glossary.html").is_file()
    assert (html / "bench" / "lab00.html").is_file() and (html / "search.html").is_file()
    chapter = (html / "labs" / "03_model_parallel.html").read_text(encoding="utf-8")
    assert "Executed on" in chapter and "torch " in chapter
    if _cached_reveal():
        assert "../slides/03_model_parallel.slides.html" in chapter
        assert (html / "slides" / "03_model_parallel.slides.html").is_file()
    else:   # the install step could not fetch reveal.js: the book says so and leaves the decks out
        assert any("the decks are left out" in s for s in lines), lines
    stand_in = (html / "labs" / "04_pipeline.html").read_text(encoding="utf-8")   # linked from the companion
    assert "not in this build" in stand_in and 'id="lab04-s3"' in stand_in
    assert any("2 chapter(s) and 11 stand-in(s) in" in s and "MiB" in s for s in lines), lines


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_chapter_shows_every_figure_its_notebook_drew(small_book):
    html, _ = small_book
    executed = sorted((html.parent / "executed").glob("*.ipynb"))
    assert executed
    for path in executed:
        chapter = html / "labs" / f"{path.stem}.html"
        nb = nbformat.read(str(path), as_version=4)
        drawn = sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                    for out in cell.get("outputs", []))
        shown = len(re.findall(r'<img[^>]+src="\.\./_images/', chapter.read_text(encoding="utf-8")))
        assert shown >= drawn > 0, f"{chapter.name}: the notebook drew {drawn} figure(s), the chapter shows {shown}"


def _cached_reveal() -> bool:
    from labkit import slides

    try:
        slides.fetch_reveal(npm="/nonexistent/npm")   # the cached copy only, never the network
    except slides.SlideBuildError:
        return False
    return True


def _browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (bash .ci/install_browser.sh)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def _ids(path: Path, cache: dict) -> set[str]:
    if path not in cache:
        cache[path] = set(re.findall(r'\bid="([^"]+)"', path.read_text(encoding="utf-8", errors="replace")))
    return cache[path]


def _check_page(page, path: Path, html_root: Path, ids: dict) -> list[str]:
    """Problems on one loaded page: page errors, broken links and anchors, missing images, error outputs."""
    found = []
    links = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
    for href in links:
        parsed = urllib.parse.urlsplit(href)
        if parsed.scheme or href.startswith("//") or href.startswith("mailto:"):
            continue   # an external link is the reader's to follow; fetching one is what the route catches
        target = path if not parsed.path else (path.parent / urllib.parse.unquote(parsed.path)).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            found.append(f"{path.relative_to(html_root)}: broken link {href!r}")
        elif parsed.fragment and target.suffix == ".html" and "slides" not in target.parts:
            if urllib.parse.unquote(parsed.fragment) not in _ids(target, ids):
                found.append(f"{path.relative_to(html_root)}: link {href!r}: no id {parsed.fragment!r} there")
    broken = page.eval_on_selector_all("img", "els => els.filter(e => !e.complete || e.naturalWidth === 0)"
                                              ".map(e => e.getAttribute('src'))")
    found += [f"{path.relative_to(html_root)}: image does not load: {src}" for src in broken]
    if _error_outputs(page.content()):
        found.append(f"{path.relative_to(html_root)}: a cell has an error output")
    if path.suffix == ".html" and "slides" not in path.parts:
        text = page.inner_text("body")
        if len(text.strip()) < 50 or not page.query_selector("main, article, [role=main]"):
            found.append(f"{path.relative_to(html_root)}: the page did not render (body {len(text)} characters)")
    return found


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(900)
def test_browser_every_page_renders_offline_with_no_broken_link_image_or_error(small_book, tmp_path):
    html, _ = small_book
    pages = sorted(p for p in html.rglob("*.html") if "_static" not in p.parts and "reveal.js" not in p.parts)
    assert len(pages) >= 10, pages
    problems: list[str] = []
    ids: dict = {}
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route(re.compile(r"^(?!file:).*"), lambda route: (errors.append(f"network: {route.request.url}"),
                                                                   route.abort()))
            for path in pages:
                errors.clear()
                page.goto(path.as_uri(), wait_until="load", timeout=60_000)
                problems += _check_page(page, path, html, ids)
                problems += [f"{path.relative_to(html)}: {e}" for e in errors]
            page.goto((html / "index.html").as_uri(), wait_until="load")
            page.screenshot(path=str(tmp_path / "landing.png"), full_page=False)
        finally:
            browser.close()
    assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} problems; screenshot in {tmp_path})"


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(900)
def test_browser_search_finds_a_term_from_each_lab(small_book):
    html, _ = small_book
    built = sorted(p.stem[:2] for p in (html.parent / "executed").glob("*.ipynb"))
    assert built, f"no executed notebooks in {html.parent / 'executed'}"
    misses = []
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROME_ARGS, headless=True)
        try:
            page = browser.new_page()
            for number in built:
                term = SEARCH_TERMS[number]
                page.goto((html / "search.html").as_uri() + "?q=" + urllib.parse.quote(term), wait_until="load")
                page.wait_for_function("document.querySelector('#search-results') && "
                                       "!document.querySelector('#search-progress')?.textContent.includes('Preparing')"
                                       " && document.querySelectorAll('#search-results li').length > 0",
                                       timeout=30_000)
                hits = page.eval_on_selector_all("#search-results li a", "els => els.map(e => e.href)")
                if not any(f"/labs/{number}_" in h for h in hits):
                    misses.append(f"searching {term!r} did not find lab {number}'s chapter: {hits[:8]}")
        finally:
            browser.close()
    assert not misses, "\n".join(misses)


def test_the_browser_checks_can_fail(tmp_path):
    """The link and error-output checks, fed a page with a broken link, a bad anchor and an error output."""
    (tmp_path / "ok.html").write_text('<html><body><main id="top">fine</main></body></html>')
    page_html = ('<a href="missing.html">x</a><a href="ok.html#nowhere">y</a><a href="ok.html#top">z</a>'
                 '<div class="cell_output docutils container error">boom</div>')

    class FakePage:
        def eval_on_selector_all(self, selector, script):
            return re.findall(r'href="([^"]+)"', page_html) if selector == "a[href]" else []

        def content(self):
            return page_html

    found = _check_page(FakePage(), tmp_path / "page.json", tmp_path, {})
    assert any("broken link 'missing.html'" in f for f in found), found
    assert any("no id 'nowhere'" in f for f in found), found
    assert not any("ok.html#top" in f for f in found), found
    assert any("error output" in f for f in found), found
    assert json.dumps(found)
