"""Registers qemu-user (binfmt_misc) so a foreign-architecture root (arm64 on x86) builds and boots."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from simfleet.errors import SimFleetError

log = logging.getLogger(__name__)

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# Debian architecture -> qemu's name for it.
QEMU_NAMES = {"arm64": "aarch64", "amd64": "x86_64"}


def _flags(entry: Path) -> str:
    for line in entry.read_text().splitlines():
        if line.startswith("flags:"):
            return line.split(":", 1)[1].strip()
    return ""


def ensure_emulation(arch: str) -> None:
    """Mounts binfmt_misc and registers qemu-user for `arch` with flags F and C (idempotent).

    The registration line comes from /usr/lib/binfmt.d/qemu-<name>.conf (Debian's qemu-user-static).
    F (the interpreter is opened at registration) lets chroots and containers use it without having it
    inside; C (credentials from the binary) makes setuid programs work, so `sudo` works in an emulated
    host as it does on a car. An existing registration without C is replaced."""
    qemu = QEMU_NAMES[arch]
    conf = Path(f"/usr/lib/binfmt.d/qemu-{qemu}.conf")
    entry = BINFMT_DIR / f"qemu-{qemu}"
    if entry.exists():
        lines = entry.read_text().splitlines()
        if lines[0] != "enabled":
            raise SimFleetError(f"{entry} is registered but disabled: echo 1 > {entry}")
        if {"F", "C"} <= set(_flags(entry)):
            return
        log.info("re-registering qemu-%s with flags F and C (had %r)", qemu, _flags(entry))
        entry.write_text("-1")
    if not conf.is_file():
        raise SimFleetError(f"{conf} missing: apt-get install qemu-user-static")
    if not (BINFMT_DIR / "register").exists():
        result = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise SimFleetError(f"cannot mount binfmt_misc on {BINFMT_DIR}: {result.stderr.strip()}")
    line = conf.read_text().strip()
    head, flags = line.rsplit(":", 1)
    if "F" not in flags:
        raise SimFleetError(f"{conf} lacks the F flag ({flags!r}); containers need it")
    if "C" not in flags:
        flags += "C"
    (BINFMT_DIR / "register").write_text(f"{head}:{flags}")
    log.info("registered qemu-%s in %s (flags %s)", qemu, BINFMT_DIR, flags)
