"""Build the lecture decks in ``slides/`` into reveal.js HTML (``python -m labkit slides``).

A deck is an ordinary notebook whose cells carry ``metadata.slideshow.slide_type``: ``"slide"``
starts a new slide, ``"subslide"`` a slide below it, ``"fragment"`` appears on the next click,
``"notes"`` becomes speaker notes (press ``s``), ``"skip"`` is run but not shown, and ``"-"`` (or
nothing) continues the current slide. Cell tags ``hide-input`` (show only the output, e.g. a
figure) and ``remove-cell`` (run but drop entirely) are honoured too.

Building a deck means:

1. execute it top to bottom in a fresh kernel running *this* interpreter (so it imports the
   ``labkit`` you are working on, and its figures are made by real labkit runs at build time);
2. convert the executed notebook with nbconvert's ``SlidesExporter`` into one self-contained
   HTML file (figures are embedded as base64 PNG);
3. point the page at reveal.js: the CDN by default, or a local copy placed next to the HTML
   (``--reveal-dir PATH``, or ``--fetch-reveal`` which gets it once with ``npm pack``), so the
   decks work without a network.

The page template differs from nbconvert's stock one in one way: reveal.js and its notes plugin
are loaded with plain ``<script>`` tags instead of through require.js and jQuery from a CDN, so
an offline deck needs nothing but the reveal.js folder; and a figure's alt text comes from its
cell's ``metadata.alt``. MathJax comes from its CDN unless ``--mathjax-dir`` names a local MathJax 3 (the
book passes the copy its install step fetched); offline without it, formulas show as their TeX source. A local
reveal.js copy drops its themes' web-font imports, so nothing is fetched when a deck is viewed.

This module is long because it carries the page template (about 70 lines of HTML) next to the
build and its command line.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REVEAL_VERSION = "4.0.2"  # the version nbconvert's reveal template is written for
CDN_PREFIX = f"https://unpkg.com/reveal.js@{REVEAL_VERSION}"
LOCAL_PREFIX = "reveal.js"  # folder name of the local copy, next to the HTML files
REVEAL_FILES = ("dist/reveal.js", "dist/reveal.css", "plugin/notes/notes.js")
MATHJAX_VERSION = "3.2.2"
MATHJAX_FILES = ("es5/tex-chtml.js",)
MATHJAX_DIRS = ("es5/output/chtml/fonts/woff-v2", "es5/input/tex/extensions")   # what tex-chtml.js loads later
SLIDE_TYPES = ("slide", "subslide", "fragment", "-", "skip", "notes")

REPO_ROOT = Path(__file__).resolve().parent.parent


class SlideBuildError(RuntimeError):
    """A deck could not be built: it failed to execute, or reveal.js could not be found or fetched."""


# ----------------------------------------------------------------------------- finding decks
def default_slides_dir() -> Path:
    """``slides/`` of the checkout this labkit comes from, else ``./slides``."""
    here = REPO_ROOT / "slides"
    return here if here.is_dir() else Path.cwd() / "slides"


def list_decks(slides_dir: str | os.PathLike | None = None) -> list[Path]:
    """Every deck (``*.ipynb``) in ``slides_dir``, sorted by name."""
    d = Path(slides_dir) if slides_dir is not None else default_slides_dir()
    if not d.is_dir():
        raise ValueError(f"no slides folder at {d}; pass slides_dir= (or run from the repository root)")
    return sorted(p for p in d.glob("*.ipynb") if not p.name.startswith("."))


def find_decks(decks=None, slides_dir: str | os.PathLike | None = None) -> list[Path]:
    """Resolve deck names to notebook paths.

    ``decks`` may be ``None`` (all decks), one name or a list of names. A name is a path to a
    notebook, a file name in ``slides_dir`` with or without ``.ipynb`` (``00_course``), or a unique
    prefix of one (``00``).
    """
    if decks is None:
        found = list_decks(slides_dir)
        if not found:
            raise ValueError(f"no decks (*.ipynb) in {slides_dir or default_slides_dir()}")
        return found
    if isinstance(decks, (str, os.PathLike)):
        decks = [decks]
    if not isinstance(decks, (list, tuple)):
        raise TypeError(f"decks must be None, a deck name or a list of names, got {type(decks).__name__}")
    out = []
    for name in decks:
        if not isinstance(name, (str, os.PathLike)):
            raise TypeError(f"a deck name must be a string such as '00_course', got {name!r}")
        p = Path(name)
        if p.suffix == ".ipynb" and p.is_file():
            out.append(p)
            continue
        available = list_decks(slides_dir)
        stem = p.name[:-6] if p.name.endswith(".ipynb") else p.name
        exact = [a for a in available if a.stem == stem]
        prefix = [a for a in available if a.stem.startswith(stem)]
        if exact:
            out.append(exact[0])
        elif len(prefix) == 1:
            out.append(prefix[0])
        else:
            names = ", ".join(a.stem for a in available) or "(none)"
            why = "is ambiguous" if prefix else "is not a deck"
            raise ValueError(f"{str(name)!r} {why}; pass one of: {names} (or a path to a .ipynb file)")
    return out


def read_deck(path: str | os.PathLike):
    """Read a deck and check its slide metadata; raise ValueError naming the bad cell."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for i, cell in enumerate(nb.cells):
        st = cell.get("metadata", {}).get("slideshow", {}).get("slide_type", "-")
        if st not in SLIDE_TYPES:
            raise ValueError(f"deck {Path(path).name}, cell {i}: slide_type {st!r} is not one of {SLIDE_TYPES}")
    return nb


