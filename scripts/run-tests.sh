#!/usr/bin/env bash
# The whole test suite, in stages (run by `make test` after bootstrap.sh has installed everything).
#   1. static checks: ruff, mypy, ansible-lint (production profile), the collection build (galaxy.yml)
#   2. Python unit + integration tests that need no simulated fleet (real lerobot, real ptys, real systemd
#      notify sockets, the compiled firmware on simavr)
#   3. the simulated amd64 fleet: simfleet, provision / deploy / rollback / benchmark playbooks, testinfra
#   4. Molecule: the provisioning roles converge, are idempotent, work in check mode, pass testinfra
#   5. the emulated arm64 car (qemu-user): PyPI's aarch64 CPU torch wheel with qnnpack, on the target arch
# Each pytest stage ends with its slowest tests and fixtures (--durations), to see where the time goes.
# Set ROVER_TEST_STAGES (e.g. "static python") to run only some stages.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=${ROVER_TEST_STAGES:-static python fleet molecule arm64}
started=$SECONDS
stage() { printf '\n==> [%s +%ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - started)) "$*"; }
want() { [[ " $stages " == *" $1 "* ]]; }

if want static; then
  stage "static checks: ruff, mypy, ansible-lint, collection build"
  ruff check .
  ruff format --check .
  mypy
  ansible-lint --profile production --offline -q
  # The roles as the collection rover.fleet (galaxy.yml); tests/integration/test_collection.py runs it.
  ansible-galaxy collection build --force --output-path out/dist
fi

if want python; then
  stage "unit and integration tests without the simulated fleet"
  pytest -m "not fleet and not arm64" --durations=15
fi

if want fleet; then
  stage "simulated amd64 fleet: simfleet, provision, deploy, rollback, benchmark, testinfra"
  pytest -m "fleet and not arm64" --durations=40
fi

if want molecule; then
  stage "molecule test (default scenario: create, converge, idempotence, check, verify, destroy)"
  molecule test
fi

if want arm64; then
  stage "emulated arm64 car (slow: qemu-user)"
  pytest -m arm64 --durations=10
fi
stage "all stages passed: $stages"
