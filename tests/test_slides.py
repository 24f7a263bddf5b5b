"""The slide builder: decks execute, convert to reveal.js HTML with their figures, and work offline.

One deck (00_course) is executed for real (its figure comes from a 2-rank labkit run); every deck
in slides/ is also converted without executing, which is cheap, so decks added later are checked
for their format without making this file slow.
"""
from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from labkit import slides

REPO = Path(__file__).resolve().parent.parent
SLIDES = REPO / "slides"
ALL_DECKS = sorted(SLIDES.glob("*.ipynb"))


def _sections(html: str) -> int:
    return len(re.findall(r"<section\b", html))


def _fake_reveal(root: Path) -> Path:
    for f in slides.REVEAL_FILES + ("dist/theme/white.css",):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text(f"/* fake {f} */\n")
    (root / "node_modules" / "big").mkdir(parents=True)  # must not be copied
    return root


@pytest.fixture(scope="module")
def course_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("slides_exec")
    paths = slides.build(["00_course"], out_dir=out, execute=True, timeout=180, quiet=True)
    return out, paths


@pytest.mark.timeout(600)
def test_course_deck_executes_with_its_figure(course_build):
    out, paths = course_build
    assert paths == [out / "00_course.slides.html"]
    html = paths[0].read_text(encoding="utf-8")
    nb = slides.read_deck(SLIDES / "00_course.ipynb")
    counts = slides.slide_counts(nb)
    assert 6 <= counts["slides"] <= 12, counts
    assert '<div class="reveal">' in html and '<div class="slides">' in html
    assert _sections(html) == counts["sections"]
    assert html.count('<aside class="notes">') == counts["notes"]
    assert html.count('class="fragment"') == counts["fragments"]
    # the figure made at build time by a real 2-rank all-reduce is embedded in the page
    imgs = re.findall(r"<img\b[^>]*>", html)
    assert len(imgs) == 1, imgs
    assert (re.search(r'src="data:image/png;base64,[^"]{1000,}"', imgs[0])
            and re.search(r'alt="[^"]*all-reduce', imgs[0]))
    # no cell raised (an error would have failed the build) and nothing printed a traceback
    assert "Traceback (most recent call last)" not in html
    assert 'data-mime-type="application/vnd.jupyter.stderr"' not in html
    # the hide-input figure cell shows its output but not its code
    assert "gantt" not in html and "allreduce_demo" in html
    assert slides.CDN_PREFIX + "/dist/reveal.js" in html
    assert (out / "index.html").read_text().count("00_course.slides.html") == 1


@pytest.mark.timeout(600)
@pytest.mark.parametrize("deck", ALL_DECKS, ids=[p.stem for p in ALL_DECKS])
def test_every_deck_is_well_formed_and_converts(deck, tmp_path):
    nb = nbformat.read(str(deck), as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):  # stored without outputs
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{deck.name} cell {i} has outputs"
    counts = slides.slide_counts(slides.read_deck(deck))
    assert 1 <= counts["slides"] <= 15, f"{deck.name}: keep decks short ({counts['slides']} slides)"
    (path,) = slides.build([str(deck)], out_dir=tmp_path, execute=False, quiet=True)
    html = path.read_text(encoding="utf-8")
    assert _sections(html) == counts["sections"]


def test_course_deck_covers_the_course_and_the_corrections():
    text = "\n".join(c.source for c in nbformat.read(str(SLIDES / "00_course.ipynb"), as_version=4).cells)
    for lab in ["00 start here", "01 collectives", "02 data parallel", "03 model parallel", "04 pipeline",
                "05 load balancing", "06 k-means", "07 generative", "08 ablation", "09 hardware"]:
        assert lab in text, lab
    for fact in ["labkit.launch", "gloo", "NCCL", "torchrun", "DistributedDataParallel", "SplitConvBlock",
                 "one component at a time", "all-reduces the gradients"]:
        assert fact in text, fact


@pytest.mark.timeout(300)
def test_local_reveal_dir_is_copied_and_used(tmp_path):
    fake = _fake_reveal(tmp_path / "reveal-src")
    out = tmp_path / "out"
    (path,) = slides.build(["00_course"], out_dir=out, execute=False, reveal=fake, quiet=True)
    for f in slides.REVEAL_FILES:
        assert (out / "reveal.js" / f).read_text() == f"/* fake {f} */\n"
    assert not (out / "reveal.js" / "node_modules").exists()
    html = path.read_text(encoding="utf-8")
    assert 'src="reveal.js/dist/reveal.js"' in html and 'href="reveal.js/dist/reveal.css"' in html
    assert "unpkg.com" not in html and "require.js" not in html
    # rebuilding over an existing copy works (the copy is replaced)
    (fake / "dist" / "reveal.js").write_text("/* v2 */")
    slides.build(["00"], out_dir=out, execute=False, reveal=str(fake), quiet=True)
    assert (out / "reveal.js" / "dist" / "reveal.js").read_text() == "/* v2 */"
    # and through the command line
    assert slides.main(["00_course", "--no-execute", "--out", str(tmp_path / "cli"), "--reveal-dir", str(fake)]) == 0
    assert (tmp_path / "cli" / "reveal.js" / "dist" / "reveal.css").is_file()


