"""The torch floor (issue 25): requirements.txt and pyproject.toml admit the same torch range, its floor is the one
`.ci/torch_floor.sh` installs and runs the tour and the quick suite on, and this run is inside the range."""
import re
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _range(text, name):
    m = re.search(rf'^\s*"?{name}>=([0-9.]+),<=([0-9.]+)', text, re.M)
    assert m, f"no '{name}>=X,<=Y' line"
    return m.group(1), m.group(2)


def _v(s):
    return tuple(int(p) for p in re.match(r"[0-9.]+", s).group(0).strip(".").split("."))


def test_requirements_and_pyproject_admit_the_same_torch():
    req, pyproject = (ROOT / "requirements.txt").read_text(), (ROOT / "pyproject.toml").read_text()
    for name in ("torch", "torchvision"):
        assert _range(req, name) == _range(pyproject, name)
    low, high = _range(req, "torch")
    assert _v(low) >= (2, 11), "the floor is what .ci/torch_floor.sh ran: torch 2.11 (the lent GPU machine's)"
    assert _v(low) <= _v(torch.__version__) <= _v(high)


def test_the_floor_script_reads_the_floor():
    script = (ROOT / ".ci" / "torch_floor.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / ".ci" / "torch_floor.sh")]).returncode == 0
    low = _range((ROOT / "requirements.txt").read_text(), "torch")[0]
    out = subprocess.run(["sed", "-n", r"s/^torch>=\([0-9.]*\).*/\1/p", str(ROOT / "requirements.txt")],
                         capture_output=True, text=True).stdout.strip()
    assert out == low and "labkit tour" in script and "not slow" in script
