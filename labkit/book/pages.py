"""The book's generated pages, as pure functions of their inputs (no process is started here).

- :func:`stage_notebook`: an executed lab notebook made ready for the book: a line saying which machine ran it,
  links to its deck, benchmark page and Chinese summary, a label before every ``##`` section
  (:mod:`labkit.book.labels`), widgets replaced by a sentence (their figures are drawn outside them too),
  solution cells' code hidden (their outputs stay), stylesheets an output would fetch from the web dropped.
- :func:`split_benchmarks`: ``benchmarks/README.md`` cut into one page per lab and an overview page.
- :func:`landing_page`: the course map, the failures of a ``--keep-going`` build, the tables of contents.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from .labels import markdown_lines, section_label

__all__ = ["BenchPages", "WIDGET_NOTE", "landing_page", "machine_line", "notebook_title", "placeholder_chapter",
           "split_benchmarks", "stage_notebook"]

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDGET_NOTE = ("<p class=\"labkit-widget\"><em>An interactive control is here when the notebook runs in "
               "JupyterLab; the book shows the figures the notebook draws outside it.</em></p>")


_REMOTE_CSS = re.compile(r"<link\b[^>]*\bhref=[\"']https?://[^>]*>", re.IGNORECASE)


def _text(source) -> str:
    return source if isinstance(source, str) else "".join(source)


def notebook_title(nb) -> str:
    """The text of the notebook's first ``# `` heading (its title)."""
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            for line in _text(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return "untitled"


def machine_line(info: dict) -> str:
    """One sentence naming what executed a chapter: CPU, cores, GPU, torch, Python, date and time taken."""
    gpu = info.get("gpu") or "none"
    took = f", in {info['seconds']:.0f} s" if info.get("seconds") is not None else ""
    return (f"Executed on {info.get('cpu', '?')} ({info.get('cores', '?')} cores), GPU: {gpu}; "
            f"torch {info.get('torch', '?')}, Python {info.get('python', '?')}; {info.get('date', '?')}{took}. "
            f"Every figure and number below was measured on that machine when the book was built.")


def _add_labels(source: str, number: str) -> str:
    out = []
    for line, prose in markdown_lines(source):
        if prose and line.startswith("## "):
            if out and out[-1].strip():
                out.append("")
            out.append(f"({section_label(number, line.rstrip())})=")
        out.append(line)
    return "\n".join(out)


def stage_notebook(nb, number: str, info: dict, links: dict[str, str]):
    """A copy of executed notebook ``nb`` (lab ``number``) as the book shows it.

    ``info``: what executed it (:func:`machine_line`); ``links``: ``{text: href}`` put under the title (the deck,
    the benchmark page, the Chinese summary).
    """
    nb = copy.deepcopy(nb)
    nb["metadata"].pop("widgets", None)
    for cell in nb["cells"]:
        if cell["cell_type"] == "markdown":
            cell["source"] = _add_labels(_text(cell["source"]), number)
            continue
        if cell["cell_type"] != "code":
            continue
        tags = cell["metadata"].setdefault("tags", [])
        if "solution" in tags and "remove-input" not in tags:
            tags.append("remove-input")   # the book shows what the solution printed, not the answer itself
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data and WIDGET_MIME in data:
                out["data"] = {"text/html": WIDGET_NOTE}
            elif data and "text/html" in data:   # e.g. an animation's icon font from a CDN: the theme has one
                data["text/html"] = _REMOTE_CSS.sub("", _text(data["text/html"]))
    link_html = " · ".join(f'<a href="{href}">{text}</a>' for text, href in links.items())
    banner = f"```{{admonition}} Machine\n:class: labkit-machine\n{machine_line(info)}\n```\n"
    if link_html:
        banner += f"\n<p class=\"labkit-links\">{link_html}</p>\n"
    title_at = next((i for i, c in enumerate(nb["cells"]) if c["cell_type"] == "markdown"
                     and any(line.startswith("# ") for line in _text(c["source"]).splitlines())), -1)
    from nbformat import from_dict

    nb["cells"].insert(title_at + 1, from_dict({"cell_type": "markdown", "metadata": {}, "source": banner,
                                                "id": "labkit-book-machine"}))
    return nb


def placeholder_chapter(number: str, title: str, labels: dict[str, str]) -> str:
    """The page standing in for lab ``number``'s chapter in a partial build: its title and its sections
    (``labels``: :func:`labkit.book.labels.section_labels`), so that every link into it still lands."""
    lines = [f"# {title}", "", f"This chapter is not in this build, which executed only some labs. "
             f"`bash labkit.sh book` builds them all; `bash labkit.sh book {number}` adds this one.", ""]
    for label, heading in labels.items():
        lines += [f"({label})=", heading, "", "(not executed in this build)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- benchmark pages
@dataclass
class BenchPages:
    """``benchmarks/README.md`` cut up: ``overview`` (its preamble and the sections of no single lab) and
    ``labs`` (``{lab number: markdown}`` for the labs with figures)."""
    overview: str
    labs: dict[str, str] = field(default_factory=dict)


def _sections(text: str, level: int) -> tuple[str, list[tuple[str, str]]]:
    """``(preamble, [(heading line, body), ...])`` for the headings of exactly ``level`` outside code."""
    mark = "#" * level + " "
    pre, parts = [], []
    for line, prose in markdown_lines(text):
        if prose and line.startswith(mark):
            parts.append([line, []])
        elif parts:
            parts[-1][1].append(line)
        else:
            pre.append(line)
    return "\n".join(pre), [(h, "\n".join(body)) for h, body in parts]


def _lab_of(heading: str, benches: dict[str, str]) -> str | None:
    m = re.search(r"\blab (\d\d)\b", heading, re.IGNORECASE)
    if m:
        return m.group(1)
    m = re.search(r"labkit bench (\w+)", heading)
    if m and m.group(1) in benches:
        return benches[m.group(1)]
    return None


def _promote(text: str) -> str:
    """Every heading of ``text`` (outside code) one level up: ``### a`` becomes ``## a``."""
    return "\n".join(line[1:] if prose and re.match(r"^#{3,6} ", line) else line
                     for line, prose in markdown_lines(text))


def split_benchmarks(text: str, benches: dict[str, str]) -> BenchPages:
    """Cut ``benchmarks/README.md`` into pages. ``benches``: ``{bench name: lab number}``.

    A ``##`` section whose heading names a lab ("Lab 07: ...", "k-means (lab 06)") or a lab's bench goes whole to
    that lab's page. Otherwise its ``###`` subsections that do go to their labs' pages (promoted to ``##``, after
    the parent section's opening paragraphs, which say what machine measured them); the rest stays on the
    overview. In-page links (``](#anchor)``) on a lab's page point to the overview.
    """
    preamble, sections = _sections(text, 2)
    overview = [preamble.strip()]
    labs: dict[str, list[str]] = {}
    for heading, body in sections:
        lab = _lab_of(heading, benches)
        if lab is not None:
            labs.setdefault(lab, []).append(f"{heading}\n{body}".strip())
            continue
        intro, subs = _sections(body, 3)
        kept = [(h, b) for h, b in subs if _lab_of(h, benches) is None]
        moved = [(h, b) for h, b in subs if _lab_of(h, benches) is not None]
        for h, b in moved:
            context = f"\n\n{intro.strip()}" if intro.strip() else ""
            labs.setdefault(_lab_of(h, benches), []).append(_promote(f"{h}{context}\n{b}").strip())
        overview.append("\n".join([heading, intro] + [f"{h}\n{b}" for h, b in kept]).strip())
    pages = {}
    for lab, parts in labs.items():
        body = "\n\n".join(parts)
        body = re.sub(r"\]\(#([\w-]+)\)", r"](index.md#\1)", body)
        pages[lab] = body
    return BenchPages("\n\n".join(p for p in overview if p) + "\n", pages)


# ----------------------------------------------------------------------------- the landing page
def landing_page(chapters: list[dict], info: dict, failures: list[dict], has_zh: bool, bench_labs: list[str],
                 build_seconds: float | None = None) -> str:
    """The book's ``index.md``.

    ``chapters``: ``[{number, title, doc, deck (href or None), summary}]`` in course order; ``failures``:
    ``[{notebook, where, what, detail}]`` from a ``--keep-going`` build; ``bench_labs``: lab numbers with a
    benchmark page.
    """
    lines = ["# labkit: how large models are trained, measured", "",
             "A course in thirteen labs, each a notebook that builds one idea of distributed training for real "
             "(processes exchanging tensors through `torch.distributed`), checks it against a one-process "
             "reference, and measures it. This book is those notebooks executed, with every output they "
             "printed and drew. Run them yourself with `bash labkit.sh lab`; the README says how.", ""]
    if failures:
        lines += ["```{error}", f"This build kept going past {len(failures)} failed notebook(s) or deck(s); "
                  "their chapters stop at the failing cell:", ""]
        lines += [f"- **{f['notebook']}**, {f['where']} {f['what']}" for f in failures]
        lines += ["```", ""]
    lines += ["## Course map", "", "| lab | chapter | deck | benchmarks | 中文 |", "|---|---|---|---|---|"]
    # a chapter's title is its notebook's ("Lab 04 — Pipeline parallelism: ..."); the map shows what follows the dash
    for ch in chapters:
        deck = f'<a href="{ch["deck"]}">slides</a>' if ch.get("deck") else ""
        bench = f"[tables](bench/lab{ch['number']}.md)" if ch["number"] in bench_labs else ""
        zh = f"[摘要](zh/lab{ch['number']}.md)" if has_zh else ""
        title = ch["title"].split(" — ", 1)[-1] + ("" if ch.get("built", True) else " (not in this build)")
        lines.append(f"| {ch['number']} | [{title}]({ch['doc']}) | {deck} | {bench} | {zh} |")
    lines += [""]
    if has_zh:
        lines += ["## 中文读者", "",
                  "本课程源自一篇中文文章。[中文导读](zh/index.md)列出该文中被本课程实验检验并更正的论断"
                  "（勘误表）、术语表，以及每个实验的中文摘要。", ""]
    took = f" in {build_seconds / 60:.1f} minutes" if build_seconds is not None else ""
    lines += ["## How this book was built", "", machine_line(info).split(". Every")[0] + ".",
              f"`python -m labkit book` executed every notebook and deck{took}; each chapter names the machine "
              "that ran it. Widgets are interactive only in JupyterLab: every figure a section is about is "
              "drawn outside its widget too, and that is what the book shows. Solution cells show their output, "
              "not their code.", ""]
    lines += ["```{toctree}", ":hidden:", ":caption: Labs", ""] + [ch["doc"].rsplit(".", 1)[0]
                                                                   for ch in chapters] + ["```", ""]
    lines += ["```{toctree}", ":hidden:", ":caption: Reference", "", "docs/glossary", "```", ""]
    lines += ["```{toctree}", ":hidden:", ":caption: Benchmarks", "", "bench/index"]
    lines += [f"bench/lab{n}" for n in bench_labs] + ["```", ""]
    if has_zh:
        lines += ["```{toctree}", ":hidden:", ":caption: 中文", "", "zh/index", "```", ""]
    return "\n".join(lines)
