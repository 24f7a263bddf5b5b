#!/usr/bin/env bash
# Install Debian's Chromium for the browser test (tests/test_browser.py), if it is not there yet.
#
# Idempotent and quiet: does nothing when /usr/bin/chromium already exists. Uses the distribution's
# package only; it never runs `playwright install` and never downloads a browser build of its own
# (Playwright drives this Chromium through `executable_path`).
# Needs root (or sudo without a password) for apt-get; without either it says so and exits 0, and
# the browser test then skips with that reason.
set -euo pipefail

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}

if [ -x "$CHROMIUM" ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: apt-get not found; install Chromium yourself (the browser test will skip)" >&2
    exit 0
fi

SUDO=""
if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_browser: not root and no passwordless sudo; skipping Chromium (the browser test will skip)" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "install_browser: installing Debian's chromium (apt-get)"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install_browser: apt-get failed (above); the browser test will skip" >&2
    exit 0
fi

if [ -x "$CHROMIUM" ]; then
    echo "install_browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) at $CHROMIUM"
else
    echo "install_browser: apt-get finished but $CHROMIUM is missing; the browser test will skip" >&2
fi
