"""Builds (once) and caches the Debian root every simulated host is copied from, per release and arch.

Raspberry Pi OS follows Debian: trixie (13: Python 3.13, systemd 257) is what users flash today,
bookworm (12: Python 3.11, systemd 252) is the previous release, still on many cars. The cache key is the
release, the architecture, the package list and IMAGE_VERSION (bump it when the customization below
changes). A build goes to a temporary directory that is renamed into place only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import platform
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from simfleet.binfmt import ensure_emulation
from simfleet.errors import SimFleetError
from simfleet.paths import images_dir

log = logging.getLogger(__name__)

IMAGE_VERSION = 1
# Debian suites a host can run, newest first; the first is the default.
RELEASES = ("trixie", "bookworm")
DEFAULT_RELEASE = RELEASES[0]
ARCHES = ("amd64", "arm64")
# What a Raspberry Pi OS Lite car has that provisioning relies on, plus python3-apt for ansible.builtin.apt.
# The same names exist in bookworm and trixie.
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "openssh-server",
    "sudo",
    "python3",
    "python3-venv",
    "python3-apt",
    "ca-certificates",
    "iproute2",
    "procps",
    "kmod",
    "less",
    # Raspberry Pi OS Lite has rsync (ansible.posix.synchronize needs it on both ends).
    "rsync",
)
# apt's daily timers would start right after the first boot (they never ran) and hold the dpkg lock
# while Ansible provisions; a real car has run them long before.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_reap.service")
PI_USER = "pi"
PI_GROUPS = ("adm", "dialout", "cdrom", "sudo", "audio", "video", "plugdev", "users", "input", "netdev")


def native_arch() -> str:
    """The controller's own Debian architecture name."""
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def image_key(arch: str, release: str) -> str:
    text = f"{IMAGE_VERSION}|{release}|{arch}|{','.join(PACKAGES)}|{','.join(MASKED_UNITS)}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def image_path(arch: str, release: str) -> Path:
    return images_dir() / f"{release}-{arch}-{image_key(arch, release)}"


def check_release(release: str) -> str:
    if release not in RELEASES:
        raise SimFleetError(f"unsupported --release {release!r}: choose one of {', '.join(RELEASES)}")
    return release


def ensure_image(arch: str, release: str = DEFAULT_RELEASE) -> tuple[Path, float]:
    """Returns the cached root for `release` on `arch` (building it when missing) and the seconds spent
    building."""
    if arch not in ARCHES:
        raise SimFleetError(f"unsupported --arch {arch!r}: choose one of {', '.join(ARCHES)}")
    check_release(release)
    root = image_path(arch, release)
    if (root / "etc" / "os-release").is_file():
        return root, 0.0
    root.parent.mkdir(parents=True, exist_ok=True)
    # Two fleets coming up at once build the image once: the second waits here, then finds it.
    with root.with_name(root.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "etc" / "os-release").is_file():
            return root, 0.0
        return root, _build(arch, release, root)


def _build(arch: str, release: str, root: Path) -> float:
    tmp = root.with_name(root.name + ".building")
    started = time.monotonic()
    log.info("building the %s %s image in %s (once; cached)", release, arch, root)
    build_root(arch, release, tmp, PACKAGES)
    tmp.rename(root)
    seconds = time.monotonic() - started
    log.info("image %s built in %.1f s", root.name, seconds)
    return seconds


def build_root(
    arch: str,
    release: str,
    dest: Path,
    packages: tuple[str, ...],
    files_first: dict[str, str] | None = None,
) -> None:
    """mmdebstrap of `release` for `arch` with `packages` into `dest` (replaced), then what every host
    shares (customize). `files_first` (path in the root -> text; executable when it starts with "#!") are
    written after the essential packages and before `packages`, so their postinst scripts see them (an
    initramfs configuration before the kernel's). On failure `dest` is removed and the error names
    mmdebstrap's last lines."""
    tools = {"mmdebstrap": "mmdebstrap", "chroot": "coreutils"}
    if arch != native_arch():
        ensure_emulation(arch)
        tools["arch-test"] = "arch-test"  # mmdebstrap needs it for a foreign architecture
    for tool, package in tools.items():
        if shutil.which(tool) is None:
            raise SimFleetError(f"{tool} not found: apt-get install {package} (see docs/simulation.md)")
    shutil.rmtree(dest, ignore_errors=True)
    first = dest.with_name(dest.name + ".first")
    shutil.rmtree(first, ignore_errors=True)
    hooks = []
    if files_first:
        for path, text in files_first.items():
            target = first / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            target.chmod(0o755 if text.startswith("#!") else 0o644)
        hooks.append(f'--essential-hook=cp -a {shlex.quote(str(first))}/. "$1"/')
    cmd = [
        "mmdebstrap",
        "--quiet",
        f"--arch={arch}",
        "--variant=apt",
        "--mode=root",
        "--format=directory",
        f"--include={','.join(packages)}",
        *hooks,
        release,
        str(dest),
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    finally:
        shutil.rmtree(first, ignore_errors=True)
    if result.returncode != 0:
        shutil.rmtree(dest, ignore_errors=True)
        lines = (result.stderr or result.stdout).splitlines()
        # apt's own error ("E: Unable to locate package linux-image-amd64") on the first line, then context.
        apt_error = next((line for line in lines if line.startswith("E: ")), None)
        head = f"mmdebstrap failed for {release} {arch} (exit {result.returncode})"
        head += f": {apt_error}" if apt_error else ""
        raise SimFleetError(head + "\n" + "\n".join(lines[-20:]))
    try:
        customize(dest)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def chroot(root: Path, *args: str) -> None:
    result = subprocess.run(["chroot", str(root), *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SimFleetError(f"chroot {root} {' '.join(args)} failed: {result.stderr.strip()}")


def customize(root: Path) -> None:
    """What every host shares: the `pi` user with passwordless sudo (as on Raspberry Pi OS), no host keys
    (each host gets its own), an empty machine-id, masked timers. (The Pi tool stand-ins are written per
    host, so changing them needs no image rebuild.)"""
    groups = [g for g in PI_GROUPS if _has_group(root, g)]
    chroot(root, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", ",".join(groups), PI_USER)
    sudoers = root / "etc" / "sudoers.d" / "010_pi-nopasswd"
    sudoers.write_text(f"{PI_USER} ALL=(ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc" / "machine-id").write_text("")
    for unit in MASKED_UNITS:
        link = root / "etc" / "systemd" / "system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")


def _has_group(root: Path, group: str) -> bool:
    lines = (root / "etc" / "group").read_text().splitlines()
    return any(line.split(":", 1)[0] == group for line in lines)
