#!/usr/bin/env bash
# Installs everything this project needs on a fresh Debian bookworm machine (run as root):
# Debian packages, then a Python 3.11 venv with the project installed (editable) and its tools.
# Expensive things live in $ROVER_CACHE (default ~/.cache/rover), outside the clone, and are reused.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache=${ROVER_CACHE:-$HOME/.cache/rover}
python=${PYTHON:-python3}
venv="$cache/venv"
mkdir -p "$cache"

apt_packages=(
  python3-venv python3-dev build-essential git rsync socat openssh-client iproute2
  mmdebstrap systemd-container qemu-user-static binfmt-support debian-archive-keyring arch-test
  gcc-avr avr-libc binutils-avr arduino-core-avr libsimavr-dev g++
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
fi

"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, {sys.executable} is {sys.version}"'

stamp="$venv/.rover-deps"
want=$(sha256sum "$here/pyproject.toml" | cut -d' ' -f1)
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "==> creating the venv in $venv (lerobot + torch: a few minutes the first time)"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q -U pip wheel setuptools
  "$venv/bin/pip" install -q -e "$here[controller,runtime,onnx,dev]"
  echo "$want" >"$stamp"
else
  # The venv is shared by clones: point its editable install at this one (fast, no dependencies).
  "$venv/bin/pip" install -q --no-deps -e "$here"
fi
echo "==> venv ready: $venv"
