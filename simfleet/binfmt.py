"""Registers qemu-user (binfmt_misc) so a foreign-architecture root (arm64 on x86) builds and boots."""

from __future__ import annotations

import logging
import re
import subprocess
import tempfile
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


def _parse_version(text: str) -> tuple[int, ...] | None:
    match = re.search(r"version (\d+)\.(\d+)", text)
    return (int(match[1]), int(match[2])) if match else None


def registered_qemu_version(arch: str) -> tuple[int, ...] | None:
    """(major, minor) of the qemu-user that binfmt_misc runs for `arch`, None if unknown.

    With flag F the kernel keeps the interpreter it opened at registration, which is not necessarily the
    installed file (after a package upgrade). So this execs a stub that only has the architecture's ELF
    magic, with QEMU_VERSION set: qemu-user prints its version and exits before it loads the program."""
    entry = BINFMT_DIR / f"qemu-{QEMU_NAMES[arch]}"
    try:
        lines = entry.read_text().splitlines()
    except OSError:
        return None
    magic = next((line.split()[1] for line in lines if line.startswith("magic ")), "")
    with tempfile.TemporaryDirectory(prefix="simfleet-qemu-") as tmp:
        stub = Path(tmp) / "probe"
        stub.write_bytes(bytes.fromhex(magic).ljust(64, b"\0"))
        stub.chmod(0o755)
        try:
            result = subprocess.run(
                [str(stub)],
                env={"QEMU_VERSION": "1"},
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except OSError:
            return None
    return _parse_version(result.stdout)


def installed_qemu_version(arch: str) -> tuple[int, ...] | None:
    """(major, minor) of the interpreter /usr/lib/binfmt.d/qemu-<name>.conf names, None if unknown."""
    conf = Path(f"/usr/lib/binfmt.d/qemu-{QEMU_NAMES[arch]}.conf")
    try:
        interpreter = Path(conf.read_text().strip().split(":")[-2]).resolve()
        result = subprocess.run(
            [str(interpreter), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, IndexError):
        return None
    return _parse_version(result.stdout)


def _stale(arch: str) -> bool:
    """Whether the registered qemu-user is older than the installed one (registered before an upgrade)."""
    registered, installed = registered_qemu_version(arch), installed_qemu_version(arch)
    if registered is not None and installed is not None and registered < installed:
        log.info("binfmt_misc runs qemu-user %s, %s is installed", _dotted(registered), _dotted(installed))
        return True
    return False


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def require_qemu(arch: str, minimum: tuple[int, int], what: str) -> None:
    """Refuses `what` unless binfmt_misc runs qemu-user `minimum` or later for `arch`."""
    version = registered_qemu_version(arch)
    if version is None:
        log.warning("cannot tell which qemu-user runs %s binaries; %s needs %s", arch, what, _dotted(minimum))
    elif version < minimum:
        raise SimFleetError(
            f"{what} needs qemu-user {_dotted(minimum)} or later, this machine runs {_dotted(version)}: "
            "apt-get install -t bookworm-backports qemu-user-static (see docs/simulation.md)"
        )


def ensure_emulation(arch: str) -> None:
    """Mounts binfmt_misc and registers qemu-user for `arch` with flags F and C (idempotent).

    The registration line comes from /usr/lib/binfmt.d/qemu-<name>.conf (Debian's qemu-user-static).
    F (the interpreter is opened at registration) lets chroots and containers use it without having it
    inside; C (credentials from the binary) makes setuid programs work, so `sudo` works in an emulated
    host as it does on a car. An existing registration without C, or of an older qemu-user than the
    installed one, is replaced."""
    qemu = QEMU_NAMES[arch]
    conf = Path(f"/usr/lib/binfmt.d/qemu-{qemu}.conf")
    entry = BINFMT_DIR / f"qemu-{qemu}"
    if entry.exists():
        lines = entry.read_text().splitlines()
        if lines[0] != "enabled":
            raise SimFleetError(f"{entry} is registered but disabled: echo 1 > {entry}")
        if {"F", "C"} <= set(_flags(entry)) and not _stale(arch):
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
