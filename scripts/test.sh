#!/usr/bin/env bash
# Installs what is missing (plus Debian's Chromium for the web console's browser tests), then
# runs the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --with-broker
if [ ! -x /usr/bin/chromium ]; then
    echo "installing chromium (browser tests)"
    sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
    sudo_if_needed apt-get update -qq
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
fi
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
