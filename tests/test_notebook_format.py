"""Every lab notebook is stored without outputs, and every exercise is in nbgrader's format: a solution cell (tagged
``solution``, the answer between ``### BEGIN SOLUTION`` and ``### END SOLUTION``) followed by a locked, autograded
test cell that runs the lab's check through ``labkit.checks.graded``, worth stated points."""
import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_without_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), "outputs stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_is_an_nbgrader_solution_then_its_graded_check(path):
    cells = json.loads(path.read_text())["cells"]
    src = ["".join(c["source"]) for c in cells]
    solutions = [i for i, c in enumerate(cells) if _nbgrader(c).get("solution")]
    assert solutions, "no exercise"
    stubs = [i for i, s in enumerate(src) if cells[i]["cell_type"] == "code" and "raise NotImplementedError" in s
             and i not in solutions]
    assert not stubs, f"cells {stubs}: a hand-written stub; write the answer between ### BEGIN/END SOLUTION instead"
    ids = [_nbgrader(c)["grade_id"] for c in cells if _nbgrader(c)]
    assert len(ids) == len(set(ids)), f"grade_id used twice: {ids}"
    lab = path.name[:2]
    for i in solutions:
        meta, cell = _nbgrader(cells[i]), cells[i]
        assert cell["cell_type"] == "code" and not meta.get("grade") and not meta.get("locked"), f"cell {i}: {meta}"
        assert "solution" in cell["metadata"].get("tags", []), f"cell {i}: tag it 'solution' too"
        assert meta["grade_id"].startswith(f"lab{lab}-"), f"cell {i}: grade_id {meta['grade_id']!r}"
        assert re.search(r"^\s*### BEGIN SOLUTION\n(.|\n)+\n\s*### END SOLUTION\s*$", src[i], re.M), \
            f"cell {i}: the answer must sit between ### BEGIN SOLUTION and ### END SOLUTION"
        test = cells[i + 1]
        tmeta = _nbgrader(test)
        assert tmeta.get("grade") and tmeta.get("locked") and not tmeta.get("solution"), \
            f"cell {i + 1} after the solution must be a locked, graded test cell: {tmeta}"
        assert tmeta["points"] > 0 and tmeta["grade_id"] == meta["grade_id"] + "-check"
        assert re.fullmatch(r"graded\([\w.]+, .+\)", src[i + 1].strip()), \
            f"cell {i + 1}: a test cell is one call, graded(lab.check_..., answer, ...): {src[i + 1]!r}"
    graded = [i for i, c in enumerate(cells) if _nbgrader(c).get("grade")]
    assert graded == [i + 1 for i in solutions], "a graded cell without its solution cell before it"
