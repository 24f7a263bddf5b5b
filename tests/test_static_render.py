"""What a static render keeps (labkit/runtime/static_render.py), the notebook helpers that keep figures out of
widgets (``viz.explore``, ``viz.progress``'s closing line), and the root conftest hook that fails a notebook cell
nbval runs when a static render would lose it."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

from labkit.runtime.static_render import keeps_something, static_problem

ROOT = Path(__file__).resolve().parent.parent
WIDGET = {"output_type": "display_data",
          "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "abc", "version_major": 2},
                   "text/plain": "VBox(children=(IntSlider(value=0),))"}}
IMAGE = {"output_type": "display_data", "data": {"image/png": "iVBOR...", "text/plain": "<Figure>"}}


def _stream(text, name="stdout"):
    return {"output_type": "stream", "name": name, "text": text}


def test_a_cell_of_widgets_only_is_a_problem_and_anything_a_render_keeps_cures_it():
    assert "widgets only (2)" in static_problem([WIDGET, WIDGET])
    assert not keeps_something(WIDGET) and keeps_something(IMAGE) and keeps_something(_stream("x"))
    assert static_problem([WIDGET, IMAGE]) is None
    assert static_problem([_stream("measured 3 ms\n"), WIDGET]) is None
    assert static_problem([WIDGET, {"output_type": "error", "ename": "E", "evalue": "", "traceback": []}]) is None
    assert static_problem([]) is None            # a cell that shows nothing (imports) loses nothing
    assert static_problem([IMAGE]) is None


def test_a_python_warning_on_stderr_is_a_problem_plain_stderr_is_not():
    warned = _stream("/x/torch/utils/cpp_extension.py:28: UserWarning: CUDA_HOME is not set\n  warn()\n", "stderr")
    problem = static_problem([IMAGE, warned])
    assert problem.startswith("a warning on stderr") and "CUDA_HOME" in problem
    assert static_problem([_stream("rank 1: ready\n", "stderr")]) is None
    assert static_problem([_stream("UserWarning: on stdout is printed text, not a warning\n")]) is None


def _execute(cells: list[str], tmp_path) -> list[list[dict]]:
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(textwrap.dedent(c)) for c in cells])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return [c["outputs"] for c in nb.cells]


def test_explore_draws_once_in_the_cell_and_progress_leaves_a_line_in_a_real_kernel(tmp_path, monkeypatch):
    monkeypatch.delenv("LABKIT_NO_PROGRESS", raising=False)   # the kernel inherits this process's environment
    outs = _execute([
        """
        import ipywidgets as w
        display(w.VBox([w.IntSlider()]))
        """,
        """
        import matplotlib.pyplot as plt
        import ipywidgets as w
        from labkit import viz
        size = w.IntSlider(value=3)
        def draw():
            plt.plot(range(size.value)); plt.show()
            print("drew", size.value)
            return size.value
        assert viz.explore(draw, size) == 3
        """,
        """
        from labkit import viz
        for _ in viz.progress(range(5), desc="steps", disable=False):
            pass
        """,
        """
        import warnings
        warnings.warn("careful")
        """,
    ], tmp_path)
    assert "widgets only" in static_problem(outs[0])
    explored = outs[1]
    assert static_problem(explored) is None
    kinds = [key for o in explored for key in o.get("data", {"stream": 0})]
    assert "image/png" in kinds, kinds                         # the figure is in the cell itself ...
    assert any(o.get("output_type") == "stream" and "drew 3" in o["text"] for o in explored)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in explored)  # ... controls too
    texts = "".join(o.get("text", "") for o in outs[2] if o.get("name") == "stdout")
    assert "steps: 5 of 5 in" in texts, outs[2]
    assert static_problem(outs[2]) is None
    assert "UserWarning: careful" in static_problem(outs[3])


def test_explore_refuses_what_it_cannot_draw():
    from labkit import viz

    with pytest.raises(TypeError, match="draw=3 is not callable"):
        viz.explore(3)


def test_the_conftest_hook_fails_a_widget_only_cell_under_nbval(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("print('fine')"),
        nbformat.v4.new_code_cell("import ipywidgets as w\ndisplay(w.IntSlider())"),
    ])
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    # the repository's root conftest loaded as a plugin in a run rooted elsewhere (no repository config applies)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                          "--nbval-lax", "--nbval-current-env", str(path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "LABKIT_BUSY": ""})
    assert "1 failed, 1 passed" in run.stdout, run.stdout[-3000:]
    assert "widgets only (1)" in run.stdout
