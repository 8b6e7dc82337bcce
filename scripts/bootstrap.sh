#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian machine (run as root): Debian packages, then a
# controller venv (Python >= 3.12) holding exactly requirements/controller.lock (every package pinned with
# its hash) and the project itself (editable).
# Expensive things live in $ROVER_CACHE (default ~/.cache/rover), outside the clone, and are reused.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${ROVER_CACHE:-$HOME/.cache/rover}
venv="$cache/venv"
lock="$here/requirements/controller.lock"
mkdir -p "$cache"

# The controller's interpreter: $PYTHON, else python3.13 / python3.12 on PATH, else one that pyenv
# installed. A candidate counts only if it runs and is >= 3.12 (a pyenv shim for an unselected version
# does not run).
python_ok() { "$1" -c 'import sys, venv; sys.exit(sys.version_info[:2] < (3, 12))' >/dev/null 2>&1; }
find_python() {
  local c
  if [[ -n ${PYTHON:-} ]]; then
    if python_ok "$PYTHON"; then echo "$PYTHON"; return 0; fi
    echo "error: PYTHON=$PYTHON is not a working Python >= 3.12 (the controller needs it for lerobot 0.6 and ansible-core 2.21)" >&2
    return 1
  fi
  for c in python3.13 python3.12; do
    if command -v "$c" >/dev/null && python_ok "$c"; then command -v "$c"; return 0; fi
  done
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.13*/bin/python3.13 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
    "$cache"/python/cpython-3.12*/bin/python3.12; do
    if [[ -x $c ]] && python_ok "$c"; then echo "$c"; return 0; fi
  done
  # None here (a plain Debian bookworm has 3.11): install one with uv, where the network allows.
  local why="ROVER_INSTALL_PYTHON=0"
  if [[ ${ROVER_INSTALL_PYTHON:-1} == 1 ]]; then
    if c=$(install_python_with_uv); then echo "$c"; return 0; fi
    why=$c
  fi
  echo "error: no Python >= 3.12 found (tried \$PYTHON, python3.13, python3.12, pyenv's versions; uv: $why): install python3.12 or python3.13 with its venv module, or set PYTHON=/path/to/python3.12" >&2
  return 1
}

# CPython 3.12 installed by uv (uv itself from PyPI, in a helper venv made with this machine's python3) into
# $ROVER_CACHE/python; prints its path, or on failure one line saying why (uv downloads CPython from the
# python-build-standalone releases on GitHub).
install_python_with_uv() {
  local base helper="$cache/uv" dir="$cache/python" log found
  base=$(command -v python3 || true)
  if [[ -z $base ]]; then echo "no python3 to run uv with"; return 1; fi
  echo "==> no Python >= 3.12 on this machine: installing CPython 3.12 with uv (uv from PyPI into $helper, CPython into $dir)" >&2
  log=$(mktemp)
  if ! { "$base" -m venv "$helper" && "$helper/bin/pip" install -q uv; } >"$log" 2>&1; then
    echo "uv could not be installed from PyPI ($(grep -v '^\s*$' "$log" | tail -n 1))"; rm -f "$log"; return 1
  fi
  if ! UV_PYTHON_INSTALL_DIR="$dir" "$helper/bin/uv" python install 3.12 >"$log" 2>&1; then
    echo "uv python install 3.12 failed ($(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200))"; rm -f "$log"; return 1
  fi
  rm -f "$log"
  found=$(ls -d "$dir"/cpython-3.12*/bin/python3.12 2>/dev/null | head -n 1)
  if [[ -z $found ]] || ! python_ok "$found"; then echo "uv installed no working python3.12 in $dir"; return 1; fi
  echo "==> installed $("$found" -V) with uv: $found" >&2
  echo "$found"
}

