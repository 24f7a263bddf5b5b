"""Execute one notebook for the book (``python -m labkit.book.run_one IN OUT CELL_TIMEOUT``).

Writes the executed notebook to OUT with ``metadata.labkit_book`` (the machine, the source's hash, the time it
took). On a failure it still writes what ran (the error output included) and writes ``OUT`` with the suffix
``.error.json`` naming the cell, then exits 1.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str]) -> int:
    import nbformat

    from ..runtime.nbexec import NotebookExecutionError, execute
    from .build import _sha, machine_info

    src, out, timeout = Path(argv[0]), Path(argv[1]), float(argv[2])
    err_file = out.with_suffix(".error.json")
    err_file.unlink(missing_ok=True)
    nb = nbformat.read(str(src), as_version=4)
    info = machine_info()
    t0 = time.perf_counter()
    error = None
    try:
        execute(nb, src.stem, src.parent, timeout)
    except NotebookExecutionError as e:
        error = {"where": e.where, "what": e.what, "detail": e.detail}
    info["seconds"] = time.perf_counter() - t0
    nb.metadata["labkit_book"] = {"machine": info, "source_sha": _sha(src), "date": info["date"],
                                  "error": error}
    out.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, str(out))
    if error:
        err_file.write_text(json.dumps(error))
        print(f"{src.name}: {error['where']} {error['what']}\n{error['detail']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
