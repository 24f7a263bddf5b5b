"""The code passes ruff as configured in pyproject.toml (what `bash labkit.sh lint` and CI run)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_passes():
    pytest.importorskip("ruff", reason="ruff is in requirements.txt: bash labkit.sh install")
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(ROOT)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
