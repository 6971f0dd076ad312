#!/usr/bin/env bash
# Debian chromium (/usr/bin/chromium) for tests/integration/test_ui_browser.py. Idempotent:
# nothing to do if it is there; `apt-get update` only when the package lists lack it.
# Playwright drives this binary (executable_path); never `playwright install` (no downloads here).
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "install-browser: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! apt-cache policy chromium 2>/dev/null | grep -q "Candidate: [0-9]"; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq chromium >/dev/null
/usr/bin/chromium --version
