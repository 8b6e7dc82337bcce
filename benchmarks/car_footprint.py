"""The installed footprint of each inference backend on a car, from the car's wheelhouse.

Reads a wheelhouse the rover_python role built ($ROVER_CACHE/wheelhouse/<platform>/<cp..-key>/) and, for each
backend (ONNX Runtime only, torch, ExecuTorch), adds up the unpacked size of the backend's wheel and of every
dependency it pulls in that the runtime does not need anyway (numpy, OpenCV and pyserial are counted once, as
the base every car has). Prints JSON (MB installed, and the wheels counted).

    python benchmarks/car_footprint.py WHEELHOUSE_DIR
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

BACKENDS = {"onnxruntime": "onnxruntime", "torch": "torch", "executorch": "rover-executorch"}
BASE = ("numpy", "opencv-python-headless", "pyserial")


def _wheels(directory: Path) -> dict[str, Path]:
    return {canonicalize_name(w.name.split("-")[0]): w for w in directory.glob("*.whl")}


def _unpacked_bytes(wheel: Path) -> int:
    with zipfile.ZipFile(wheel) as archive:
        return sum(info.file_size for info in archive.infolist())


def _requires(wheel: Path, environment: dict[str, str]) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        metadata = Parser().parsestr(archive.read(name).decode())
    names: list[str] = []
    for line in metadata.get_all("Requires-Dist") or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate({**environment, "extra": ""}):
            names.append(canonicalize_name(requirement.name))
    return names


def closure(root: str, wheels: dict[str, Path], environment: dict[str, str]) -> list[str]:
    seen: list[str] = []
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen or name not in wheels:
            continue
        seen.append(name)
        todo.extend(_requires(wheels[name], environment))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheelhouse", type=Path)
    args = parser.parse_args(argv)
    wheels = _wheels(args.wheelhouse)
    if not wheels:
        print(f"error: no wheels in {args.wheelhouse}", file=sys.stderr)
        return 2
    machine = "aarch64" if any(w.name.endswith("aarch64.whl") for w in wheels.values()) else "x86_64"
    python = re.search(r"cp(\d)(\d+)-", args.wheelhouse.name)
    environment: dict[str, str] = {str(k): str(v) for k, v in default_environment().items()}
    environment.update(platform_machine=machine, sys_platform="linux", platform_system="Linux")
    if python:
        environment["python_version"] = f"{python.group(1)}.{python.group(2)}"
    base = {name for root in BASE for name in closure(root, wheels, environment)}
    report: dict[str, object] = {"wheelhouse": str(args.wheelhouse), "machine": machine}
    report["base_mb"] = round(sum(_unpacked_bytes(wheels[n]) for n in base) / 1e6, 1)
    for backend, package in BACKENDS.items():
        names = [n for n in closure(canonicalize_name(package), wheels, environment) if n not in base]
        report[backend] = {
            "installed_mb": round(sum(_unpacked_bytes(wheels[n]) for n in names) / 1e6, 1) if names else None,
            "wheels": sorted(names),
        }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
