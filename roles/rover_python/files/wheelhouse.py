#!/usr/bin/env python3
"""Build and verify a wheelhouse on the controller (stdlib + packaging; run by the rover_python role).

``build`` downloads the wheels for one target platform and Python version ONCE into
``<root>/<platform>/cp<py>-<key>/`` where ``<platform>`` is the first platform tag given (more tags,
e.g. older manylinux ones, widen what pip accepts) and ``key`` is a hash of the inputs (requirements,
platform tags, Python version, pip arguments). A finished directory holds the wheels, ``SHA256SUMS``,
``requirements.txt`` (every wheel pinned with ``--hash``, for ``pip install --require-hashes``) and
``inputs.json``. It is written to a temporary directory and renamed, so a directory that exists is
complete. The last line printed is JSON: ``{"changed": bool, "dir": str, "wheels": int, "sums_sha256": str,
"requirements_sha256": str, "packages": {name: version}}`` (``sums_sha256`` is the hash of SHA256SUMS itself,
to tell whether a car already holds the same wheelhouse; with ``requirements_sha256`` it is what a car
fetching the wheelhouse over HTTP checks the two lists against; ``packages`` is what the wheelhouse installs,
by normalized name).

A requirement (or a dependency of one) that has no wheel for the target Python and platform is an error
naming it: ``no wheel of onnxruntime==1.32.0 for CPython 3.10 on manylinux_2_28_x86_64 (...)``.

``verify`` checks every file listed in ``SHA256SUMS`` against its hash and refuses unlisted wheels.
Errors are one line on stderr naming the file, and a non-zero exit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

SUMS_NAME = "SHA256SUMS"
REQUIREMENTS_NAME = "requirements.txt"
INPUTS_NAME = "inputs.json"
# PEP 427: {name}-{version}(-{build})?-{python}-{abi}-{platform}.whl
MACHINE = re.compile(r"^(manylinux_\d+_\d+|manylinux\d+|musllinux_\d+_\d+|linux)_")
WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")
# pip's last word when nothing fits the target: "ERROR: No matching distribution found for numpy==1.22.4"
NO_MATCH = re.compile(r"No matching distribution found for (?P<requirement>\S+)")


class WheelhouseError(Exception):
    """A problem with the inputs or the content of a wheelhouse."""


@dataclass(frozen=True)
class BuildInputs:
    platforms: tuple[str, ...]
    python_version: str
    requirements: tuple[str, ...]
    pip_args: tuple[str, ...]

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def directory_name(self) -> str:
        return f"cp{self.python_version.replace('.', '')}-{self.key()}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_sums(directory: Path) -> dict[str, str]:
    sums_file = directory / SUMS_NAME
    if not sums_file.is_file():
        raise WheelhouseError(f"wheelhouse {directory}: {SUMS_NAME} is missing")
    sums: dict[str, str] = {}
    for number, line in enumerate(sums_file.read_text().splitlines(), start=1):
        parts = line.split()
        if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]):
            raise WheelhouseError(f"{sums_file}:{number}: not '<sha256>  <file>'")
        sums[parts[1]] = parts[0]
    return sums


def verify(directory: Path) -> int:
    """Check every wheel against SHA256SUMS; return the number of wheels checked."""
    sums = read_sums(directory)
    present = {path.name for path in directory.glob("*.whl")}
    unlisted = sorted(present - set(sums))
    if unlisted:
        raise WheelhouseError(f"wheelhouse {directory}: {unlisted[0]} is not listed in {SUMS_NAME}")
    for name, expected in sorted(sums.items()):
        path = directory / name
        if not path.is_file():
            raise WheelhouseError(f"wheelhouse {directory}: {name} is listed in {SUMS_NAME} but missing")
        actual = sha256_of(path)
        if actual != expected:
            raise WheelhouseError(
                f"wheelhouse {directory}: {name} has sha256 {actual}, {SUMS_NAME} says {expected}: refused"
            )
    return len(sums)


def write_index(directory: Path, inputs: BuildInputs) -> int:
    wheels = sorted(directory.glob("*.whl"))
    if not wheels:
        raise WheelhouseError(f"pip downloaded no wheels into {directory}")
    sums_lines = []
    requirement_lines = []
    for wheel in wheels:
        match = WHEEL_NAME.match(wheel.name)
        if match is None:
            raise WheelhouseError(f"{wheel.name}: not a wheel file name")
        digest = sha256_of(wheel)
        sums_lines.append(f"{digest}  {wheel.name}")
        requirement_lines.append(f"{match['name']}=={match['version']} --hash=sha256:{digest}")
    (directory / SUMS_NAME).write_text("\n".join(sums_lines) + "\n")
    (directory / REQUIREMENTS_NAME).write_text("\n".join(requirement_lines) + "\n")
    (directory / INPUTS_NAME).write_text(json.dumps(asdict(inputs), indent=2, sort_keys=True) + "\n")
    return len(wheels)


def target_environment(inputs: BuildInputs) -> dict[str, str]:
    """PEP 508 marker values of the target (not of this controller)."""
    machine = MACHINE.sub("", inputs.platforms[0])
    return {
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": machine,
        "python_version": inputs.python_version,
        "python_full_version": f"{inputs.python_version}.0",
        "implementation_version": f"{inputs.python_version}.0",
    }


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        metadata_name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = archive.read(metadata_name).decode()
    return [
        line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]


def packages(directory: Path) -> dict[str, str]:
    """Normalized name -> version of every wheel listed in SHA256SUMS."""
    found: dict[str, str] = {}
    for name in read_sums(directory):
        match = WHEEL_NAME.match(name)
        if match is not None:
            found[canonicalize_name(match["name"])] = match["version"]
    return dict(sorted(found.items()))


def no_wheel_message(requirement: str, inputs: BuildInputs, needed_by: dict[str, str]) -> str:
    try:
        parent = needed_by.get(canonicalize_name(Requirement(requirement).name), "")
    except InvalidRequirement:
        parent = ""
    return (
        f"no wheel of {requirement}{f' (needed by {parent})' if parent else ''} for CPython "
        f"{inputs.python_version} on {', '.join(inputs.platforms)}"
    )


def pip_download(
    staging: Path, inputs: BuildInputs, requirements: list[str], needed_by: dict[str, str] | None = None
) -> None:
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(staging),
        *(f"--platform={platform}" for platform in inputs.platforms),
        "--python-version", inputs.python_version,
        "--implementation", "cp", "--only-binary=:all:",
        *inputs.pip_args, *requirements,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        missing = NO_MATCH.search(result.stderr)
        if missing:
            raise WheelhouseError(no_wheel_message(missing["requirement"], inputs, needed_by or {}))
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise WheelhouseError(f"pip download for {inputs.platforms[0]} failed: {last}")


def download_closure(staging: Path, inputs: BuildInputs) -> None:
    """Download the requirements and their dependencies, judging markers for the TARGET.

    ``pip download --platform`` evaluates environment markers for the controller (so an aarch64 torch
    wheel would drag in x86_64-only CUDA packages). Here each level of dependencies is read from the
    downloaded wheels' metadata, markers are evaluated for the target, and only what it needs is fetched
    (``--no-deps``). No backtracking: a dependency that conflicts with a wheel already chosen is an error.
    """
    environment = target_environment(inputs)
    chosen: dict[str, Version] = {}
    # Which package asked for a dependency (for the error when that dependency has no wheel).
    needed_by: dict[str, str] = {}
    pending = [Requirement(text) for text in inputs.requirements]
    while pending:
        wanted: dict[str, Requirement] = {}
        for requirement in pending:
            name = canonicalize_name(requirement.name)
            if name in chosen:
                if not requirement.specifier.contains(chosen[name], prereleases=True):
                    raise WheelhouseError(f"{requirement} conflicts with the chosen {name}=={chosen[name]}")
                continue
            if name in wanted:
                merged = Requirement(str(wanted[name]))
                merged.specifier &= requirement.specifier
                wanted[name] = merged
            else:
                wanted[name] = requirement
        if not wanted:
            break
        before = set(staging.glob("*.whl"))
        pip_download(
            staging, inputs, [f"{name}{req.specifier}" for name, req in sorted(wanted.items())], needed_by
        )
        pending = []
        for wheel in sorted(set(staging.glob("*.whl")) - before):
            match = WHEEL_NAME.match(wheel.name)
            if match is None:
                raise WheelhouseError(f"{wheel.name}: not a wheel file name")
            name = canonicalize_name(match["name"])
            chosen[name] = Version(match["version"])
            extras = wanted[name].extras if name in wanted else set()
            for text in wheel_requirements(wheel):
                dependency = Requirement(text)
                marker = dependency.marker
                if marker is None or any(
                    marker.evaluate({**environment, "extra": extra}) for extra in (extras or {""})
                ):
                    dependency.marker = None
                    needed_by.setdefault(canonicalize_name(dependency.name), f"{name}=={chosen[name]}")
                    pending.append(dependency)


def build(root: Path, inputs: BuildInputs) -> tuple[bool, Path, int]:
    """Download the wheels unless a finished directory for these inputs exists."""
    platform_dir = root / inputs.platforms[0]
    final = platform_dir / inputs.directory_name()
    if (final / SUMS_NAME).is_file():
        return False, final, verify(final)
    platform_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=platform_dir))
    try:
        download_closure(staging, inputs)
        count = write_index(staging, inputs)
        try:
            staging.rename(final)
        except OSError:
            if not (final / SUMS_NAME).is_file():
                raise
            # Another run (e.g. a parallel play) finished the same inputs first: keep its result.
            return False, final, verify(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
        # A failed first build leaves no trace (not even the empty platform directory).
        with contextlib.suppress(OSError):
            platform_dir.rmdir()
    return True, final, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="download wheels once for a platform")
    build_parser.add_argument("--root", type=Path, required=True)
    build_parser.add_argument(
        "--platform", action="append", required=True, dest="platforms", help="e.g. manylinux_2_28_aarch64"
    )
    build_parser.add_argument("--python-version", required=True, help="e.g. 3.11")
    build_parser.add_argument("--requirement", action="append", required=True, dest="requirements")
    build_parser.add_argument("--pip-arg", action="append", default=[], dest="pip_args")
    verify_parser = commands.add_parser("verify", help="check wheels against SHA256SUMS")
    verify_parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            inputs = BuildInputs(
                platforms=tuple(args.platforms),
                python_version=args.python_version,
                requirements=tuple(args.requirements),
                pip_args=tuple(args.pip_args),
            )
            changed, directory, count = build(args.root, inputs)
        else:
            changed, directory, count = False, args.directory, verify(args.directory)
    except WheelhouseError as error:
        sys.stderr.write(f"error: {error}\n")
        return 1
    summary = {
        "changed": changed,
        "dir": str(directory),
        "wheels": count,
        "sums_sha256": sha256_of(directory / SUMS_NAME),
        "requirements_sha256": sha256_of(directory / REQUIREMENTS_NAME),
        "packages": packages(directory),
    }
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
