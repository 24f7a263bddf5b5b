#!/usr/bin/env bash
# Install configurable-http-proxy (the proxy JupyterHub runs in front of the students' servers) from npm into the
# course's environment, at $VENV/node/node_modules/.bin/configurable-http-proxy, where classroom/jupyterhub_config.py
# and the hub test (tests/test_classroom_hub.py) look for it. Idempotent. Without npm it says so and exits 0: the hub
# test then skips, saying why.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LABKIT_VENV:-.venv}"
CHP="$VENV/node/node_modules/.bin/configurable-http-proxy"
if [ -x "$CHP" ]; then
    exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
    echo "install_proxy: npm not found (Debian: apt-get install nodejs npm); the hub test will skip" >&2
    exit 0
fi
mkdir -p "$VENV/node"
if ! npm install --silent --no-audit --no-fund --prefix "$VENV/node" configurable-http-proxy@^4 >&2; then
    echo "install_proxy: npm install failed (above); the hub test will skip" >&2
    exit 0
fi
echo "install_proxy: configurable-http-proxy $("$CHP" --version) at $CHP"
