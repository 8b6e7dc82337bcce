"""The car's Arduino stand-in: a socat pty pair per host on the controller.

The host side is bound into the container at /dev/ttyUSB0; the controller side is driven by the
firmware simulator (rover_runtime.firmware_sim) when that module is importable.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path

from simfleet.errors import SimFleetError
from simfleet.processes import Proc, is_alive, spawn

log = logging.getLogger(__name__)

FIRMWARE_SIM_MODULE = "rover_runtime.firmware_sim"
REPO_ROOT = Path(__file__).resolve().parents[1]
# The group a real Arduino's tty gets from the rover_serial udev rule, which no udevd applies in a container:
# the host side of the pty is created as root:dialout 0660 instead (Debian's base-passwd fixes dialout at
# gid 20, in the cars' images and on the controller alike), so the runtime's service user can open it.
DIALOUT_GID = 20


def start_pty_pair(controller_link: Path, host_link: Path, log_file: Path) -> tuple[Proc, str]:
    """Starts socat; returns it and the host side's real pty (/dev/pts/N) for the container bind."""
    if shutil.which("socat") is None:
        raise SimFleetError("socat not found: apt-get install socat")
    for link in (controller_link, host_link):
        link.unlink(missing_ok=True)
    cmd = [
        "socat",
        "-d",
        f"PTY,link={controller_link},raw,echo=0",
        f"PTY,link={host_link},raw,echo=0,group={DIALOUT_GID},mode=660",
    ]
    proc = spawn(cmd, log_file, what=f"socat {host_link.name}")
    deadline = time.monotonic() + 10
    while not (controller_link.exists() and host_link.exists()):
        if not is_alive(proc) or time.monotonic() > deadline:
            raise SimFleetError(f"socat did not create {host_link} (see {log_file})")
        time.sleep(0.05)
    return proc, str(host_link.resolve())


def firmware_sim_available() -> bool:
    return importlib.util.find_spec(FIRMWARE_SIM_MODULE) is not None


def start_firmware_sim(
    device: Path, status_file: Path, log_file: Path, rc_file: Path | None = None, timeout_ms: int = 250
) -> Proc | None:
    """Drives the controller side of the pty with the firmware simulator; None if it is not installed.
    `timeout_ms`: its failsafe timeout (the sketch's 250 ms; longer for a car emulated instruction by
    instruction)."""
    if not firmware_sim_available():
        log.warning(
            "%s not importable: serial stand-in runs without the firmware simulator", FIRMWARE_SIM_MODULE
        )
        return None
    cmd = [
        sys.executable,
        "-m",
        FIRMWARE_SIM_MODULE,
        "--device",
        str(device),
        "--status-file",
        str(status_file),
        "--log",
        str(log_file),
        "--timeout-ms",
        str(timeout_ms),
    ]
    if rc_file is not None:  # a receiver fitted: its pulses come from rc_file (simfleet transmitter)
        cmd += ["--rc-receiver", "--rc-file", str(rc_file)]
    return spawn(cmd, log_file.with_suffix(".out"), what=f"firmware sim {device.name}", cwd=REPO_ROOT)
