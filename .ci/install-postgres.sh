#!/usr/bin/env bash
# Debian's PostgreSQL 15 server binaries (/usr/lib/postgresql/15/bin) for the tracking tests on
# PostgreSQL (tests/servers.py starts a throw-away cluster per test session on 127.0.0.1; the
# package's own cluster is not used). Idempotent, like install-browser.sh.
set -euo pipefail
PG_BIN=/usr/lib/postgresql/15/bin
if [ -x "$PG_BIN/initdb" ]; then
    echo "install-postgres: $("$PG_BIN/postgres" --version) already installed"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if ! apt-cache policy postgresql-15 2>/dev/null | grep -q "Candidate: [0-9]"; then
    $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq postgresql-15 >/dev/null
# the package starts its own cluster on 5432; the tests never use it
$SUDO pg_ctlcluster 15 main stop 2>/dev/null || true
"$PG_BIN/postgres" --version
