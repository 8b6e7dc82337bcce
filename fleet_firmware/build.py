"""Build the sketch (firmware/, avr-gcc through its Makefile) into a firmware directory for one board.

The directory is what a release carries and the car flashes (rover_runtime.firmware): `rover_car.hex` and
`firmware.json` (board, MCU, version, protocol, sha256, bytes). The version and protocol are the sketch's own
(`firmware/rover_car/rover_protocol.h`), or those a test builds in with `defines`.

A build with settings of its own (`defines` other than the version and protocol: a car's pins, receiver,
sensors) answers its version with build metadata naming them, `2.0.0+<8 hex digits>`: a board that runs
the same version built with other settings is told apart by the deploy, which flashes it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rover_runtime.firmware import (
    HEX_NAME,
    MANIFEST_NAME,
    Board,
    board_named,
    check_image_for_board,
    load_image,
)

FIRMWARE_SRC = Path(__file__).resolve().parent.parent / "firmware"
HEADER = FIRMWARE_SRC / "rover_car" / "rover_protocol.h"
VERSION_DEFINES = ("ROVER_FIRMWARE_VERSION", "ROVER_PROTOCOL_VERSION")
# avrdude's part name -> avr-gcc's -mmcu
GCC_MCU = {"m328p": "atmega328p"}


class BuildError(Exception):
    """The sketch could not be built for the board (the compiler's or the Makefile's reason)."""


@dataclass(frozen=True)
class SketchVersion:
    version: str
    protocol: int


def sketch_version(header_text: str, defines: dict[str, str] | None = None) -> SketchVersion:
    """The version and protocol a build answers with: `defines` (ROVER_FIRMWARE_VERSION, a C string, and
    ROVER_PROTOCOL_VERSION) over the header's defaults."""
    found = dict(re.findall(r"^#define (ROVER_\w+_VERSION) (\S+)", header_text, re.MULTILINE))
    found.update(defines or {})
    try:
        version = json.loads(found["ROVER_FIRMWARE_VERSION"])
        return SketchVersion(str(version), int(found["ROVER_PROTOCOL_VERSION"]))
    except (KeyError, ValueError) as exc:
        raise BuildError(f"{HEADER}: no ROVER_FIRMWARE_VERSION / ROVER_PROTOCOL_VERSION ({exc})") from None


def build(board_name: str, out: Path, *, build_dir: Path, defines: dict[str, str] | None = None) -> Path:
    """Builds the sketch for `board_name` into the firmware directory `out` (replaced whole, atomically,
    and left as it is when it already holds this build); `build_dir` keeps the objects between builds.
    Builds sharing `build_dir` take turns (two deploys of one controller at once). Returns `out`."""
    board = board_named(board_name)
    if shutil.which("avr-gcc") is None:
        raise BuildError("avr-gcc not found: apt-get install gcc-avr avr-libc binutils-avr arduino-core-avr")
    version = sketch_version(HEADER.read_text(), defines)
    settings = {name: value for name, value in (defines or {}).items() if name not in VERSION_DEFINES}
    if settings:
        tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
        version = SketchVersion(f"{version.version}+{tag}", version.protocol)
        defines = {**(defines or {}), "ROVER_FIRMWARE_VERSION": json.dumps(version.version)}
    build_dir.mkdir(parents=True, exist_ok=True)
    with (build_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(board, version, out, build_dir, defines)


def _build_locked(
    board: Board, version: SketchVersion, out: Path, build_dir: Path, defines: dict[str, str] | None
) -> Path:
    # Through make to the shell: quoted, so a C string's quotes reach the compiler.
    flags = " ".join(shlex.quote(f"-D{name}={value}") for name, value in sorted((defines or {}).items()))
    # make does not see a change of flags: each set of defines builds in its own directory.
    build_dir = build_dir / ("default" if not flags else hashlib.sha256(flags.encode()).hexdigest()[:12])
    run = subprocess.run(
        ["make", "-C", str(FIRMWARE_SRC), f"BUILD={build_dir}", f"MCU={GCC_MCU[board.mcu]}",
         f"FIRMWARE_DEFINES={flags}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if run.returncode != 0:
        lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line or line.startswith("make: ***")]
        raise BuildError(f"the sketch did not build for the {board.name}: {(errors or lines or ['?'])[0]}")
    hex_bytes = (build_dir / GCC_MCU[board.mcu] / HEX_NAME).read_bytes()
    manifest = {
        "board": board.name,
        "mcu": board.mcu,
        "version": version.version,
        "protocol": version.protocol,
        "sha256": hashlib.sha256(hex_bytes).hexdigest(),
        "bytes": len(hex_bytes),
    }
    manifest_text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    if _holds(out, manifest_text, hex_bytes):
        return out  # a deploy may be reading it: an unchanged build leaves it alone
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (staging / HEX_NAME).write_bytes(hex_bytes)
        (staging / MANIFEST_NAME).write_text(manifest_text)
        check_image_for_board(load_image(staging), board)  # what the car will check, before it ships
        staging.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _holds(out: Path, manifest_text: str, hex_bytes: bytes) -> bool:
    try:
        same_manifest = (out / MANIFEST_NAME).read_text() == manifest_text
        return same_manifest and (out / HEX_NAME).read_bytes() == hex_bytes
    except OSError:
        return False
