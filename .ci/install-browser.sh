#!/usr/bin/env bash
# The explorer's browser tests (tests/test_explain_browser.py) drive Debian's chromium through
# Playwright's Python client with the system browser (no browser download). Idempotent.
set -euo pipefail
PY="${1:-.venv/bin/python}"
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
fi
"$PY" -c "import playwright" 2>/dev/null || "$PY" -m pip install -q "playwright>=1.40"
chromium --version
