#!/usr/bin/env bash
# Debian espeak-ng (/usr/bin/espeak-ng) for tests/integration/test_speech_retrieval.py: it speaks
# the coco-mini captions offline at test time (the real-audio check). Idempotent: nothing to do
# if it is there; `apt-get update` only when the package lists lack it.
set -euo pipefail
if [ -x /usr/bin/espeak-ng ]; then
    echo "install-espeak: $(/usr/bin/espeak-ng --version 2>/dev/null || echo espeak-ng) already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! apt-cache policy espeak-ng 2>/dev/null | grep -q "Candidate: [0-9]"; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq espeak-ng >/dev/null
/usr/bin/espeak-ng --version
