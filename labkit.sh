#!/usr/bin/env bash
# The course's two commands (see README.md):
#   bash labkit.sh lab    install what is needed, then open JupyterLab on notebooks/
#   bash labkit.sh test   install what is needed, then run the whole test suite with pytest
#   bash labkit.sh lint   install what is needed, then ruff (configured in pyproject.toml) on the code
#   bash labkit.sh book   install what is needed (and MathJax and reveal.js, with npm), then execute every notebook
#                         and build the course as a static HTML book in book/_build/html (--zip: one archive)
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
  book)
    install
    # the book's offline assets, fetched once into labkit's cache (a build then needs no network); without npm
    # the book is built without decks and with formulas as TeX, and says so
    "$VENV/bin/python" -c "import labkit.slides as s; s.fetch_reveal()" || echo "labkit: reveal.js not fetched"
    "$VENV/bin/python" -c "import labkit.slides as s; s.fetch_mathjax()" || echo "labkit: MathJax not fetched"
    exec "$VENV/bin/python" -m labkit book "$@"
    ;;
  install)
    install
    ;;
  *)
    echo "usage: bash labkit.sh lab|test|lint|book|install [args...]" >&2
    exit 2
    ;;
esac
