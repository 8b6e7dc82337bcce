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
#   With the fleet stage, the static checks, the arm64 car, the VM car and then molecule run beside it, in the
#   background, one after the other: the fleet stage spends much of its time waiting (soaks, timers, ssh round
#   trips), but each emulator also keeps a core busy, and with both emulators at once beside the fleet stage
#   (load average 5-8 on CI's 2 cores) a cold run took 85 min and timing-bound fleet tests failed. The static
#   checks (3 min of one core) and Molecule (Ansible on its own two cars, ports 2341-2342) are lighter than an
#   emulator, and the whole chain ends well before the fleet stage does (static 3 min + arm64 ~19 min +
#   molecule ~6 min beside a ~54 min fleet stage, cold, here), so neither adds its minutes to the run. Their
#   output is shown when they end; a failure fails the run. Without the fleet stage they run in the foreground.
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
# car_stages NAME...: pytest for each emulated car's stage in turn, each with its own temporary directory and
# no shared pytest cache (another pytest session may run beside); the first failure ends it with its status.
# pytest starts with SIGINT at its default (a background job inherits it ignored, and pytest needs it to stop
# its fleet when interrupted); a TERM to this function interrupts the running pytest and waits for it.
car_stages() {
  local name child=""
  trap 'if [[ -n $child ]]; then kill -INT "$child" 2>/dev/null; wait "$child"; fi; exit 130' TERM
  for name in "$@"; do
    stage "$name car"
    env --default-signal=INT pytest -m "${car_marker[$name]}" --durations=10 -p no:cacheprovider \
      --basetemp="$(mktemp -d -t "rover-test-$name.XXXXXX")" &
    child=$!
    wait "$child" || return
  done
  trap - TERM
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
  trap 'if [[ -n $child ]]; then kill -INT "$child" 2>/dev/null; wait "$child" || true; fi
        molecule destroy >/dev/null 2>&1 || true; exit 130' TERM
  stage "molecule test (default scenario: create, converge, idempotence, check, verify, destroy)"
  env --default-signal=INT molecule test &
  child=$!
  wait "$child" || return
  trap - TERM
}
# background_stages NAME...: the static checks ("static" among NAMEs), each emulated car's stage (car_stages),
# then molecule ("molecule"); the first that fails ends it with its status.
background_stages() {
  local name cars=() static=false molecule=false
  for name in "$@"; do
    case $name in
      static) static=true ;;
      molecule) molecule=true ;;
      *) cars+=("$name") ;;
    esac
  done
  if $static; then static_stage || return; fi
  if ((${#cars[@]})); then car_stages "${cars[@]}" || return; fi
  if $molecule; then molecule_stage; fi
}
# start_background NAME...: background_stages NAME... in the background, its output to a log.
start_background() {
  bg_log=$(mktemp -t "rover-test-background.XXXXXX.log")
  stage "$* in the background beside the fleet stage: $bg_log"
  background_stages "$@" >"$bg_log" 2>&1 &
  bg_pid=$!
}
# wait_background: its output, and its exit status as the run's if it failed.
wait_background() {
  local rc=0
  stage "waiting for the background stages (since the fleet stage)"
  wait "$bg_pid" || rc=$?
  bg_pid=""
  cat "$bg_log"
  if ((rc != 0)); then
    stage "background stages FAILED (exit $rc; log above: $bg_log)"
    exit "$rc"
  fi
}

if want static && ! want fleet; then
  static_stage
fi

if want python; then
  stage "unit and integration tests without the simulated fleet"
  pytest -m "not fleet and not arm64 and not vm" --durations=15
fi

# What runs beside the fleet stage (or after the others, without it): the static checks (with the fleet stage
# only: without it they ran first), the emulated cars, then molecule.
background=()
if want static && want fleet; then background+=(static); fi
for name in arm64 vm vm-all molecule; do
  if want "$name"; then background+=("$name"); fi
done
if want fleet && ((${#background[@]})); then
  start_background "${background[@]}"
fi
if want fleet; then
  stage "simulated amd64 fleet: simfleet, provision, deploy, rollback, benchmark, testinfra"
  pytest -m "fleet and not arm64" --durations=40
fi

if [[ -n $bg_pid ]]; then
  wait_background
elif ((${#background[@]})); then
  background_stages "${background[@]}"
fi
stage "all stages passed: $stages"
