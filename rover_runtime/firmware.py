"""The car's Arduino firmware: the boards we flash, a release's firmware image, and flashing it on the car.

A release's firmware is a directory: `rover_car.hex` (the sketch built for one board, Intel hex) and
`firmware.json` (`board`, `mcu`, `version`, `protocol`, `sha256` of the hex, `bytes`). The car flashes it with
avrdude through the board's bootloader (the board resets into it when the port is opened), avrdude reads the
flash back and compares, and then the firmware itself must answer the `P` ping with the version and protocol
the image says. Everything that can be checked before the board is touched is checked first: the image's
board, its checksum, its records, that it stays below the boot section, and that no process has the port open
(the runtime must be stopped: a flash never happens while the car drives).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rover_runtime import protocol
from rover_runtime.safe_files import parse_json
from rover_runtime.serial_link import SerialConfig, SerialLink

log = logging.getLogger(__name__)

HEX_NAME = "rover_car.hex"
MANIFEST_NAME = "firmware.json"
MAX_HEX_BYTES = 256 * 1024  # an ATmega328P image is < 100 KB of hex
AVRDUDE_TIMEOUT_S = 120.0
IDENTIFY_TIMEOUT_S = 5.0  # the reset on open, the bootloader's wait (~1.3 s), the sketch's start


@dataclass(frozen=True)
class Board:
    """A board the fleet flashes: its MCU (avrdude's part name) and its bootloader's settings."""

    name: str
    mcu: str  # avrdude -p
    bootloader: str
    upload_baud: int  # avrdude -b: the bootloader's speed
    max_program_bytes: int  # the flash below the boot section


BOARDS: dict[str, Board] = {
    board.name: board
    for board in (
        Board("uno", "m328p", "optiboot", 115200, 32256),
        Board("nano", "m328p", "optiboot", 115200, 32256),  # a Nano with the new (Optiboot) bootloader
        Board("nano_old_bootloader", "m328p", "atmegaboot", 57600, 30720),  # Nanos sold before 2018
    )
}


class FirmwareError(Exception):
    """A firmware image or a board setting that is refused before the board is touched."""


@dataclass(frozen=True)
class FirmwareImage:
    """A checked firmware directory."""

    hex_path: Path
    board: str
    mcu: str
    version: str
    protocol: int
    sha256: str
    program_bytes: int  # one past the highest address the image writes

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "hex_path": str(self.hex_path)}


def board_named(name: str) -> Board:
    try:
        return BOARDS[name]
    except KeyError:
        raise FirmwareError(f"unknown board {name!r}: one of {', '.join(sorted(BOARDS))}") from None


def program_extent(text: str, where: str) -> int:
    """One past the highest flash address an Intel hex file writes; raises FirmwareError naming the first bad
    record (not hex, a wrong length or checksum, an unknown record type, data after the end record)."""
    base = 0
    extent = 0
    ended = False
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if ended:
            raise FirmwareError(f"{where}: line {number}: data after the end-of-file record")
        try:
            if not line.startswith(":"):
                raise ValueError("does not start with ':'")
            record = bytes.fromhex(line[1:])
        except ValueError as exc:
            raise FirmwareError(f"{where}: line {number} is not an Intel hex record ({exc})") from None
        if len(record) < 5 or len(record) != record[0] + 5:
            raise FirmwareError(f"{where}: line {number}: the record's length does not match its byte count")
        if sum(record) & 0xFF:
            raise FirmwareError(f"{where}: line {number}: checksum mismatch (a corrupt image)")
        count, address, kind, data = record[0], int.from_bytes(record[1:3], "big"), record[3], record[4:-1]
        if kind == 0x00:
            extent = max(extent, base + address + count)
        elif kind == 0x01:
            ended = True
        elif kind == 0x02:
            base = int.from_bytes(data, "big") << 4
        elif kind == 0x04:
            base = int.from_bytes(data, "big") << 16
        elif kind not in (0x03, 0x05):  # start addresses: nothing for the flash
            raise FirmwareError(f"{where}: line {number}: unknown record type {kind:#04x}")
    if not ended:
        raise FirmwareError(f"{where}: no end-of-file record (a truncated image)")
    if extent == 0:
        raise FirmwareError(f"{where}: the image writes nothing")
    return extent


def load_image(directory: Path) -> FirmwareImage:
    """Reads and checks a firmware directory; raises FirmwareError naming the problem."""
    manifest_path, hex_path = directory / MANIFEST_NAME, directory / HEX_NAME
    for path in (manifest_path, hex_path):
        if not path.is_file():
            raise FirmwareError(f"{path} does not exist: not a firmware directory")
    manifest = parse_json(manifest_path.read_bytes(), str(manifest_path))
    if not isinstance(manifest, dict):
        raise FirmwareError(f"{manifest_path}: not a JSON object")
    try:
        board, mcu, version = str(manifest["board"]), str(manifest["mcu"]), str(manifest["version"])
        proto, sha256 = int(manifest["protocol"]), str(manifest["sha256"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FirmwareError(f"{manifest_path}: missing or bad field {exc}") from None
    data = hex_path.read_bytes()
    if len(data) > MAX_HEX_BYTES:
        raise FirmwareError(f"{hex_path}: {len(data)} bytes is not an ATmega328P image")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise FirmwareError(
            f"{hex_path}: sha256 {digest[:12]}... is not the {sha256[:12]}... its firmware.json names "
            "(a corrupt or replaced image)"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise FirmwareError(f"{hex_path}: not an Intel hex file (not ASCII)") from None
    extent = program_extent(text, str(hex_path))
    return FirmwareImage(hex_path, board, mcu, version, proto, sha256, extent)


def check_image_for_board(image: FirmwareImage, board: Board) -> None:
    """Refuses an image built for another board or MCU, or one that reaches the board's boot section."""
    if image.mcu != board.mcu:
        raise FirmwareError(
            f"the image is built for the {image.mcu}, the car's board ({board.name}) has an {board.mcu}"
        )
    if image.board != board.name:
        raise FirmwareError(f"the image is built for the board {image.board!r}, the car has {board.name!r}")
    if image.program_bytes > board.max_program_bytes:
        raise FirmwareError(
            f"the image writes up to byte {image.program_bytes}: over the {board.max_program_bytes} bytes "
            f"below the {board.name}'s {board.bootloader} bootloader (it would overwrite the bootloader)"
        )


def check_for_runtime(directory: Path, board_name: str | None = None) -> FirmwareImage:
    """The image in `directory` as a car would flash it with this runtime: a whole image below the boot
    section of `board_name` (default: the board it is built for) that speaks this runtime's protocol."""
    image = load_image(directory)
    check_image_for_board(image, board_named(board_name or image.board))
    if image.protocol != protocol.PROTOCOL_VERSION:
        raise FirmwareError(
            f"firmware {image.version} speaks protocol {image.protocol}, this runtime protocol "
            f"{protocol.PROTOCOL_VERSION}: the car would not drive"
        )
    return image


def port_users(port: Path) -> list[int]:
    """Processes (other than this one) that have `port`'s device open, from /proc."""
    try:
        device = port.resolve(strict=True)
    except OSError:
        return []
    users: list[int] = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if fd.resolve() == device:
                    users.append(int(proc.name))
                    break
            except OSError:
                continue
    return users


def identify(port: str, baud: int = 115200, timeout_s: float = IDENTIFY_TIMEOUT_S) -> protocol.Version | None:
    """Opens the port (which resets the board) and waits for the firmware's version line; None when nothing
    answers (no port, no program, another protocol's garbage)."""
    link = SerialLink(SerialConfig(port=port, baudrate=baud))
    try:
        return link.ping(timeout_s)
    finally:
        link.close()


def describe(version: protocol.Version | None) -> dict[str, Any] | None:
    if version is None:
        return None
    return {
        "name": version.name,
        "version": version.version,
        "protocol": version.protocol,
        "features": list(version.feature_names),
    }


@dataclass
class FlashResult:
    """What `flash` did: the car-side step's result file."""

    ok: bool
    port: str
    board: str
    image_version: str = ""
    image_protocol: int = 0
    image_sha256: str = ""
    before: dict[str, Any] | None = None  # the firmware that answered before (None: nothing answered)
    after: dict[str, Any] | None = None
    flashed: bool = False  # avrdude ran to the end and verified the flash
    attempts: int = 0
    error: str | None = None
    avrdude_log: list[str] = field(default_factory=list)  # the last attempt's diagnostics (tail)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def avrdude_command(avrdude: str, board: Board, port: str, hex_path: Path) -> list[str]:
    # -D: no chip erase (the bootloader erases each page it writes); verification (read back and compare) is
    # avrdude's default. Never -F: a wrong part's signature must stop it before anything is written.
    return [
        avrdude, "-c", "arduino", "-p", board.mcu, "-P", port, "-b", str(board.upload_baud), "-D", "-q", "-q",
        "-U", f"flash:w:{hex_path}:i",
    ]  # fmt: skip


def _run_avrdude(command: list[str]) -> tuple[bool, list[str]]:
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=AVRDUDE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return False, [f"avrdude did not finish within {AVRDUDE_TIMEOUT_S:.0f} s"]
    # A pty (a simulated board) has no modem lines: avrdude says so and carries on; not a failure.
    lines = [
        line for line in (run.stdout + run.stderr).splitlines() if line.strip() and 'ioctl("TIOCM' not in line
    ]
    return run.returncode == 0, lines[-12:]


def flash(
    port: str,
    board_name: str | None,
    firmware_dir: Path,
    *,
    baud: int = 115200,
    attempts: int = 2,
    force: bool = False,
    avrdude: str = "avrdude",
) -> FlashResult:
    """Flashes the firmware in `firmware_dir` onto the board at `port` (`board_name`, default the board the
    image is built for) unless it already runs it (`force`: anyway). Raises FirmwareError for what is
    refused before the board is touched; a flash that fails is retried up to `attempts` times and reported
    in the result (ok False, the error's first line)."""
    started = time.monotonic()
    image = load_image(firmware_dir)
    board = board_named(board_name or image.board)
    check_image_for_board(image, board)
    if not Path(port).exists():
        raise FirmwareError(f"{port} does not exist: no Arduino on this car (is it plugged in?)")
    users = port_users(Path(port))
    if users:
        raise FirmwareError(
            f"{port} is open in process(es) {', '.join(map(str, users))}: stop the runtime first "
            "(never flash a car that drives)"
        )
    result = FlashResult(
        ok=False, port=port, board=board.name, image_version=image.version,
        image_protocol=image.protocol, image_sha256=image.sha256,
    )  # fmt: skip
    result.before = describe(identify(port, baud))
    if not force and _runs(result.before, image):
        result.ok, result.after = True, result.before
        result.seconds = round(time.monotonic() - started, 2)
        log.info("%s already runs %s %s: not flashed", port, HEX_NAME, image.version)
        return result
    if shutil.which(avrdude) is None:  # needed only now: a board that runs the image needs no flash
        raise FirmwareError(
            f"{avrdude} not found: apt-get install avrdude (the board answers {_said(result.before)}, "
            f"the release has {image.version})"
        )
    command = avrdude_command(avrdude, board, port, image.hex_path)
    for attempt in range(1, attempts + 1):
        result.attempts = attempt
        log.info("flashing %s onto the %s at %s (attempt %d)", image.version, board.name, port, attempt)
        flashed, result.avrdude_log = _run_avrdude(command)
        if not flashed:
            result.error = "avrdude failed: " + _avrdude_reason(result.avrdude_log)
            continue
        result.flashed = True
        result.after = describe(identify(port, baud))
        if _runs(result.after, image):
            result.ok, result.error = True, None
            break
        result.error = (
            f"after the flash the firmware answers {_said(result.after)}, not {image.version} (protocol "
            f"{image.protocol})"
        )
    result.seconds = round(time.monotonic() - started, 2)
    return result


def _runs(answer: dict[str, Any] | None, image: FirmwareImage) -> bool:
    return answer is not None and answer["version"] == image.version and answer["protocol"] == image.protocol


def _said(answer: dict[str, Any] | None) -> str:
    if answer is None:
        return "nothing"
    return f"{answer['name']} {answer['version']} (protocol {answer['protocol']})"


def _avrdude_reason(lines: list[str]) -> str:
    """avrdude's first error line (else its last line), and whether the bootloader never answered."""
    errors = [line.strip() for line in lines if "error" in line.lower()]
    reason = errors[0] if errors else (lines[-1].strip() if lines else "no output")
    if any("not in sync" in line for line in lines):
        reason += " (the bootloader never answered: a wrong board setting, or no bootloader)"
    return reason
