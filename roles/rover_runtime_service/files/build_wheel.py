#!/usr/bin/env python3
"""Build the rover_runtime wheel once per source version, into a cache directory on the controller.

    build_wheel.py --source REPO_DIR --cache CACHE_DIR

The cache key is a sha256 over the files that go into the wheel (pyproject.toml, README.md and every file
of the rover_runtime package but its test-only modules, TEST_ONLY, which never go to a car), so an unchanged
source reuses the same wheel file: the copy to the car and the install are then skipped. The build runs
`pip wheel --no-deps --no-build-isolation` in a temporary copy of just those files (nothing is written into
the source tree) and the wheel is moved into place only when complete. Prints JSON: {"wheel": PATH, "key":
KEY, "built": BOOL}; on error exit 1 with a one-line message.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "rover_runtime"
TOP_FILES = ("pyproject.toml", "README.md")
# Modules of the package that only the controller's tests, benchmarks and simulated fleet use: the firmware
# simulator (the simulated cars' Arduino, run on the controller) and the tiny-bundle writer.
TEST_ONLY = ("firmware_sim.py", "testing.py")


def source_files(source: Path) -> list[Path]:
    files = [source / name for name in TOP_FILES]
    package = source / PACKAGE
    files += sorted(
        p
        for p in package.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
        and p.relative_to(package).as_posix() not in TEST_ONLY
    )
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]} is missing")
    return files


def source_key(source: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def build(source: Path, cache: Path) -> dict[str, object]:
    files = source_files(source)
    key = source_key(source, files)
    target = cache / key
    existing = sorted(target.glob("*.whl")) if target.is_dir() else []
    if existing:
        return {"wheel": str(existing[0]), "key": key, "built": False}
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=cache) as tmp:
        tree = Path(tmp) / "src"
        for path in files:
            dest = tree / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet"]
        done = subprocess.run([*cmd, "-w", str(out), str(tree)], capture_output=True, text=True, check=False)
        wheels = sorted(out.glob("*.whl"))
        if done.returncode != 0 or len(wheels) != 1:
            last = (done.stderr.strip().splitlines() or ["no wheel was produced"])[-1]
            raise RuntimeError(f"pip wheel failed for {source}: {last}")
        staged = Path(tmp) / key
        staged.mkdir()
        shutil.move(str(wheels[0]), staged / wheels[0].name)
        try:
            staged.rename(target)
        except OSError:
            # Another deploy built the same sources at the same time and renamed first: the same wheel.
            if not (target / wheels[0].name).is_file():
                raise
            return {"wheel": str(target / wheels[0].name), "key": key, "built": False}
    return {"wheel": str(target / wheels[0].name), "key": key, "built": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the project directory (pyproject.toml)")
    parser.add_argument("--cache", type=Path, required=True, help="where built wheels are kept")
    args = parser.parse_args()
    try:
        result = build(args.source.resolve(), args.cache.expanduser())
    except (OSError, RuntimeError) as exc:
        print(f"build_wheel: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