def test_offline_copy_drops_web_fonts_and_uses_a_local_mathjax(tmp_path):
    fake = _fake_reveal(tmp_path / "reveal-src")
    (fake / "dist" / "theme" / "simple.css").write_text(
        "@import url(https://fonts.googleapis.com/css?family=News+Cycle:400,700);\n"
        "@import url('https://fonts.googleapis.com/css?family=Lato');\n.reveal { color: black; }\n")
    mathjax = tmp_path / "mathjax-src"
    for f in slides.MATHJAX_FILES + tuple(f"{d}/a.js" for d in slides.MATHJAX_DIRS):
        (mathjax / f).parent.mkdir(parents=True, exist_ok=True)
        (mathjax / f).write_text("/* fake */")
    out = tmp_path / "out"
    assert slides.main(["04_pipeline", "--no-execute", "--out", str(out), "--reveal-dir", str(fake),
                        "--mathjax-dir", str(mathjax)]) == 0
    theme = (out / "reveal.js" / "dist" / "theme" / "simple.css").read_text()
    assert "googleapis" not in theme and ".reveal { color: black; }" in theme
    assert (out / "mathjax" / "tex-chtml.js").is_file()
    assert (out / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2" / "a.js").is_file()
    html = (out / "04_pipeline.slides.html").read_text(encoding="utf-8")
    assert '<script src="mathjax/tex-chtml.js"></script>' in html and "inlineMath" in html
    assert not re.findall(r"(?:src|href)=\"https?://", html), re.findall(r"(?:src|href)=\"https?://[^\"]*", html)
    with pytest.raises(ValueError, match=r"does not look like the MathJax .* fetch_mathjax"):
        slides.copy_mathjax(tmp_path, tmp_path / "o")


def test_bad_reveal_dir_says_what_to_pass(tmp_path):
    (tmp_path / "dist").mkdir()
    with pytest.raises(ValueError, match=r"does not look like reveal.js.*dist/reveal.js.*--fetch-reveal"):
        slides.build(["00_course"], out_dir=tmp_path / "o", execute=False, reveal=tmp_path, quiet=True)
    with pytest.raises(TypeError, match="reveal must be"):
        slides.build(["00_course"], out_dir=tmp_path / "o", execute=False, reveal=3, quiet=True)


def test_bad_deck_name_lists_the_decks(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"'no_such_deck' is not a deck; pass one of: .*00_course"):
        slides.build(["no_such_deck"], out_dir=tmp_path, execute=False, quiet=True)
    with pytest.raises(TypeError, match="deck name must be a string"):
        slides.find_decks([0])
    assert slides.main(["no_such_deck", "--no-execute", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no_such_deck" in err and "00_course" in err
    assert not list(tmp_path.glob("*.html"))


def test_fetch_reveal_without_npm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(slides.shutil, "which", lambda name: None)
    with pytest.raises(slides.SlideBuildError, match=r"needs npm.*--reveal-dir"):
        slides.fetch_reveal(cache=tmp_path)
    # a complete cached copy is used without npm
    _fake_reveal(tmp_path / f"reveal.js-{slides.REVEAL_VERSION}")
    assert slides.fetch_reveal(cache=tmp_path) == tmp_path / f"reveal.js-{slides.REVEAL_VERSION}"


def test_slide_counts_and_bad_metadata(tmp_path):
    from nbformat.v4 import new_markdown_cell, new_notebook

    def cell(st, src="x"):
        c = new_markdown_cell(src)
        c.metadata["slideshow"] = {"slide_type": st}
        return c

    nb = new_notebook(cells=[cell("skip"), cell("-"), cell("fragment"), cell("subslide"), cell("notes"),
                             cell("slide"), cell("subslide"), cell("subslide")])
    n = slides.slide_counts(nb)
    assert (n["slides"], n["subslides"], n["fragments"], n["sections"]) == (2, 3, 1, 7)
    p = tmp_path / "tiny.ipynb"
    nbformat.write(nb, str(p))
    (html,) = slides.build([str(p)], out_dir=tmp_path / "o", execute=False, quiet=True)
    assert _sections(html.read_text()) == 7
    nb.cells.append(cell("sldie"))
    nbformat.write(nb, str(p))
    with pytest.raises(ValueError, match=r"tiny.ipynb, cell 8: slide_type 'sldie'"):
        slides.read_deck(p)


@pytest.mark.timeout(600)
def test_a_failing_deck_names_the_deck_and_cell(tmp_path):
    from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

    nb = new_notebook(cells=[new_markdown_cell("# title"), new_code_cell("x = 1"),
                             new_code_cell("# the broken one\nraise RuntimeError('boom in deck')")])
    p = tmp_path / "99_broken.ipynb"
    nbformat.write(nb, str(p))
    with pytest.raises(slides.SlideBuildError,
                       match=r"(?s)deck 99_broken: cell 2 \('# the broken one'\) raised.*boom in deck"):
        slides.build([str(p)], out_dir=tmp_path / "o", execute=True, timeout=60, quiet=True)
    assert not (tmp_path / "o" / "99_broken.slides.html").exists()
