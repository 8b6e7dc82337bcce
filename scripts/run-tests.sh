#!/usr/bin/env bash
# The whole test suite, in stages (run by `make test` after bootstrap.sh has installed everything).
#   1. static checks: ruff, mypy, ansible-lint (production profile), the collection build (galaxy.yml)
#   2. Python unit + integration tests that need no simulated fleet (real lerobot, real ptys, real systemd
#      notify sockets, the compiled firmware on simavr)
#   3. the simulated amd64 fleet: simfleet, provision / deploy / rollback / benchmark playbooks, testinfra
#   4. Molecule: the provisioning roles converge, are idempotent, work in check mode, pass testinfra
#   5. the emulated arm64 car (qemu-user): PyPI's aarch64 CPU torch wheel with qnnpack, on the target arch.
#   6. the VM car (QEMU, its own kernel; tests/integration/test_vm_car.py): provision (cut by a power cut,
#      then finished), deploy, the USB Arduino and the camera pulled and plugged back while it drives, a
#      reboot, the testinfra suite with its kernel checks, a guest that does not boot. The tests marked
#      `vm_extra` (a bookworm VM car, a power cut during a soak, benchmark and collect) add ~20 min of
#      emulated CPU: the `vm-all` stage runs every VM test instead (ROVER_TEST_STAGES="... vm-all").
#      Not in the default stages (ROVER_TEST_STAGES="static python fleet molecule arm64 vm" adds it): in a
#      cold run beside the fleet stage (after the arm64 car) the whole run took 74 min, but at a load
#      average of 4-6 four timing-bound fleet tests failed and the VM car's gate saw a frame 0.80 s old.
#   With the fleet stage, everything else runs beside it, in the background, one stage after the other: the
#   Python tests, the static checks, the arm64 car (the VM car), then molecule. The fleet stage mostly waits
#   on its cars (soaks, timers, ssh round trips: about one of the 2 cores busy with its deploys' Ansible and
#   the cars' loops), and the Python tests keep one core busy (95 % of one over their 15 min alone, warm).
#   One after the other, the cold run took 91 min on CI's 2 cores (python 19 min, then fleet 69 min beside
#   the rest), over CI's 90; side by side it took 76 min (the fleet stage 74 min, the background stages 66:
#   python 28, static 5, arm64 24.5, molecule 8; both cores 88 % busy). The suite has grown since: CI's run of
#   bdcf878 took 82 min (fleet stage 82, background done ~14 min before), a cold run here 88.6 min; both cores
#   are saturated until the background ends (the fleet stage's Ansible, the simulated board, the emulated
#   car), so moving tests between the stages does not shorten it: fewer Ansible tasks per deploy would.
#   Each emulator keeps a core busy, so
#   only one runs at a time: with both at once beside the fleet stage (load average 5-8) a cold run took
#   85 min and timing-bound fleet tests failed. Every background stage runs even when an earlier one failed
#   (one CI run shows every failure); their output is shown when they end, and a failure fails the run.
#   Without the fleet stage they run in the foreground.
# Each pytest stage ends with its slowest tests and fixtures (--durations), to see where the time goes.
# Set ROVER_TEST_STAGES (e.g. "static python") to run only some stages.
set -euo pipefail
cd "$(dirname "$0")/.."
stages=${ROVER_TEST_STAGES:-static python fleet molecule arm64}
started=$SECONDS
stage() { printf '\n==> [%s +%ds] %s\n' "$(date +%H:%M:%S)" $((SECONDS - started)) "$*"; }
want() { [[ " $stages " == *" $1 "* ]]; }
# The emulated cars' stages: stage name -> pytest marker expression.
declare -A car_marker=([arm64]="arm64" [vm]="vm and not vm_extra" [vm-all]="vm")
# The background run beside the fleet stage (the emulated cars' stages, one after the other): pid and log.
bg_pid="" bg_log=""
# On an early exit (a failed stage, Ctrl-C), stop the background run: its pytest is interrupted and stops
# its fleet (car_stages turns the TERM into pytest's Ctrl-C).
stop_background() {
  if [[ -n $bg_pid ]] && kill -0 "$bg_pid" 2>/dev/null; then
    kill -TERM "$bg_pid" 2>/dev/null || true
    wait "$bg_pid" 2>/dev/null || true
  fi
}
trap stop_background EXIT
# pytest_stage TITLE NAME MARKERS DURATIONS: one pytest session with its own temporary directory and no shared
# pytest cache (another pytest session may run beside). pytest starts with SIGINT at its default (a background
# job inherits it ignored, and pytest needs it to stop its fleet when interrupted); a TERM to this function
# interrupts the running pytest and waits for it.
pytest_stage() {
  local child=""
  trap 'if [[ -n ${child:-} ]]; then kill -INT "$child" 2>/dev/null; wait "$child"; fi; exit 130' TERM
  stage "$1"
  env --default-signal=INT pytest -m "$3" --durations="$4" -p no:cacheprovider \
    --basetemp="$(mktemp -d -t "rover-test-$2.XXXXXX")" &
  child=$!
  wait "$child" || return
  trap - TERM
}
# car_stages NAME...: each emulated car's stage in turn (pytest_stage); the first failure ends it with its
# status.
car_stages() {
  local name
  for name in "$@"; do
    pytest_stage "$name car" "$name" "${car_marker[$name]}" 10 || return
  done
}
# static_stage: ruff, mypy, ansible-lint and the collection build; the first that fails ends it with its status.
static_stage() {
  stage "static checks: ruff, mypy, ansible-lint, collection build"
  ruff check . && ruff format --check . && mypy && ansible-lint --profile production --offline -q &&
    ansible-galaxy collection build --force --output-path out/dist  # the roles as the collection rover.fleet
}
# molecule_stage: molecule test; a TERM (the run stopping early) interrupts it as Ctrl-C would and destroys
# its fleet.
molecule_stage() {
  local child=""
  trap 'if [[ -n ${child:-} ]]; then kill -INT "$child" 2>/dev/null; wait "$child" || true; fi
        molecule destroy >/dev/null 2>&1 || true; exit 130' TERM
  stage "molecule test (default scenario: create, converge, idempotence, check, verify, destroy)"
  env --default-signal=INT molecule test &
  child=$!
  wait "$child" || return
  trap - TERM
}
# python_stage: the tests that need no simulated fleet (pytest_stage).
python_stage() {
  pytest_stage "unit and integration tests without the simulated fleet" python \
    "not fleet and not arm64 and not vm" 15
}
# background_stages NAME...: the Python tests ("python" among NAMEs), the static checks ("static"), each
# emulated car's stage (car_stages), then molecule ("molecule"). Each runs even when one before it failed; the
# status is the last failure's, and the failed stages are named at the end.
background_stages() {
  local name cars=() python=false static=false molecule=false failed=() rc=0 status
  for name in "$@"; do
    case $name in
      python) python=true ;;
      static) static=true ;;
      molecule) molecule=true ;;
      *) cars+=("$name") ;;
    esac
  done
  if $python; then python_stage || { status=$?; rc=$status; failed+=("python (exit $status)"); }; fi
  if $static; then static_stage || { status=$?; rc=$status; failed+=("static (exit $status)"); }; fi
  if ((${#cars[@]})); then
    car_stages "${cars[@]}" || { status=$?; rc=$status; failed+=("${cars[*]} (exit $status)"); }
  fi
  if $molecule; then molecule_stage || { status=$?; rc=$status; failed+=("molecule (exit $status)"); }; fi
  if ((${#failed[@]})); then stage "FAILED in the background: ${failed[*]}"; fi
  return "$rc"
}
# start_background NAME...: background_stages NAME... in the background, its output to a log.
start_background() {
  bg_log=$(mktemp -t "rover-test-background.XXXXXX.log")
  stage "$* in the background beside the fleet stage: $bg_log"
  background_stages "$@" >"$bg_log" 2>&1 &
  bg_pid=$!
}
# wait_background: its output; bg_rc is its exit status.
bg_rc=0
wait_background() {
  stage "waiting for the background stages (since the fleet stage)"
  wait "$bg_pid" || bg_rc=$?
  bg_pid=""
  cat "$bg_log"
}

if want fleet; then
  # Everything else beside the fleet stage, in the background (see the top).
  background=()
  for name in python static arm64 vm vm-all molecule; do
    if want "$name"; then background+=("$name"); fi
  done
  if ((${#background[@]})); then
    start_background "${background[@]}"
  fi
else
  if want static; then static_stage; fi
  if want python; then python_stage; fi
  cars=()
  for name in arm64 vm vm-all; do
    if want "$name"; then cars+=("$name"); fi
  done
  if ((${#cars[@]})); then car_stages "${cars[@]}"; fi
  if want molecule; then molecule_stage; fi
fi
fleet_rc=0
if want fleet; then
  stage "simulated amd64 fleet: simfleet, provision, deploy, rollback, benchmark, testinfra"
  # A failure here still waits for the background stages: one run shows every failure.
  fleet_log=$(mktemp -t "rover-test-fleet.XXXXXX.log")
  pytest -m "fleet and not arm64" --durations=40 2>&1 | tee "$fleet_log" || fleet_rc=$?
  if ((fleet_rc != 0)); then stage "fleet stage FAILED (exit $fleet_rc)"; fi
fi

if [[ -n $bg_pid ]]; then
  wait_background
fi
if ((fleet_rc != 0 || bg_rc != 0)); then
  if ((fleet_rc != 0)); then stage "fleet stage FAILED (exit $fleet_rc; its output is above the background's)"
  fi
  if ((bg_rc != 0)); then stage "background stages FAILED (exit $bg_rc; their log is above: $bg_log)"; fi
  # The failed tests once more, last, where a log cut to its tail still shows them (pytest's short summary).
  grep -h -E '^(FAILED|ERROR) ' ${fleet_log:+"$fleet_log"} ${bg_log:+"$bg_log"} || true
  exit $((fleet_rc != 0 ? fleet_rc : bg_rc))
fi
stage "all stages passed: $stages"