def slide_counts(nb) -> dict:
    """How many slides, subslides, fragments and notes a deck has, and the ``<section>``s its HTML holds.

    The first visible cell always starts a slide. Each slide is an outer ``<section>`` holding one
    ``<section>`` per subslide (its own first one included), so ``sections = 2*slides + subslides``.
    """
    types = [c.get("metadata", {}).get("slideshow", {}).get("slide_type", "-") for c in nb.cells]
    visible = [i for i, t in enumerate(types) if t not in ("notes", "skip")]
    if visible:
        types[visible[0]] = "slide"
    n = {k: types.count(k) for k in ("slide", "subslide", "fragment", "notes", "skip")}
    return {"slides": n["slide"], "subslides": n["subslide"], "fragments": n["fragment"],
            "notes": n["notes"], "skipped": n["skip"], "sections": 2 * n["slide"] + n["subslide"]}


# ----------------------------------------------------------------------------- executing
def execute_deck(nb, name: str, cwd: str | os.PathLike, timeout: float = 120):
    """Run every code cell of ``nb`` in a fresh kernel (working directory ``cwd``); return it executed.

    ``timeout`` is the most seconds one cell may run. A failing cell raises :class:`SlideBuildError`
    naming the deck, the cell number and its first line, and the error (see ``labkit.runtime.nbexec``).
    """
    from .runtime.nbexec import NotebookExecutionError, execute

    try:
        return execute(nb, name, cwd, timeout)
    except NotebookExecutionError as e:
        raise SlideBuildError(f"deck {name}: {e}") from None


# ----------------------------------------------------------------------------- reveal.js
def validate_reveal_dir(path: str | os.PathLike) -> Path:
    """Check ``path`` is a reveal.js folder (the npm package, or a release) and return it."""
    p = Path(path).expanduser()
    missing = [f for f in REVEAL_FILES if not (p / f).is_file()]
    if missing:
        raise ValueError(
            f"{p} does not look like reveal.js (missing {', '.join(missing)}). Pass the folder that "
            f"holds dist/ and plugin/ (for example the 'package' folder of `npm pack reveal.js@{REVEAL_VERSION}`), "
            f"or use --fetch-reveal to get it with npm.")
    return p


