#!/usr/bin/env bash
# Installs what is missing, then runs the linters and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
