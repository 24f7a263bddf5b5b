"""Stable link targets in the book: one label per ``##`` section of every lab's notebook.

The book's pages (the Chinese companion's errata and summaries, the landing page) link to a lab's section with
Sphinx's ``{ref}`` role and a label made here, so a renamed or removed section breaks the build instead of
leaving a dead link. The rule, for notebook ``NN_*.ipynb``:

- ``## K. Title`` gets ``labNN-sK`` (``## 3. Measure: the bubble against *m*`` in lab 04 is ``lab04-s3``);
- any other ``## Title`` gets ``labNN-`` and the title's words in lower case joined by ``-``
  (``## Going further`` in lab 06 is ``lab06-going-further``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

__all__ = ["markdown_lines", "notebook_number", "section_label", "section_labels"]

_NUMBERED = re.compile(r"^##\s+(\d+)\.\s")


def markdown_lines(text: str):
    """``(line, is_prose)`` for each line of markdown ``text``: ``is_prose`` is False inside a ``` code fence
    (and on its fence lines), where a ``#`` starts a comment, not a heading."""
    in_fence = False
    for line in text.splitlines():
        fence = line.lstrip().startswith("```")
        if fence:
            in_fence = not in_fence
        yield line, not (in_fence or fence)


def notebook_number(path: str | Path) -> str:
    """``"04"`` for ``notebooks/04_pipeline.ipynb``; a clear error for a name that does not start with two digits."""
    name = Path(path).name
    if not re.match(r"^\d\d_", name):
        raise ValueError(f"path={str(path)!r}: a lab notebook's name starts with its two-digit number and '_' "
                         f"(like 04_pipeline.ipynb)")
    return name[:2]


def section_label(number: str, heading: str) -> str:
    """The label of the ``##`` heading line ``heading`` in lab ``number`` (see the module's docstring)."""
    if not re.fullmatch(r"\d\d", str(number)):
        raise ValueError(f"number={number!r}: pass a lab's two-digit number, like '04'")
    if not heading.startswith("## "):
        raise ValueError(f"heading={heading!r}: pass a level-two markdown heading line, starting with '## '")
    m = _NUMBERED.match(heading)
    if m:
        return f"lab{number}-s{int(m.group(1))}"
    words = re.findall(r"[a-z0-9]+", heading[3:].lower())
    if not words:
        raise ValueError(f"heading={heading!r} has no letters or digits to make a label from")
    return f"lab{number}-" + "-".join(words)


def section_labels(path: str | Path) -> dict[str, str]:
    """``{label: heading line}`` for every ``##`` heading of the notebook at ``path``, in order."""
    number = notebook_number(path)
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    labels: dict[str, str] = {}
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        for line, prose in markdown_lines(source):
            if not prose or not line.startswith("## "):
                continue
            label = section_label(number, line.rstrip())
            if label in labels:
                raise ValueError(f"{Path(path).name}: two sections make the label {label!r} "
                                 f"({labels[label]!r} and {line.rstrip()!r}); rename one")
            labels[label] = line.rstrip()
    return labels