def copy_reveal(src: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Copy reveal.js's ``dist/`` and ``plugin/`` from ``src`` to ``out_dir/reveal.js``; return that."""
    src = validate_reveal_dir(src)
    dest = Path(out_dir) / LOCAL_PREFIX
    if dest.resolve() == src.resolve():
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for sub in ("dist", "plugin"):
        shutil.copytree(src / sub, dest / sub)
    for extra in ("LICENSE", "package.json"):
        if (src / extra).is_file():
            shutil.copy2(src / extra, dest / extra)
    for css in (dest / "dist" / "theme").glob("*.css"):   # web fonts from a CDN: fall back to the system's
        text = css.read_text(encoding="utf-8")
        kept = re.sub(r"@import url\((['\"]?)https?://[^)]*\1\);?", "", text)
        if kept != text:
            css.write_text(kept, encoding="utf-8")
    return dest


def fetch_mathjax(npm: str | None = None, cache: str | os.PathLike | None = None) -> Path:
    """MathJax 3 fetched once with ``npm pack`` into the cache (the book's install step calls this)."""
    return fetch_npm("mathjax", MATHJAX_VERSION, MATHJAX_FILES, cache, npm)


def copy_mathjax(src: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Copy what a page needs of the MathJax package at ``src`` (``tex-chtml.js``, its fonts and TeX
    extensions) into the folder ``dest``; return the path of ``dest/tex-chtml.js``."""
    src, dest = Path(src), Path(dest)
    missing = [f for f in MATHJAX_FILES if not (src / f).is_file()]
    if missing:
        raise ValueError(f"{src} does not look like the MathJax {MATHJAX_VERSION} npm package (missing "
                         f"{', '.join(missing)}); pass the folder fetch_mathjax() returns")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / MATHJAX_FILES[0], dest / "tex-chtml.js")
    for d in MATHJAX_DIRS:
        if (dest / d.removeprefix("es5/")).exists():
            shutil.rmtree(dest / d.removeprefix("es5/"))
        shutil.copytree(src / d, dest / d.removeprefix("es5/"))
    return dest / "tex-chtml.js"


def cache_dir() -> Path:
    """Where ``--fetch-reveal`` keeps reveal.js: ``$LABKIT_CACHE`` or ``~/.cache/labkit``."""
    base = os.environ.get("LABKIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "labkit")
    return Path(base)


def fetch_npm(package: str, version: str, files: tuple[str, ...], cache: str | os.PathLike | None = None,
              npm: str | None = None) -> Path:
    """Get the npm ``package`` at ``version`` with ``npm pack`` into the cache (once) and return its folder.

    ``files`` are paths the package must hold; a cached copy holding them all is used without npm. Used for
    reveal.js (the decks) and MathJax (the book), so both work with no network once the install step ran.
    """
    dest = Path(cache) if cache is not None else cache_dir()
    dest = dest / f"{package}-{version}"
    if all((dest / f).is_file() for f in files):
        return dest
    npm = npm or shutil.which("npm")
    if not npm:
        raise SlideBuildError(
            f"getting {package} {version} needs npm, which is not on PATH. Install Node.js and npm (Debian: "
            f"apt-get install npm), or download {package} yourself and pass its folder (--reveal-dir PATH "
            f"for reveal.js), or build with the CDN (the decks' default).")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"labkit-{package}-", dir=dest.parent) as tmp:
        try:
            proc = subprocess.run([npm, "pack", f"{package}@{version}", "--silent"], cwd=tmp,
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise SlideBuildError(f"`npm pack {package}@{version}` did not run: {e}") from None
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            raise SlideBuildError(
                f"`npm pack {package}@{version}` failed (exit {proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}\nIs the npm registry reachable? "
                f"Otherwise pass a folder holding {package} (--reveal-dir PATH for reveal.js).")
        with tarfile.open(tgz[0]) as tf:
            kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tf.extractall(tmp, **kw)
        package_dir = Path(tmp) / "package"
        missing = [f for f in files if not (package_dir / f).is_file()]
        if missing:
            raise SlideBuildError(f"`npm pack {package}@{version}` gave a package without {', '.join(missing)}")
        if dest.exists():
            shutil.rmtree(dest)
        package_dir.rename(dest)
    return dest


def fetch_reveal(version: str = REVEAL_VERSION, cache: str | os.PathLike | None = None,
                 npm: str | None = None) -> Path:
    """Get reveal.js ``version`` with ``npm pack`` into the cache (once) and return its folder."""
    return validate_reveal_dir(fetch_npm("reveal.js", version, REVEAL_FILES, cache, npm))


# The page: nbconvert's reveal template, with reveal.js loaded by <script> tags (no require.js,
# no jQuery: an offline deck needs only the reveal.js folder) and MathJax calls guarded.
_TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{% from 'mathjax.html.j2' import mathjax %}
{%- block html_head_js_mathjax -%}
{%- if resources.labkit_mathjax3 -%}
<script>window.MathJax = {tex: {inlineMath: [['$', '$'], ['\\(', '\\)']], processEscapes: true}};</script>
<script src="{{ resources.labkit_mathjax3 }}"></script>
{%- else -%}
{{ mathjax(resources.mathjax_url) }}
{%- endif -%}
{%- endblock html_head_js_mathjax -%}
{%- block html_head_js -%}
{%- if "widgets" in nb.metadata -%}<script src="{{ resources.require_js_url }}"></script>{%- endif -%}
{%- endblock html_head_js -%}
{% block data_png scoped %}
<div class="jp-RenderedImage jp-OutputArea-output">
<img src="data:image/png;base64,{{ output.data['image/png'] | escape_html }}"
 alt="{{ cell.metadata.get('alt', 'figure made by labkit when the deck was built') | escape_html }}"
{%- set width = output | get_metadata('width', 'image/png') -%}
{%- if width is not none %} width="{{ width | escape_html }}"{% endif %}>
</div>
{% endblock data_png %}
{% block footer_js %}
<script src="{{ reveal_url_prefix }}/dist/reveal.js"></script>
<script src="{{ reveal_url_prefix }}/plugin/notes/notes.js"></script>
<script>
(function () {
  Reveal.initialize({
    controls: true, progress: true, history: true,
    transition: "{{ reveal_transition }}", slideNumber: "{{ reveal_number }}",
    plugins: [RevealNotes], width: {{ reveal_width }}, height: {{ reveal_height }}
  });
  Reveal.on('slidechanged', function () {
    if (window.MathJax && MathJax.Hub && MathJax.Hub.getAllJax(Reveal.getCurrentSlide())) {
      MathJax.Hub.Rerender(Reveal.getCurrentSlide());
    }
  });
})();
</script>
{% endblock footer_js %}
"""


def export_deck(nb, name: str, reveal_prefix: str = CDN_PREFIX, mathjax3: str | None = None) -> str:
    """The reveal.js HTML of (executed) notebook ``nb``, loading reveal.js from ``reveal_prefix`` and MathJax 3
    from the relative URL ``mathjax3`` (``None``: MathJax 2 from its CDN)."""
    import jinja2
    from nbconvert import SlidesExporter
    from traitlets.config import Config

    c = Config()
    c.TagRemovePreprocessor.enabled = True
    c.TagRemovePreprocessor.remove_input_tags = {"hide-input"}
    c.TagRemovePreprocessor.remove_cell_tags = {"remove-cell"}
    exporter = SlidesExporter(config=c, reveal_url_prefix=reveal_prefix, exclude_input_prompt=True,
                              exclude_output_prompt=True, reveal_transition="none",
                              extra_loaders=[jinja2.DictLoader({"labkit_reveal.html.j2": _TEMPLATE})],
                              template_file="labkit_reveal.html.j2")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": name}, "labkit_mathjax3": mathjax3})
    return body


# ----------------------------------------------------------------------------- building
def build(decks=None, out_dir: str | os.PathLike = "slides/_build", execute: bool = True,
          reveal: str | os.PathLike | None = None, timeout: float = 120,
          slides_dir: str | os.PathLike | None = None, quiet: bool = False,
          mathjax: str | os.PathLike | None = None) -> list[Path]:
    """Build decks into ``out_dir/<deck>.slides.html`` and return the paths.

    decks: ``None`` for every ``slides/*.ipynb``, or names/paths (see :func:`find_decks`).
    execute: run each deck first, so its figures are made now by labkit (``False``: convert the
        stored notebook as is; decks are stored without outputs, so figures are then missing).
    reveal: ``None`` or ``"cdn"`` loads reveal.js from its CDN; a path to a reveal.js folder is
        copied to ``out_dir/reveal.js`` and used from there, so the decks work offline.
    timeout: seconds one cell may run before the build fails.
    mathjax: ``None`` loads MathJax 2 from its CDN; a path to the MathJax 3 npm package (:func:`fetch_mathjax`)
        is copied to ``out_dir/mathjax`` and used from there.
    """
    if not isinstance(execute, bool):
        raise TypeError(f"execute must be True or False, got {execute!r}")
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds per cell, got {timeout!r}")
    paths = find_decks(decks, slides_dir)
    notebooks = [(p, read_deck(p)) for p in paths]  # check every deck before spending time on any
    out = Path(out_dir)
    if reveal is None or reveal == "cdn":
        prefix = CDN_PREFIX
        local = None
    elif isinstance(reveal, (str, os.PathLike)):
        local = validate_reveal_dir(reveal)
        prefix = LOCAL_PREFIX
    else:
        raise TypeError(f"reveal must be None, 'cdn' or a path to a reveal.js folder, got {reveal!r}")
    out.mkdir(parents=True, exist_ok=True)
    if local is not None:
        copied = copy_reveal(local, out)
        if not quiet:
            print(f"slides: reveal.js copied to {copied} (decks work offline)", flush=True)
    mathjax3 = None
    if mathjax is not None:
        copy_mathjax(mathjax, out / "mathjax")
        mathjax3 = "mathjax/tex-chtml.js"
    written = []
    for i, (path, nb) in enumerate(notebooks, 1):
        name = path.stem
        t0 = time.perf_counter()
        if not quiet:
            print(f"slides: [{i}/{len(notebooks)}] {name}: {'executing and ' if execute else ''}converting ...",
                  end="", flush=True)
        try:
            if execute:
                nb = execute_deck(nb, name, cwd=path.parent, timeout=timeout)
            html = export_deck(nb, name, prefix, mathjax3)
        except BaseException:
            if not quiet:
                print(" failed", flush=True)
            raise
        target = out / f"{name}.slides.html"
        target.write_text(html, encoding="utf-8")
        written.append(target)
        if not quiet:
            n = slide_counts(nb)
            print(f" {n['slides']} slides, {time.perf_counter() - t0:.1f} s -> {target}", flush=True)
    write_index(out)
    return written


def write_index(out: Path) -> None:
    """Write ``out/index.html`` listing every deck in ``out``."""
    import html

    existing = sorted(out.glob("*.slides.html"))
    items = "".join(f'<li><a href="{html.escape(p.name)}">{html.escape(p.name[:-12])}</a></li>' for p in existing)
    (out / "index.html").write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>labkit decks</title></head>"
        f"<body><h1>labkit lecture decks</h1><ul>{items}</ul></body></html>\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """``python -m labkit slides [DECK ...] [--out DIR] [--no-execute] [--reveal-dir PATH | --fetch-reveal]``."""
    ap = argparse.ArgumentParser(
        prog="python -m labkit slides",
        description="Build the lecture decks in slides/ into reveal.js HTML (executing them first, so "
                    "their figures are made by labkit now).")
    ap.add_argument("decks", nargs="*", help="deck names (e.g. 00_course or 00); default: every slides/*.ipynb")
    ap.add_argument("--out", default=None, help="output folder (default: slides/_build)")
    ap.add_argument("--no-execute", action="store_true", help="convert the stored notebooks without running them")
    ap.add_argument("--timeout", type=float, default=120, help="seconds one cell may run (default 120)")
    ap.add_argument("--list", action="store_true", help="list the decks and their slide counts, build nothing")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--reveal-dir", metavar="PATH",
                       help="use the reveal.js folder PATH, copied next to the HTML, so decks work offline")
    where.add_argument("--fetch-reveal", action="store_true",
                       help=f"get reveal.js {REVEAL_VERSION} once with `npm pack` (cached in {cache_dir()}) "
                            f"and use it as with --reveal-dir")
    ap.add_argument("--mathjax-dir", metavar="PATH", default=None,
                    help=f"use the MathJax {MATHJAX_VERSION} npm package at PATH, copied next to the HTML, "
                         f"instead of MathJax 2 from its CDN")
    args = ap.parse_args(argv)
    try:
        if args.list:
            for p in find_decks(args.decks or None):
                n = slide_counts(read_deck(p))
                print(f"{p.stem:30s} {n['slides']:3d} slides {n['subslides']:3d} subslides  {p}")
            return 0
        reveal = None
        if args.fetch_reveal:
            print(f"slides: fetching reveal.js {REVEAL_VERSION} with npm (cached) ...", flush=True)
            reveal = fetch_reveal()
            print(f"slides: reveal.js in {reveal}", flush=True)
        elif args.reveal_dir:
            reveal = args.reveal_dir
        out = args.out or str(default_slides_dir() / "_build")
        written = build(args.decks or None, out_dir=out, execute=not args.no_execute, reveal=reveal,
                        timeout=args.timeout, mathjax=args.mathjax_dir)
    except (ValueError, TypeError, SlideBuildError) as e:
        print(f"slides: error: {e}", file=sys.stderr)
        return 2
    print(f"slides: {len(written)} deck(s) written; open {Path(out) / 'index.html'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
