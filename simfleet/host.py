"""One simulated car: a writable copy of the image, its identity and sshd, booted with systemd-nspawn."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from simfleet.errors import SimFleetError
from simfleet.host_root import make_root
from simfleet.image import PI_USER
from simfleet.pi_tools import ThermalReading, install_pi_tools, write_cpufreq, write_thermal
from simfleet.processes import Proc, is_alive, spawn
from simfleet.ssh import SshTarget, ssh_run

log = logging.getLogger(__name__)

SERIAL_DEVICE = "/dev/ttyUSB0"
DEFAULT_THERMAL = ThermalReading(temp_c=48.3, throttled="0x0")


def generate_key(path: Path, comment: str) -> str:
    """Creates an ed25519 key pair at `path` (no passphrase); returns the public key line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    result = subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SimFleetError(f"ssh-keygen failed for {path}: {result.stderr.strip()}")
    return path.with_name(path.name + ".pub").read_text().strip()


def _uid_gid(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3])
    raise SimFleetError(f"{root}/etc/passwd has no user {user!r}")


# Under qemu-user, systemd cannot set up unit credentials ("Failed to set up credentials: Invalid
# argument"), so every unit that asks for some fails and the system is "degraded": on bookworm
# systemd-sysusers and systemd-tmpfiles-setup*, on trixie also journald (and with it logind and the
# journal flush), the gettys and systemd-udev-load-credentials. None is given a credential on a car anyway.
CREDENTIAL_SETTINGS = (
    "LoadCredential",
    "LoadCredentialEncrypted",
    "ImportCredential",
    "SetCredential",
    "SetCredentialEncrypted",
)
UNIT_DIR = "usr/lib/systemd/system"
# systemd's mount-propagation directory in the host; see boot().
INCOMING_DIR = "/run/systemd/incoming"


def units_with_credentials(root: Path) -> dict[str, list[str]]:
    """The root's service units (templates included) that ask for credentials, with the settings used."""
    found: dict[str, list[str]] = {}
    for unit in sorted((root / UNIT_DIR).glob("*.service")):
        if unit.is_symlink() or not unit.is_file():
            continue  # aliases (the unit they name gets the drop-in) and masks
        keys = {line.split("=", 1)[0].strip() for line in unit.read_text(errors="replace").splitlines()}
        used = [k for k in CREDENTIAL_SETTINGS if k in keys]
        if used:
            found[unit.name] = used
    return found


def prepare_root(
    image: Path, root: Path, hostname: str, port: int, authorized_key: str, *, emulated: bool = False
) -> str:
    """Makes the host's root (`root`: an overlay on the image, or a copy) and gives it its identity;
    returns the host's public host key."""
    make_root(image, root.parent)
    host_key_pub = write_identity(root, hostname, authorized_key, _uid_gid(root, PI_USER), listen_port=port)
    (root / "etc" / "machine-id").write_text(secrets.token_hex(16) + "\n")
    if emulated:
        # An empty assignment resets the list the unit file set; only settings the unit uses are reset
        # (bookworm's systemd 252 does not know ImportCredential=).
        for unit, settings in units_with_credentials(root).items():
            dropin = root / "etc" / "systemd" / "system" / f"{unit}.d" / "simfleet-qemu-user.conf"
            dropin.parent.mkdir(parents=True, exist_ok=True)
            dropin.write_text("[Service]\n" + "".join(f"{key}=\n" for key in settings))
    return host_key_pub


# /etc/hosts as Debian writes it, for a seed (which has no /etc/hosts to add the hostname to).
DEBIAN_HOSTS = (
    "127.0.0.1\tlocalhost\n"
    "::1\t\tlocalhost ip6-localhost ip6-loopback\n"
    "ff02::1\t\tip6-allnodes\n"
    "ff02::2\t\tip6-allrouters\n"
)


