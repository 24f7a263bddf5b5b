"""Every lab notebook is stored without outputs, and every exercise stub has a solution cell tagged ``solution``
(teachers hand out the notebooks without those cells)."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs_and_solutions_tagged(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "outputs stored"
    stubs = [i for i, c in enumerate(cells)
             if c["cell_type"] == "code" and "raise NotImplementedError" in "".join(c["source"])
             and "solution" not in c.get("metadata", {}).get("tags", [])]
    solutions = [i for i, c in enumerate(cells) if "solution" in c.get("metadata", {}).get("tags", [])]
    for s in stubs:  # each stub is answered by a later tagged cell, before the next stub
        nxt = min([t for t in stubs if t > s] + [len(cells)])
        assert any(s < i < nxt for i in solutions), f"exercise stub in cell {s} has no cell tagged 'solution' after it"
