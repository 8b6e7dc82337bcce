"""Registers qemu-user for aarch64 binaries so an arm64 root builds and boots on an x86 controller."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

from simfleet.errors import SimFleetError

log = logging.getLogger(__name__)

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
# Shipped by Debian's qemu-user-static; its flags include F (the interpreter is opened at registration),
# which chroots and containers need since they do not have the interpreter inside.
QEMU_AARCH64_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")


def ensure_emulation() -> None:
    """Mounts binfmt_misc and registers qemu-aarch64 if that is not done yet (idempotent)."""
    entry = BINFMT_DIR / "qemu-aarch64"
    if entry.exists():
        if "enabled" not in entry.read_text().splitlines()[0]:
            raise SimFleetError(f"{entry} is registered but disabled: echo 1 > {entry}")
        return
    if not QEMU_AARCH64_CONF.is_file():
        raise SimFleetError(f"{QEMU_AARCH64_CONF} missing: apt-get install qemu-user-static")
    if not (BINFMT_DIR / "register").exists():
        result = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise SimFleetError(f"cannot mount binfmt_misc on {BINFMT_DIR}: {result.stderr.strip()}")
    line = QEMU_AARCH64_CONF.read_text().strip()
    flags = line.rsplit(":", 1)[-1]
    if "F" not in flags:
        raise SimFleetError(f"{QEMU_AARCH64_CONF} lacks the F flag ({flags!r}); containers need it")
    (BINFMT_DIR / "register").write_text(line)
    log.info("registered qemu-aarch64 in %s", BINFMT_DIR)
