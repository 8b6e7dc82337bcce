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


def ensure_emulation(arch: str) -> None:
    """Mounts binfmt_misc and registers qemu-user for `arch` if that is not done yet (idempotent).

    The registration line comes from /usr/lib/binfmt.d/qemu-<name>.conf (Debian's qemu-user-static); its
    flags include F (the interpreter is opened at registration), which chroots and containers need since
    they do not have the interpreter inside."""
    qemu = QEMU_NAMES[arch]
    conf = Path(f"/usr/lib/binfmt.d/qemu-{qemu}.conf")
    entry = BINFMT_DIR / f"qemu-{qemu}"
    if entry.exists():
        if "enabled" not in entry.read_text().splitlines()[0]:
            raise SimFleetError(f"{entry} is registered but disabled: echo 1 > {entry}")
        return
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
    flags = line.rsplit(":", 1)[-1]
    if "F" not in flags:
        raise SimFleetError(f"{conf} lacks the F flag ({flags!r}); containers need it")
    (BINFMT_DIR / "register").write_text(line)
    log.info("registered qemu-%s in %s", qemu, BINFMT_DIR)
