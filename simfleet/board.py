"""A simulated Arduino board with its bootloader (firmware/test/simavr_board.c on simavr): what avrdude
flashes and the runtime drives, on a pty, as a car's Uno or Nano.

The board keeps its flash in a file (a board keeps its program across power cycles and replugs), so a
program flashed through the bootloader is the one that answers afterwards. Bootloaders: Optiboot (Uno, new
Nano; built from Debian's arduino-core-avr source by `make -C firmware board`: Debian's own hex does not fit
the flash) and the old Nano's ATmegaBOOT (Debian's hex as shipped).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from simfleet.errors import SimFleetError
from simfleet.processes import Proc, is_alive, spawn
from simfleet.serial_link import DIALOUT_GID

FIRMWARE_SRC = Path(__file__).resolve().parent.parent / "firmware"
ARDUINO_BOOTLOADERS = Path("/usr/share/arduino/hardware/arduino/avr/bootloaders")
START_TIMEOUT_S = 10.0


# What a simulated car's sketch is built with: no RC receiver is wired to the board's pins (a bench setup:
# the Pi's commands drive). The fleet's inventory gives the deploy the same (rover_firmware_defines), so the
# sketch on a new board is the one a deploy builds.
CAR_DEFINES = {"RC_RECEIVER": "0"}


@dataclass(frozen=True)
class Bootloader:
    name: str
    boot_address: int  # the boot section's start (BOOTRST): the reset vector


BOOTLOADERS = {
    "optiboot": Bootloader("optiboot", 0x7E00),  # 256 words
    "atmegaboot": Bootloader("atmegaboot", 0x7800),  # 1024 words
}


def build_board(build_dir: Path) -> None:
    """Builds the board simulator and Optiboot into `build_dir` (make does nothing when they are current)."""
    if not Path("/usr/include/simavr/sim_avr.h").exists():
        raise SimFleetError("the simavr headers are missing: apt-get install libsimavr-dev")
    run = subprocess.run(
        ["make", "-C", str(FIRMWARE_SRC), f"BUILD={build_dir}", "board"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if run.returncode != 0:
        raise SimFleetError(f"make -C firmware board failed: {(run.stderr or run.stdout).strip()[-600:]}")


def bootloader_hex(name: str, build_dir: Path) -> Path:
    if name == "optiboot":
        return build_dir / "optiboot" / "optiboot_atmega328.hex"
    if name == "atmegaboot":
        return ARDUINO_BOOTLOADERS / "atmega" / "ATmegaBOOT_168_atmega328.hex"
    raise SimFleetError(f"unknown bootloader {name!r}: one of {', '.join(BOOTLOADERS)}")


def board_command(
    build_dir: Path, flash: Path, link: Path, bootloader: str, program: Path | None = None
) -> list[str]:
    """simavr_board's command line; a new board (no `flash` file yet) gets `bootloader` and, when given,
    `program` (an Intel hex: the sketch flashed before the board was fitted)."""
    if bootloader not in BOOTLOADERS:
        raise SimFleetError(f"unknown bootloader {bootloader!r}: one of {', '.join(BOOTLOADERS)}")
    command = [str(build_dir / "simavr_board"), "--flash", str(flash), "--link", str(link)]
    if not flash.exists():
        command += [
            "--bootloader", str(bootloader_hex(bootloader, build_dir)),
            "--boot-address", hex(BOOTLOADERS[bootloader].boot_address),
        ]  # fmt: skip
        if program is not None:
            command += ["--program", str(program)]
    return command


def start_board_process(
    build_dir: Path, flash: Path, link: Path, log_file: Path, *, bootloader: str, program: Path | None
) -> tuple[Proc, str]:
    """A simulated board in the background (the fleet's processes), its port's pty made root:dialout 0660
    as the car's udev rule would make a real Arduino's tty; returns it and the pty (/dev/pts/N)."""
    link.unlink(missing_ok=True)
    proc = spawn(board_command(build_dir, flash, link, bootloader, program), log_file, what=f"board {link}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not link.exists():
        if not is_alive(proc) or time.monotonic() > deadline:
            tail = log_file.read_text(errors="replace").strip()[-400:] if log_file.exists() else ""
            raise SimFleetError(f"the simulated board did not start: {tail or f'see {log_file}'}")
        time.sleep(0.05)
    pty = link.resolve()
    os.chown(pty, -1, DIALOUT_GID)
    pty.chmod(0o660)
    return proc, str(pty)


class SimBoard:
    """A running board: `with SimBoard(build_dir, flash, link) as board:` (a new board with `bootloader` when
    `flash` does not exist). `board.port` is the serial device's symlink; stopping saves the flash."""

    def __init__(self, build_dir: Path, flash: Path, link: Path, bootloader: str = "optiboot") -> None:
        if bootloader not in BOOTLOADERS:
            raise SimFleetError(f"unknown bootloader {bootloader!r}: one of {', '.join(BOOTLOADERS)}")
        self.build_dir, self.flash, self.port = build_dir, flash, link
        self.bootloader = BOOTLOADERS[bootloader]
        self.log = flash.with_name(flash.name + ".log")
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        command = board_command(self.build_dir, self.flash, self.port, self.bootloader.name)
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), True)
        line = self.proc.stdout.readline()  # "ready /dev/pts/N", or nothing when it exits
        if not line.startswith("ready "):
            self.proc.wait(timeout=START_TIMEOUT_S)
            raise SimFleetError(f"the simulated board did not start: {self.log.read_text().strip()[-400:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def resets(self) -> int:
        """How often the port was opened (each open resets the MCU) since the log began."""
        return self.log.read_text().count("port opened: reset") if self.log.exists() else 0

    def __enter__(self) -> SimBoard:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
