#!/usr/bin/env bash
# Regenerates requirements/controller.lock: every package the controller venv installs, pinned with its
# hashes, resolved for Linux and Python >= 3.12 from pyproject.toml's controller, runtime, onnx and dev
# extras. bootstrap.sh installs exactly this file (pip --require-hashes), so two controllers build the same
# environment. Run it after changing a dependency in pyproject.toml and commit both.
set -euo pipefail
cd "$(dirname "$0")/.."
uv=${UV:-uv}
if ! command -v "$uv" >/dev/null; then
  echo "error: scripts/lock.sh needs uv (pip install uv, or UV=/path/to/uv)" >&2
  exit 2
fi
"$uv" pip compile pyproject.toml --extra controller --extra runtime --extra onnx --extra dev \
  --universal --python-version 3.12 --generate-hashes --no-header --no-annotate \
  --output-file requirements/controller.lock
