"""Execute a notebook top to bottom in a fresh kernel running this interpreter (the decks and the book use it).

A failing cell raises :class:`NotebookExecutionError`, which names the notebook, the cell's number and first line,
and what happened (raised, timed out, kernel died), so a build can say exactly where it stopped.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

__all__ = ["KERNEL_NAME", "NotebookExecutionError", "execute", "first_line", "kernel_manager"]

KERNEL_NAME = "labkit-python"


class NotebookExecutionError(RuntimeError):
    """A cell failed: ``notebook`` (its name), ``cell`` (index among all cells, or None before the first),
    ``first_line`` (of the cell's source), ``what`` ("raised", "ran past ...", "the kernel died") and ``detail``
    (the last lines of the error)."""

    def __init__(self, notebook: str, cell: int | None, first_line: str, what: str, detail: str):
        self.notebook, self.cell, self.first_line, self.what, self.detail = notebook, cell, first_line, what, detail
        super().__init__(f"{self.where} {what}:\n{detail}")

    @property
    def where(self) -> str:
        return f"cell {self.cell} ({self.first_line!r})" if self.cell is not None else "kernel start-up"


def kernel_manager(workdir: str | Path):
    """A kernel manager for a kernel running this very interpreter.

    We do not rely on an installed ``python3`` kernelspec: a user-level one (``~/.local/share/
    jupyter/kernels``) would take precedence over the venv's and could run another Python without
    labkit. Instead a private kernelspec naming ``sys.executable`` is written to ``workdir`` and only
    that folder is searched. Nothing is installed into the environment.
    """
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kdir = Path(workdir) / "kernels" / KERNEL_NAME
    kdir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": f"Python ({sys.executable})", "language": "python"}
    (kdir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kdir.parent)], ensure_native_kernel=False)
    # IPC sockets in the private folder: nothing listens on TCP, and the kernel does not warn about it.
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=ksm, transport="ipc",
                         ip=str(Path(workdir) / "kernel-ipc"))


def first_line(src: str) -> str:
    """The first non-blank line of a cell's source, cut to 60 characters."""
    line = next((s for s in src.splitlines() if s.strip()), "")
    return line if len(line) <= 60 else line[:57] + "..."


def execute(nb, name: str, cwd: str | Path, timeout: float = 120):
    """Run every code cell of ``nb`` in a fresh kernel (working directory ``cwd``); return it executed.

    ``timeout`` is the most seconds one cell may run. On a failure ``nb`` keeps the outputs of the cells that ran,
    the failing one's error included, and :class:`NotebookExecutionError` is raised.
    """
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from nbconvert.preprocessors import ExecutePreprocessor

    from . import zmq_rearm

    zmq_rearm.install()        # nbclient: a widget cell's reply must not strand (runtime/zmq_rearm.py)
    current = {"index": None, "cell": None}

    def on_cell_execute(cell, cell_index):
        current["index"], current["cell"] = cell_index, cell

    with tempfile.TemporaryDirectory(prefix="labkit-nbexec-") as tmp:
        km = kernel_manager(tmp)
        ep = ExecutePreprocessor(timeout=timeout, kernel_name=KERNEL_NAME, on_cell_execute=on_cell_execute)
        try:
            ep.preprocess(nb, {"metadata": {"path": str(cwd)}}, km=km)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as e:
            idx, cell = current["index"], current["cell"]
            what = {CellTimeoutError: f"ran past the {timeout:g} s cell timeout",
                    DeadKernelError: "the kernel died"}.get(type(e), "raised")
            detail = "\n".join(str(e).strip().splitlines()[-12:])
            raise NotebookExecutionError(name, idx, first_line(cell.source) if cell is not None else "",
                                         what, detail) from None
    return nb