apt_packages=(
  python3-venv python3-dev build-essential git rsync socat openssh-client iproute2
  mmdebstrap systemd-container qemu-user-static binfmt-support debian-archive-keyring arch-test
  gcc-avr avr-libc binutils-avr arduino-core-avr libsimavr-dev g++ avrdude
  # builds the cars' ExecuTorch runtime (roles/rover_python/files/executorch_wheel.py) for the Pi
  g++-aarch64-linux-gnu
  # FFmpeg 5.1's libraries, which lerobot's video decoder (torchcodec) loads
  libavutil57 libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4
  # the fleet's monitor (playbooks/monitor.yml: prometheus, promtool) and the exporter the tests run
  prometheus prometheus-node-exporter
  # the browser the fleet page's tests read it with (headless)
  chromium
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "==> apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts both at once where systemd runs: this controller's own metrics are not the fleet's, and
  # Prometheus is started by playbooks/monitor.yml with the fleet's configuration.
  if [[ -d /run/systemd/system ]]; then
    for unit in prometheus-node-exporter prometheus; do
      if [[ " ${missing[*]} " == *" $unit "* ]]; then
        systemctl disable --now "$unit.service" >/dev/null 2>&1 || true
        echo "==> $unit installed and left stopped (playbooks/monitor.yml starts Prometheus for the fleet)"
      fi
    done
  fi
fi

# QEMU: qemu-user for the emulated arm64 car, which needs >= 8 (systemd 257 spawns its services in a way
# qemu 7.2, bookworm's, refuses), and qemu-system-x86 + qemu-utils for the VM cars (simfleet up --kind vm;
# tested with 10.0). On bookworm all three come from Debian's bookworm-backports (qemu 10).
qemu_packages=(qemu-user-static qemu-system-x86 qemu-utils)
# (A package that is not installed prints nothing: dpkg-query's status must not end the script.)
qemu_major() { { dpkg-query -W -f='${Status} ${Version}' "$1" 2>/dev/null || true; } | sed -nE 's/^install ok installed ([0-9]+:)?([0-9]+).*/\2/p'; }
qemu_old=()
for p in "${qemu_packages[@]}"; do
  v=$(qemu_major "$p")
  [[ ${v:-0} -ge 8 ]] || qemu_old+=("$p")
done
if ((${#qemu_old[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release; then
    echo "==> ${qemu_old[*]}: missing or older than 8, installing QEMU from bookworm-backports"
    backports=/etc/apt/sources.list.d/rover-bookworm-backports.sources
    if [[ ! -f $backports ]]; then
      printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm-backports' \
        'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' >"$backports.tmp"
      mv "$backports.tmp" "$backports"
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${qemu_packages[@]}" >/dev/null
  else
    echo "==> apt-get install ${qemu_old[*]}"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${qemu_old[@]}" >/dev/null
  fi
fi

stamp="$venv/.rover-deps"
want=$(sha256sum "$lock" | cut -d' ' -f1)
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  python=$(find_python)
  # The interpreter a venv was made from, not the venv's own (which `rm -rf` is about to delete): with
  # this venv's bin first on PATH, python3.13 is the venv's.
  python=$("$python" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
  echo "==> creating the venv in $venv with $python ($("$python" -V)); lerobot + torch: a few minutes the first time"
  # Always from scratch; the stamp is written last, so an interrupted install is redone by the next run.
  rm -rf "$venv"
  "$python" -m venv "$venv"
  # (This machine's pip.conf names local index folders that lack most packages: drop those warnings.)
  "$venv/bin/pip" install -q --require-hashes --no-deps -r "$lock" 2> >(grep -v 'is ignored: it is neither a file' >&2)
  "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$here"
  "$venv/bin/pip" check
  echo "$want" >"$stamp"
else
  # The venv is shared by clones: point its editable install at this one (no dependencies), unless it
  # already points here with this pyproject.toml (its package list).
  editable="$here $(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)"
  if [[ "$(cat "$venv/.rover-editable" 2>/dev/null)" != "$editable" ]]; then
    "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$here"
    echo "$editable" >"$venv/.rover-editable"
  fi
fi

# The ExecuTorch runtime a car uses (rover-executorch: executorch's C++ libraries and a C interface, no
# torch), built from the executorch wheel for this machine, so the controller runs `.pte` bundles as a car does.
et_result=$("$venv/bin/python" "$here/roles/rover_python/files/executorch_wheel.py" \
  --arch "$(uname -m)" --out "$cache/runtime-wheels/executorch" | tail -1)
et_wheel=$("$venv/bin/python" -c 'import json, sys; print(json.loads(sys.argv[1])["wheel"])' "$et_result")
et_stamp="$venv/.rover-executorch"
if [[ "$(cat "$et_stamp" 2>/dev/null)" != "$(basename "$et_wheel")" ]]; then
  "$venv/bin/pip" install -q --no-deps --force-reinstall "$et_wheel" 2> >(grep -v 'is ignored: it is neither a file' >&2)
  basename "$et_wheel" >"$et_stamp"
fi
echo "==> venv ready: $venv"
