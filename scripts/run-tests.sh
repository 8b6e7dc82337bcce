#!/usr/bin/env bash
# The whole test suite, in stages (run by `make test` after bootstrap.sh has installed everything).
#   1. static checks: ruff, mypy, ansible-lint (production profile), the collection build (galaxy.yml)
#   2. Python unit + integration tests that need no simulated fleet (real lerobot, real ptys, real systemd
#      notify sockets, the compiled firmware on simavr)
#   3. the simulated amd64 fleet: simfleet, provision / deploy / rollback / benchmark playbooks, testinfra
#   4. Molecule: the provisioning roles converge, are idempotent, work in check mode, pass testinfra
#   5. the emulated arm64 car (qemu-user): PyPI's aarch64 CPU torch wheel with qnnpack, on the target arch.
#      With the fleet stage it starts beside it, in the background: both spend most of their time waiting
#      (on emulated processes, soaks, timers), so together they take little more than the fleet stage alone.
#      Its output is shown when it ends; a failure fails the run.
# Each pytest stage ends with its slowest tests and fixtures (--durations), to see where the time goes.
# Set ROVER_TEST_STAGES (e.g. "static python") to run only some stages.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=${ROVER_TEST_STAGES:-static python fleet molecule arm64}
started=$SECONDS
stage() { printf '\n==> [%s +%ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - started)) "$*"; }
want() { [[ " $stages " == *" $1 "* ]]; }
arm64_pid=""
arm64_log=""
# On an early exit (a failed stage, Ctrl-C), interrupt the background arm64 run: pytest then stops its fleet.
stop_arm64() {
  if [[ -n $arm64_pid ]] && kill -0 "$arm64_pid" 2>/dev/null; then
    kill -INT "$arm64_pid" 2>/dev/null || true
    wait "$arm64_pid" 2>/dev/null || true
  fi
}
trap stop_arm64 EXIT

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

if want fleet && want arm64; then
  arm64_log=$(mktemp -t rover-test-arm64.XXXXXX.log)
  stage "emulated arm64 car (slow: qemu-user), in the background beside the fleet stage: $arm64_log"
  # Its own pytest temporary directory and no shared pytest cache: two pytest sessions run at once.
  # (A background job starts with SIGINT ignored; pytest needs it back to stop its fleet when interrupted.)
  env --default-signal=INT pytest -m arm64 --durations=10 -p no:cacheprovider \
    --basetemp="$(mktemp -d -t rover-test-arm64.XXXXXX)" >"$arm64_log" 2>&1 &
  arm64_pid=$!
fi

if want fleet; then
  stage "simulated amd64 fleet: simfleet, provision, deploy, rollback, benchmark, testinfra"
  pytest -m "fleet and not arm64" --durations=40
fi

if want molecule; then
  stage "molecule test (default scenario: create, converge, idempotence, check, verify, destroy)"
  molecule test
fi

if [[ -n $arm64_pid ]]; then
  stage "waiting for the emulated arm64 car (background since the fleet stage)"
  arm64_rc=0
  wait "$arm64_pid" || arm64_rc=$?
  arm64_pid=""
  cat "$arm64_log"
  if ((arm64_rc != 0)); then
    stage "emulated arm64 car FAILED (exit $arm64_rc; log above: $arm64_log)"
    exit "$arm64_rc"
  fi
elif want arm64; then
  stage "emulated arm64 car (slow: qemu-user)"
  pytest -m arm64 --durations=10
fi
stage "all stages passed: $stages"
