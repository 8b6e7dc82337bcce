#!/usr/bin/env python3
"""Build the `rover-executorch` wheel for one CPU architecture, on the controller (standard library only).

A car runs ExecuTorch programs (`.pte`) without torch: ExecuTorch's Python runtime links libtorch, and no CPU
torch for the Pi matches executorch 1.5's. The executorch wheel's `executorch/lib/` does not: its runtime,
XNNPACK backend, optimized and quantized kernels and threadpool need only the C/C++ runtime. This script
takes those libraries from the executorch wheel for the target architecture (downloaded with `pip download`,
or given), compiles `rover_et.cpp` (a small C interface the car calls with ctypes) against the wheel's
headers with the architecture's C++ compiler (`g++` natively, `aarch64-linux-gnu-g++` across), and writes

    <out>/rover_executorch-<executorch version>+rover<key>-py3-none-manylinux_2_28_<arch>.whl

holding `rover_executorch/` (`__init__.py` naming `LIBRARY`, `librover_et.so`, the five libraries). `key` is a
hash of the inputs (this script, the C++ source, the executorch wheel, the compiler's version): the wheel is
built only when it changes, and reproducibly (fixed timestamps, sorted entries). The last line printed is
JSON: {"changed": bool, "wheel": path, "version": str}. Errors: one line on stderr and exit status 1.

    executorch_wheel.py --arch aarch64 --out DIR [--executorch-wheel FILE | --executorch-version 1.5.1]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "rover_et.cpp"
LIBRARIES = (
    "libexecutorch.so",
    "libexecutorch_backend_xnnpack.so",
    "libexecutorch_kernels_optimized.so",
    "libexecutorch_kernels_quantized.so",
    "libexecutorch_threadpool.so",
)
ARCHES = ("x86_64", "aarch64")
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++", "x86_64": "x86_64-linux-gnu-g++"}
# The definitions ExecuTorch's own CMake config gives its consumers (executorch-config.cmake).
DEFINES = ("-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class BuildError(Exception):
    pass


def compiler_for(arch: str, requested: str | None) -> str:
    if requested:
        return requested
    if platform.machine() == arch:
        return "g++"
    cross = CROSS_COMPILERS[arch]
    if shutil.which(cross) is None:
        raise BuildError(
            f"no C++ compiler for {arch}: {cross} is not installed (Debian: apt-get install "
            f"g++-{arch.replace('_', '-')}-linux-gnu; scripts/bootstrap.sh installs it)"
        )
    return cross


def download_executorch(version: str, arch: str, dest: Path) -> Path:
    """The executorch wheel for `arch` (any CPython: only its C++ libraries and headers are used), kept in
    `dest` and downloaded only when absent."""
    wheels = sorted(dest.glob(f"executorch-{version}-*{arch}.whl"))
    if wheels:
        return wheels[0]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        f"--platform=manylinux_2_28_{arch}",
        "--python-version=3.13",
        "--implementation=cp",
        "--dest",
        str(dest),
        f"executorch=={version}",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob(f"executorch-{version}-*{arch}.whl"))
    if result.returncode != 0 or not wheels:
        last = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise BuildError(f"no executorch {version} wheel for {arch}: {last}")
    return wheels[0]


def wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def build_key(executorch_wheel: Path, compiler: str, arch: str) -> str:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    digest = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        hashlib.sha256(executorch_wheel.read_bytes()).digest(),
        version.encode(),
        arch.encode(),
        " ".join(DEFINES).encode(),
        Path(__file__).read_bytes(),
    ):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()


def compile_shim(compiler: str, root: Path, out: Path) -> None:
    include = root / "executorch" / "include"
    lib = root / "executorch" / "lib"
    command = [
        compiler,
        "-std=c++17",
        "-O2",
        "-fPIC",
        "-shared",
        *DEFINES,
        f"-I{include}",
        f"-I{include / 'executorch/runtime/core/portable_type/c10'}",
        "-o",
        str(out),
        str(SOURCE),
        f"-L{lib}",
        # Link every library (their static constructors register the XNNPACK backend and the kernels).
        "-Wl,--no-as-needed",
        *(f"-l{name[3:-3]}" for name in LIBRARIES),
        "-Wl,--as-needed",
        "-Wl,-rpath,$ORIGIN",
        "-s",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise BuildError(f"compiling {SOURCE.name} with {compiler} failed:\n{result.stderr[-4000:]}")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(files: dict[str, bytes], version: str, arch: str, out: Path) -> None:
    """A PEP 427 wheel of `files` (path in the wheel -> content), reproducible."""
    dist = f"rover_executorch-{version}.dist-info"
    tag = f"py3-none-manylinux_2_28_{arch}"
    files = dict(files)
    files[f"{dist}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: rover-executorch\nVersion: {version}\n"
        f"Summary: ExecuTorch {version} runtime libraries and a C interface for rover_runtime (no torch)\n"
        "License: BSD-3-Clause\n"
    ).encode()
    files[f"{dist}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: rover executorch_wheel.py\nRoot-Is-Purelib: false\nTag: {tag}\n"
    ).encode()
    record = [_record_line(name, data) for name, data in sorted(files.items())]
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in sorted(files.items()):
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)


def build(
    arch: str, out_dir: Path, executorch_wheel: Path | None, version: str, compiler: str | None
) -> dict[str, object]:
    if arch not in ARCHES:
        raise BuildError(f"unknown architecture {arch!r} ({', '.join(ARCHES)})")
    if not SOURCE.is_file():
        raise BuildError(f"{SOURCE} is missing")
    cxx = compiler_for(arch, compiler)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".rover-executorch-", dir=out_dir) as tmp:
        work = Path(tmp)
        if executorch_wheel is None:
            executorch_wheel = download_executorch(version, arch, out_dir / "executorch")
        if not executorch_wheel.name.endswith(f"_{arch}.whl"):
            raise BuildError(f"{executorch_wheel.name} is not an executorch wheel for {arch}")
        key = build_key(executorch_wheel, cxx, arch)
        # The local version names the build: a car's wheelhouse (keyed by its requirements) changes with it.
        executorch_version = wheel_version(executorch_wheel)
        version = f"{executorch_version}+rover{key[:12]}"
        wheel = out_dir / f"rover_executorch-{version}-py3-none-manylinux_2_28_{arch}.whl"
        if wheel.is_file():
            return {"changed": False, "wheel": str(wheel), "version": version}
        root = work / "executorch-wheel"
        with zipfile.ZipFile(executorch_wheel) as archive:
            members = [
                n
                for n in archive.namelist()
                if n.startswith("executorch/include/") or n in {f"executorch/lib/{lib}" for lib in LIBRARIES}
            ]
            missing = [lib for lib in LIBRARIES if f"executorch/lib/{lib}" not in members]
            if missing:
                raise BuildError(f"{executorch_wheel.name} lacks {', '.join(missing)}")
            archive.extractall(root, members)
        shim = work / "librover_et.so"
        compile_shim(cxx, root, shim)
        files = {
            f"rover_executorch/{lib}": (root / "executorch" / "lib" / lib).read_bytes() for lib in LIBRARIES
        }
        files["rover_executorch/librover_et.so"] = shim.read_bytes()
        files["rover_executorch/__init__.py"] = (
            f'"""ExecuTorch {executorch_version}\'s runtime libraries and librover_et.so, their C interface '
            '(no torch)."""\n\n'
            "from pathlib import Path\n\n"
            f'EXECUTORCH_VERSION = "{executorch_version}"\n'
            'LIBRARY = Path(__file__).with_name("librover_et.so")\n'
        ).encode()
        staged = work / wheel.name
        write_wheel(files, version, arch, staged)
        staged.replace(wheel)
        for old in out_dir.glob(f"rover_executorch-*_{arch}.whl"):
            if old != wheel:
                old.unlink()
    return {"changed": True, "wheel": str(wheel), "version": version}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", required=True, choices=ARCHES)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--executorch-wheel", type=Path)
    parser.add_argument("--executorch-version", default="1.5.1")
    parser.add_argument(
        "--compiler", help="the C++ compiler (default: g++ natively, else the cross compiler)"
    )
    args = parser.parse_args(argv)
    try:
        result = build(args.arch, args.out, args.executorch_wheel, args.executorch_version, args.compiler)
    except (BuildError, OSError, zipfile.BadZipFile, subprocess.CalledProcessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
