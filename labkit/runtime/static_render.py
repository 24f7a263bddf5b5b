"""What a static render of an executed notebook keeps (a book, a hosting site's preview, nbconvert, a graded copy).

A widget is live state in the browser: a static render shows its plain-text stand-in (``VBox(children=...)``) or
nothing, and whatever was drawn into an ``Output`` widget is lost with it. So a code cell whose only outputs are
widgets shows nothing a reader can use. :func:`static_problem` says what is wrong with one executed cell's outputs
(nbformat output dicts, as nbval and nbclient collect them), or ``None`` when a static render keeps what the cell is
for. The root ``conftest.py`` runs it on every notebook cell nbval executes, so such a cell fails the suite.

Two findings:

- *widgets only*: the cell shows widgets and nothing else (no image, table, text or error). Draw the figure once in
  the cell itself (``labkit.viz.explore`` does it and keeps the widget beside it for exploring), or print one line
  saying what the widget shows.
- *a warning on stderr*: a Python warning (``UserWarning: ...``) printed by a cell is noise a reader cannot act on;
  fix its cause or, where it is expected, catch it and say so in a sentence.
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# "foo.py:12: UserWarning: ..." and "DeprecationWarning: ..." as the warnings module prints them
_WARNING = re.compile(r"\b[A-Z]\w*Warning: ")


def is_widget(output: Mapping) -> bool:
    """True for a display output that is a widget (its text/plain is only the widget's repr)."""
    return output.get("output_type") in ("display_data", "execute_result") and WIDGET_MIME in output.get("data", {})


def keeps_something(output: Mapping) -> bool:
    """True when a static render shows something of this output: text, an error, an image, a table."""
    kind = output.get("output_type")
    if kind in ("stream", "error"):
        return True
    if kind in ("display_data", "execute_result"):
        return not is_widget(output) and bool(output.get("data"))
    return False


def _text(output: Mapping) -> str:
    text = output.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def static_problem(outputs: Iterable[Mapping]) -> str | None:
    """What a static render loses in one executed cell, or ``None`` when nothing is lost."""
    outputs = list(outputs)
    for out in outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            match = _WARNING.search(_text(out))
            if match:
                line = next(ln for ln in _text(out).splitlines() if match.group(0) in ln)
                return (f"a warning on stderr: {line.strip()[:200]!r}; fix its cause, or catch it and say in a "
                        f"sentence why it is expected")
    widgets = [o for o in outputs if is_widget(o)]
    if widgets and not any(keeps_something(o) for o in outputs):
        return (f"widgets only ({len(widgets)}): a static render shows nothing of this cell; draw its figure or "
                f"print its result in the cell itself (labkit.viz.explore draws once, then shows the controls)")
    return None
