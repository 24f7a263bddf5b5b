#!/usr/bin/env bash
# The course's two commands (see README.md):
#   bash labkit.sh lab    install what is needed, then open JupyterLab on notebooks/
#   bash labkit.sh test   install what is needed, then run the whole test suite with pytest
#   bash labkit.sh lint   install what is needed, then ruff (configured in pyproject.toml) on the code
# Extra arguments go to JupyterLab or pytest. The environment lives in .venv (override with LABKIT_VENV).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${LABKIT_VENV:-.venv}"
PY="${PYTHON:-python3}"

install() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "labkit: creating the virtual environment $VENV"
    "$PY" -m venv "$VENV"
  fi
  # Reinstall only when requirements.txt or pyproject.toml changed since the last install.
  local stamp="$VENV/.labkit-installed" want
  want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "labkit: installing requirements (torch is large: the first time takes minutes)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r requirements.txt
    echo "$want" > "$stamp"
  fi
}

cmd="${1:-}"; shift || true
case "$cmd" in
  lab)
    install
    exec "$VENV/bin/python" -m jupyter lab --notebook-dir=notebooks "$@"
    ;;
  test)
    install
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  lint)
    install
    exec "$VENV/bin/python" -m ruff check "$@"
    ;;
  install)
    install
    ;;
  *)
    echo "usage: bash labkit.sh lab|test|lint|install [args...]" >&2
    exit 2
    ;;
esac
