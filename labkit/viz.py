"""Plots shared by the labs. Every function takes an optional matplotlib ``ax`` and returns it.

The timeline format used across labs (data parallel, pipeline, load balancing) is a list of
events, each a dict::

    {"lane": 0, "kind": "forward", "start": 0.012, "end": 0.030, "label": "F3"}

``lane`` is usually the rank or stage; ``start``/``end`` are seconds (any common origin);
``kind`` picks the colour; ``label`` (optional) is written inside the bar when it fits.
"""
from __future__ import annotations

from typing import Iterable, Mapping

KIND_COLOURS = {
    "forward": "#4c78a8",
    "backward": "#f58518",
    "weight": "#e45756",  # a zero-bubble pipeline's W (weight gradient), lab 04
    "compute": "#4c78a8",
    "allreduce": "#54a24b",
    "comm": "#54a24b",
    "send": "#54a24b",
    "recv": "#72b7b2",
    "wait": "#d0d0d0",
    "idle": "#eeeeee",
    "optimizer": "#b279a2",
    "sleep": "#9d755d",
    "load": "#72b7b2",
}


def axes(ax=None, figsize=(9, 3)):
    """``ax`` if given, else the axes of a new figure of ``figsize`` inches: every labkit chart draws into the axes it
    is handed (a notebook's grid of panels) or makes its own."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def gantt(events: Iterable[Mapping], ax=None, title: str | None = None, lane_name: str = "rank",
          origin: float | None = None, unit: str = "ms", show_labels: bool = True):
    """Draw a Gantt chart of timeline events (see the module docstring for the format)."""
    events = [dict(e) for e in events]
    if not events:
        raise ValueError("gantt() got no events: run something that records a timeline first")
    for e in events:
        missing = {"lane", "start", "end"} - set(e)
        if missing:
            raise ValueError(f"timeline event {e} lacks {sorted(missing)}; each needs lane, start, end")
    scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
    t0 = min(e["start"] for e in events) if origin is None else origin
    lanes = sorted({e["lane"] for e in events}, key=lambda x: (str(type(x)), x))
    ax = axes(ax, figsize=(10, 0.5 + 0.45 * len(lanes)))
    y_of = {lane: i for i, lane in enumerate(lanes)}
    seen_kinds = {}
    span = max(e["end"] for e in events) - t0
    for e in events:
        kind = e.get("kind", "compute")
        colour = KIND_COLOURS.get(kind, "#888888")
        x, w = (e["start"] - t0) * scale, (e["end"] - e["start"]) * scale
        bar = ax.barh(y_of[e["lane"]], w, left=x, height=0.7, color=colour, edgecolor="white", linewidth=0.5)
        seen_kinds.setdefault(kind, bar)
        label = e.get("label")
        if show_labels and label and span > 0 and (e["end"] - e["start"]) / span > 0.025:
            ax.text(x + w / 2, y_of[e["lane"]], str(label), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels([f"{lane_name} {lane}" for lane in lanes])
    ax.invert_yaxis()
    ax.set_xlabel(f"time ({unit})")
    ax.legend(seen_kinds.values(), seen_kinds.keys(), loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    if title:
        ax.set_title(title)
    return ax


def bars(values: Mapping[str, float], ax=None, title: str | None = None, ylabel: str = "", fmt: str = "{:.3g}"):
    """A labelled bar chart of a few named values."""
    ax = axes(ax, figsize=(6, 3))
    names, vals = list(values), list(values.values())
    rects = ax.bar(names, vals, color="#4c78a8")
    for r, v in zip(rects, vals):
        ax.annotate(fmt.format(v), (r.get_x() + r.get_width() / 2, r.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def _cells(rows: list[Mapping], floatfmt: str) -> tuple[list, list[list[str]]]:
    """The column names (from the first row) and every cell as text (floats through ``floatfmt``)."""
    cols = list(rows[0])
    return cols, [[floatfmt.format(v) if isinstance(v, float) else str(v) for v in (r.get(c, "") for c in cols)]
                  for r in rows]


def table_html(rows: list[Mapping], floatfmt: str = "{:.4g}") -> str:
    """Rows of dicts as an HTML table (for ``IPython.display.HTML``)."""
    if not rows:
        return "<p><i>(no rows)</i></p>"
    cols, cells = _cells(rows, floatfmt)
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{v}</td>" for v in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def format_table(rows: list[Mapping], floatfmt: str = "{:.4g}") -> str:
    """Rows of dicts as a plain-text table (for terminals and benchmarks)."""
    if not rows:
        return "(no rows)"
    cols, cells = _cells(rows, floatfmt)
    widths = [max(len(str(c)), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    # numbers right-aligned (digits line up), text left-aligned (reads naturally)
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows if r.get(c, "") != "") for c in cols]
    line = "  ".join(str(c).ljust(w) for c, w in zip(cols, widths)).rstrip()
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric)).rstrip()
            for row in cells]
    return "\n".join([line, sep] + body)


def progress(iterable, desc: str = "", total: int | None = None, **kwargs):
    """A progress bar over ``iterable`` for long work (tqdm: a widget in Jupyter, a bar in a terminal).

    It writes to stderr, so printed tables stay clean, and switches itself off when stderr is not a
    terminal (CI logs, pipes) unless ``disable=False`` is passed, and when ``LABKIT_NO_PROGRESS`` is set.
    In a notebook the bar is a widget, which a static render (a book, nbconvert, a graded copy) shows as
    ``0%| | 0/37``: so once the work is done, one line of text says what was done and how long it took.
    """
    import os

    if os.environ.get("LABKIT_NO_PROGRESS"):
        return iterable
    from tqdm.auto import tqdm

    kwargs.setdefault("disable", None)  # None: off when not writing to a terminal or notebook
    kwargs.setdefault("leave", False)
    bar = tqdm(iterable, desc=desc, total=total, **kwargs)
    if not bar.disable and _in_notebook():
        _summarise_on_close(bar, desc)
    return bar


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def _summarise_on_close(bar, desc: str) -> None:
    """When ``bar`` closes (its loop ends, or ``close()``), print one line: ``desc: 37 of 37 in 12.3 s``."""
    close = bar.close
    said = []

    def close_and_say():
        if not said:
            said.append(True)
            of = f" of {bar.total}" if bar.total is not None else ""
            print(f"{desc or 'done'}: {bar.n}{of} in {bar.format_dict.get('elapsed', 0.0):.1f} s")
        close()

    bar.close = close_and_say


def explore(draw, *controls, button: str | None = "Run"):
    """Draw once in the cell itself, then show ``controls`` to draw again: a static render keeps the first figure.

    ``draw()`` reads the controls' values, draws (``plt.show()``) and prints what it measured; its return value is
    returned from this first call, for the cell's asserts. Below it come the controls and an ``Output`` where each
    later draw goes: on a click of a button labelled ``button`` (for runs that cost seconds), or on every change
    of a control when ``button`` is None (for cheap redraws). An error in a later draw shows under the controls.
    Widget callbacks stay plain functions the tests call: ``draw`` itself.
    """
    import ipywidgets as widgets
    from IPython.display import display

    if not callable(draw):
        raise TypeError(f"draw={draw!r} is not callable; pass the function that draws (it reads the controls)")
    result = draw()   # in the cell's own output, which a static render keeps
    out = widgets.Output()

    def redraw(_=None):
        with out:     # an error here is shown in ``out`` and does not escape into the kernel's event loop
            out.clear_output(wait=True)
            draw()

    row = list(controls)
    if button:
        run = widgets.Button(description=button, button_style="primary")
        run.on_click(redraw)
        row.append(run)
    else:
        for control in controls:
            control.observe(redraw, names="value")
    display(widgets.VBox([widgets.HBox(row), out]))
    return result