def write_identity(
    root: Path, hostname: str, authorized_key: str, owner: tuple[int, int], *, listen_port: int | None
) -> str:
    """A host's identity under `root` (its root directory, or a VM's seed): hostname, its own ssh host
    key, sshd keys-only (on 127.0.0.1:`listen_port` for a container sharing the controller's network),
    the fleet's key for `pi` (owned by `owner`), no login gate, the Pi tool stand-ins. Returns the host's
    public host key."""
    etc = root / "etc"
    (etc / "ssh" / "sshd_config.d").mkdir(parents=True, exist_ok=True)
    (etc / "hostname").write_text(hostname + "\n")
    hosts = (etc / "hosts").read_text() if (etc / "hosts").exists() else DEBIAN_HOSTS
    (etc / "hosts").write_text(f"127.0.1.1\t{hostname}\n" + hosts)
    host_key_pub = generate_key(etc / "ssh" / "ssh_host_ed25519_key", f"root@{hostname}")
    listen = (
        "# simfleet: hosts share the controller's network; each sshd has its own loopback port.\n"
        f"Port {listen_port}\nListenAddress 127.0.0.1\n"
        if listen_port is not None
        else "# simfleet: a virtual machine; QEMU forwards a port on the controller's 127.0.0.1 to 22.\n"
    )
    (etc / "ssh" / "sshd_config.d" / "simfleet.conf").write_text(
        listen + "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin no\n"
        "UseDNS no\n"
    )
    uid, gid = owner
    home = root / "home" / PI_USER
    ssh_dir = home / ".ssh"
    ssh_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(authorized_key + "\n")
    keys.chmod(0o600)
    for p in (home, ssh_dir, keys):
        os.chown(p, uid, gid)
    # systemd-tmpfiles creates /run/nologin at boot and systemd-user-sessions.service removes it. That unit
    # failed once under heavy load, which locked `pi` out for good (sshd up, logins refused). A simulated car
    # needs no login gate, so the tmpfiles entry is masked.
    nologin = etc / "tmpfiles.d" / "systemd-nologin.conf"
    nologin.parent.mkdir(parents=True, exist_ok=True)
    nologin.unlink(missing_ok=True)
    nologin.symlink_to("/dev/null")
    install_pi_tools(root)
    write_thermal(root, DEFAULT_THERMAL)
    write_cpufreq(root)
    return host_key_pub


def boot(
    root: Path, machine: str, hostname: str, serial_pty: str, log_file: Path, *, emulated: bool = False
) -> Proc:
    """Starts `systemd-nspawn --boot` in the background (the controller does not run systemd, hence
    --register=no --keep-unit); the serial stand-in appears in the host at /dev/ttyUSB0.

    The same command boots bookworm (systemd 252) and trixie (systemd 257) hosts, also on a controller
    with cgroup v1 only (bookworm's nspawn 252 then gives the host cgroup v1 too). systemd >= 256 refuses
    to *mount* a cgroup v1 hierarchy unless SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1 is on the kernel command
    line, but in a container nspawn has mounted /sys/fs/cgroup before it starts the host's systemd, and
    systemd follows an existing hierarchy: trixie boots to "running", only tainted "cgroupsv1". Tried and
    not needed: that option as an init argument (`--boot -- SYSTEMD_CGROUP_ENABLE_LEGACY_FORCE=1`; in a
    container systemd reads its "kernel command line" from its own argv), and
    SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 in nspawn's environment (a cgroup2 hierarchy for the host on a v1
    controller: trixie boots that way too). systemd 258 drops cgroup v1 altogether; neither release has
    it.

    Emulated (qemu-user) hosts also get a tmpfs at /run/systemd/incoming. systemd 257 makes that directory
    a mount-propagation slave in every service with mount namespacing (ProtectSystem=, PrivateTmp=, ...)
    with mount_setattr(), which qemu-user does not implement; its fallback, mount(MS_SLAVE), needs a mount
    point there. Without one systemd-logind (and every such unit) fails with 226/NAMESPACE."""
    if shutil.which("systemd-nspawn") is None:
        raise SimFleetError("systemd-nspawn not found: apt-get install systemd-container")
    cmd = [
        "systemd-nspawn",
        "--register=no",
        "--keep-unit",
        "--boot",
        f"--directory={root}",
        f"--machine={machine}",
        f"--hostname={hostname}",
        "--console=read-only",
        "--link-journal=no",
        f"--bind={serial_pty}:{SERIAL_DEVICE}",
        f"--property=DeviceAllow={serial_pty} rw",
    ]
    if emulated:
        cmd.append(f"--tmpfs={INCOMING_DIR}:mode=0755")
    return spawn(cmd, log_file, what=f"systemd-nspawn {machine}")


def log_tail(log_file: Path, lines: int = 25) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return "(no log)"
    tail = "\n".join(text.splitlines()[-lines:])
    return tail if tail.strip() else "(nothing yet: the car has written no line)"


def wait_for_ssh(
    target: SshTarget,
    nspawn: Proc,
    log_file: Path,
    timeout: float,
    gave_up: Callable[[], str | None] | None = None,
) -> float:
    """Polls until `ssh pi@host true` succeeds; returns seconds waited. A clear error with the boot
    log tail if the container exits or the timeout passes, or when `gave_up` returns why the host will
    not boot (an error whose first line says so, then what the host printed)."""
    started = time.monotonic()
    while True:
        if not is_alive(nspawn):
            raise SimFleetError(
                f"{target.label} exited while booting; {log_file} ends with:\n{log_tail(log_file)}"
            )
        reason = gave_up() if gave_up is not None else None
        if reason is not None:
            raise SimFleetError(f"{target.label} does not boot: {reason}")
        if ssh_run(target, ["true"], timeout=10).returncode == 0:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise SimFleetError(
                f"{target.label}: sshd on 127.0.0.1:{target.port} did not answer within {timeout:.0f} s; "
                f"{log_file} ends with:\n{log_tail(log_file)}"
            )
        time.sleep(0.5)
