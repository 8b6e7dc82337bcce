#!/usr/bin/env bash
# The whole test suite, in stages (run by `make test`, which first installs everything via bootstrap.sh).
# Stages: static checks, Python unit + integration tests, then the simulated-fleet stages.
set -euo pipefail
cd "$(dirname "$0")/.."
stage() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

stage "static checks: ruff, mypy"
ruff check .
ruff format --check .
mypy

stage "unit and integration tests (no simulated fleet)"
pytest -m "not fleet and not arm64"
