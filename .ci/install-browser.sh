#!/usr/bin/env bash
# The explorer's browser tests (tests/test_explain_browser.py) drive Debian's chromium through
# Playwright's Python client with the system browser (never `playwright install`). Idempotent:
# installs chromium with apt-get when it is missing, and playwright into the venv when the venv
# exists without it (`make install` installs it too: it is in the `dev` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
if ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ -x "$PY" ] && ! "$PY" -c "import playwright" 2>/dev/null; then
    "$PY" -m pip install -q "playwright>=1.40"
fi
chromium --version 2>/dev/null | grep -i chromium
