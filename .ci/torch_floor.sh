#!/usr/bin/env bash
# The torch floor, tested rather than assumed: the oldest torch that requirements.txt admits (the `torch>=X` line;
# 2.11, the torch of the GPU machine this project borrows) runs the tour and the quick suite.
#   bash .ci/torch_floor.sh [PYTEST ARGS]      # default: -m "not slow" tests
# The environment lives in .venv-floor (LABKIT_FLOOR_VENV to use another). torch from PyPI is a CUDA build: the
# first install downloads about 4.7 GB. Not part of CI (CI runs the newest admitted torch); run it when the floor or
# a collective call changes, and record the result in the README's "torch versions" line.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LABKIT_FLOOR_VENV:-.venv-floor}"
TORCH=$(sed -n 's/^torch>=\([0-9.]*\).*/\1/p' requirements.txt)
VISION=$(sed -n 's/^torchvision>=\([0-9.]*\).*/\1/p' requirements.txt)
if [ -z "$TORCH" ] || [ -z "$VISION" ]; then
  echo "torch_floor: no 'torch>=X' and 'torchvision>=Y' lines in requirements.txt" >&2; exit 2
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==$TORCH.*" "torchvision==$VISION.*"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
"$VENV/bin/python" -c "import torch; print('torch_floor: torch', torch.__version__)"
"$VENV/bin/python" -m labkit tour
if [ $# -eq 0 ]; then set -- -m "not slow" tests; fi
exec "$VENV/bin/python" -m pytest "$@"
