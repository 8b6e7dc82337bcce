#!/usr/bin/env bash
# The whole test suite, in stages (run by `make test` after bootstrap.sh has installed everything).
#   1. static checks: ruff, mypy, ansible-lint (production profile), the collection build (galaxy.yml)
#   2. Python unit + integration tests that need no simulated fleet (real lerobot, real ptys, real systemd
#      notify sockets, the compiled firmware on simavr)
#   3. the simulated amd64 fleet: simfleet, provision / deploy / rollback / benchmark playbooks, testinfra
#   4. Molecule: the provisioning roles converge, are idempotent, work in check mode, pass testinfra
#   5. the emulated arm64 car (qemu-user): PyPI's aarch64 CPU torch wheel with qnnpack, on the target arch.
#   6. the VM car (QEMU, its own kernel): provision, deploy, the USB Arduino and the camera pulled and
#      plugged back while it drives, a power cut during a soak (tests/integration/test_vm_car.py). Not in
#      the default stages yet: it has not passed a cold run beside the fleet stage on CI's 2 cores
#      (ROVER_TEST_STAGES="static python fleet vm molecule arm64" runs it there).
#   With the fleet stage, the arm64 and VM stages start beside it, in the background: they spend most of
#   their time waiting (on emulated processes, soaks, timers), so together they take little more than the
#   fleet stage alone. Their output is shown when they end; a failure fails the run.
# Each pytest stage ends with its slowest tests and fixtures (--durations), to see where the time goes.
# Set ROVER_TEST_STAGES (e.g. "static python") to run only some stages.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=${ROVER_TEST_STAGES:-static python fleet molecule arm64}
started=$SECONDS
stage() { printf '\n==> [%s +%ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - started)) "$*"; }
want() { [[ " $stages " == *" $1 "* ]]; }
# Stages run in the background beside the fleet stage: name -> pid, name -> log.
declare -A bg_pid=() bg_log=()
# On an early exit (a failed stage, Ctrl-C), interrupt the background runs: pytest then stops their fleets.
stop_background() {
  local name
  for name in "${!bg_pid[@]}"; do
    if kill -0 "${bg_pid[$name]}" 2>/dev/null; then
      kill -INT "${bg_pid[$name]}" 2>/dev/null || true
      wait "${bg_pid[$name]}" 2>/dev/null || true
    fi
  done
}
trap stop_background EXIT
# start_background NAME MARKER WHAT: pytest -m MARKER in the background, with its own temporary directory
# and no shared pytest cache (several pytest sessions run at once). A background job starts with SIGINT
# ignored; pytest needs it back to stop its fleet when interrupted.
start_background() {
  bg_log[$1]=$(mktemp -t "rover-test-$1.XXXXXX.log")
  stage "$3, in the background beside the fleet stage: ${bg_log[$1]}"
  env --default-signal=INT pytest -m "$2" --durations=10 -p no:cacheprovider \
    --basetemp="$(mktemp -d -t "rover-test-$1.XXXXXX")" >"${bg_log[$1]}" 2>&1 &
  bg_pid[$1]=$!
}
# wait_background NAME WHAT: its output, and its exit status as the run's if it failed.
wait_background() {
  local rc=0
  stage "waiting for the $2 (background since the fleet stage)"
  wait "${bg_pid[$1]}" || rc=$?
  unset "bg_pid[$1]"
  cat "${bg_log[$1]}"
  if ((rc != 0)); then
    stage "$2 FAILED (exit $rc; log above: ${bg_log[$1]})"
    exit "$rc"
  fi
}

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
  pytest -m "not fleet and not arm64 and not vm" --durations=15
fi

if want fleet && want arm64; then
  start_background arm64 arm64 "emulated arm64 car (slow: qemu-user)"
fi
if want fleet && want vm; then
  start_background vm vm "VM car (QEMU: kernel, udev, USB serial, camera, power cut)"
fi

if want fleet; then
  stage "simulated amd64 fleet: simfleet, provision, deploy, rollback, benchmark, testinfra"
  pytest -m "fleet and not arm64" --durations=40
fi

if want molecule; then
  stage "molecule test (default scenario: create, converge, idempotence, check, verify, destroy)"
  molecule test
fi

for name in arm64 vm; do
  if [[ -n ${bg_pid[$name]:-} ]]; then
    wait_background "$name" "$name car"
  elif want "$name"; then
    stage "$name car"
    pytest -m "$name" --durations=10
  fi
done
stage "all stages passed: $stages"
