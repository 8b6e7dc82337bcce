"""One virtual-machine car (`simfleet up --kind vm`): QEMU booting Debian's kernel from a copy-on-write
overlay of the cached image (vm_image), with the car's devices as a kernel sees them.

- The Arduino: QEMU's `usb-serial` device, an FTDI FT232 (0403:6001) with a serial number, on an xHCI
  controller. Its character device is the host side of the car's socat pty pair, whose other side the
  firmware simulator drives on the controller, as for a container car. In the guest `ftdi_sio` makes
  /dev/ttyUSB0 and udev runs the rover_serial rule. `unplug`/`plug` delete and re-add the USB device
  through QEMU's monitor (QMP), as a pulled and replugged cable.
- The camera: vivid's /dev/video0 (vm_image); `unplug`/`plug` unbind and rebind its driver in the guest.
- ssh: QEMU's user-mode network forwards 127.0.0.1:<port> on the controller to the guest's port 22.
- The console (ttyS0) is appended to console.log; QMP listens on qmp.sock in the car's directory.
- A power cut is SIGKILL to QEMU (nothing the guest had not written reaches the disk); a clean poweroff
  is ACPI's power button (QMP system_powerdown); a reboot inside the guest resets the machine, which
  boots again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simfleet.errors import SimFleetError
from simfleet.paths import images_dir
from simfleet.ports import GUEST_METRICS_PORT, metrics_port
from simfleet.processes import Proc, is_alive, kill_now, spawn
from simfleet.vm_image import SEED_LABEL, VmImage

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# Nothing used here is newer than Debian bookworm's QEMU; tested with 10.0 (bookworm-backports).
QEMU_MINIMUM = (7, 2)
# A car's memory on the controller is the guest's RAM it has touched (its page cache fills it soon), TCG's
# translated-code cache, the kernel and initramfs QEMU keeps mapped for reboots (vm_image keeps the
# initramfs small) and QEMU itself (about 90 MB): 512 + 64 MB keeps a running car under 700 MB. A
# provisioned car driving uses under 200 MB of its RAM, the rest is page cache; QEMU's default code cache
# (1 GiB) alone would be more than a car is allowed.
MEMORY_MB = 512
CPUS = 2
TB_SIZE_MB = 64
ARDUINO_ID = "arduino"
ARDUINO_CHARDEV = "arduino-link"
XHCI_ID = "xhci"
ACCELERATORS = ("kvm", "tcg")
KVM_PROBE_SECONDS = 20.0
# The kernel's first line on the console, once per boot of the machine.
KERNEL_START = re.compile(r"^\[\s*0\.0+\] Linux version ", re.MULTILINE)
_PRINTK_TIME = re.compile(r"^\[\s*[0-9.]+\]\s*")
# With panic=-1 a kernel that cannot mount its root (or an initramfs that gives up) reboots at once, so a
# guest that cannot boot loops: its kernel starting this often before sshd answers means it never will.
BOOT_ATTEMPTS = 3


@dataclass(frozen=True)
class VmSpec:
    """Everything one boot of a car's QEMU needs."""

    machine: str
    hostname: str
    image: VmImage
    disk: Path  # the car's qcow2 overlay of image.disk
    seed: Path  # its seed disk (write_seed)
    port: int  # 127.0.0.1:port -> guest:22
    serial_pty: str  # the host side of the car's pty pair (the Arduino's wire)
    usb_serial: str  # the FTDI adapter's serial number
    qmp: Path
    console_log: Path
    accelerator: str
    machine_id: str


def qemu_version() -> tuple[int, int]:
    """The installed qemu-system-x86_64's (major, minor); a clear error when it is missing or too old."""
    if shutil.which(QEMU) is None:
        raise SimFleetError(
            f"{QEMU} not found: apt-get install qemu-system-x86 qemu-utils (VM cars need QEMU "
            f">= {QEMU_MINIMUM[0]}.{QEMU_MINIMUM[1]})"
        )
    result = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"version (\d+)\.(\d+)", result.stdout)
    if result.returncode != 0 or match is None:
        raise SimFleetError(f"{QEMU} --version failed: {(result.stderr or result.stdout).strip()[:200]}")
    version = (int(match.group(1)), int(match.group(2)))
    if version < QEMU_MINIMUM:
        raise SimFleetError(
            f"{QEMU} {version[0]}.{version[1]} is too old for VM cars: need >= "
            f"{QEMU_MINIMUM[0]}.{QEMU_MINIMUM[1]} (Debian bookworm-backports has 10.0)"
        )
    if shutil.which("qemu-img") is None:
        raise SimFleetError("qemu-img not found: apt-get install qemu-utils")
    return version


def arduino_device(spec_serial: str) -> dict[str, str]:
    """The QMP device_add arguments of the car's Arduino (the same as on the command line)."""
    return {
        "driver": "usb-serial",
        "bus": f"{XHCI_ID}.0",
        "chardev": ARDUINO_CHARDEV,
        "id": ARDUINO_ID,
        "serial": spec_serial,
    }


def qemu_command(spec: VmSpec) -> list[str]:
    if spec.accelerator == "kvm":
        accel, cpu = ["-accel", "kvm"], "host"
    else:
        # -cpu max: the guest sees the instructions (AVX2, ...) the car's wheels were built for.
        accel, cpu = ["-accel", f"tcg,thread=multi,tb-size={TB_SIZE_MB}"], "max"
    kernel_args = " ".join(
        [
            "root=LABEL=rover-root",
            "ro",
            "console=ttyS0",
            "panic=-1",
            f"systemd.hostname={spec.hostname}",
            f"systemd.machine_id={spec.machine_id}",
        ]
    )
    arduino = ",".join(f"{k}={v}" for k, v in arduino_device(spec.usb_serial).items() if k != "driver")
    return [
        QEMU,
        "-name",
        f"{spec.machine},process=qemu-{spec.machine}",
        "-machine",
        "q35",
        *accel,
        "-cpu",
        cpu,
        "-smp",
        str(CPUS),
        "-m",
        str(MEMORY_MB),
        "-kernel",
        str(spec.image.kernel),
        "-initrd",
        str(spec.image.initrd),
        "-append",
        kernel_args,
        "-drive",
        f"file={spec.disk},if=virtio,format=qcow2,cache=writeback,discard=unmap",
        "-drive",
        f"file={spec.seed},if=virtio,format=raw,readonly=on",
        "-netdev",
        f"user,id=net0,hostfwd=tcp:127.0.0.1:{spec.port}-:22"
        f",hostfwd=tcp:127.0.0.1:{metrics_port(spec.port)}-:{GUEST_METRICS_PORT}",
        "-device",
        "virtio-net-pci,netdev=net0",
        "-device",
        f"qemu-xhci,id={XHCI_ID}",
        "-chardev",
        f"serial,id={ARDUINO_CHARDEV},path={spec.serial_pty}",
        "-device",
        f"usb-serial,{arduino}",
        "-chardev",
        f"file,id=console,path={spec.console_log},append=on",
        "-serial",
        "chardev:console",
        "-qmp",
        f"unix:{spec.qmp.name},server=on,wait=off",  # relative: QEMU runs in the socket's directory (start)
        "-display",
        "none",
        "-monitor",
        "none",
        "-nodefaults",
        "-vga",
        "none",
    ]


def create_overlay(image: VmImage, disk: Path) -> None:
    """The car's disk: a qcow2 overlay whose backing file is the image (read, never written)."""
    disk.unlink(missing_ok=True)
    result = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw", str(disk)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SimFleetError(f"qemu-img create {disk} failed: {(result.stderr or result.stdout).strip()}")


def write_seed(seed_dir: Path, seed: Path) -> None:
    """The seed disk from `seed_dir` (its `root/` is copied over the guest's / at the first boot)."""
    seed.unlink(missing_ok=True)
    result = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", SEED_LABEL, "-d", str(seed_dir), str(seed), "16M"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SimFleetError(f"mkfs.ext4 for the seed disk {seed} failed: {result.stderr.strip()}")


def start(spec: VmSpec, log_file: Path) -> Proc:
    spec.qmp.unlink(missing_ok=True)
    # In the car's directory: the QMP socket's path is relative to it (a socket's path has a 107-byte limit).
    return spawn(qemu_command(spec), log_file, what=f"qemu {spec.machine}", cwd=spec.qmp.parent)


def kernel_starts(console_log: Path) -> int:
    """How many times the guest's kernel has started, by its console log (appended across boots)."""
    try:
        return len(KERNEL_START.findall(console_log.read_text(errors="replace")))
    except OSError:
        return 0


def reboot_loop(console_log: Path, starts_before: int) -> str | None:
    """Why the guest will not boot when it is in a reboot loop (its kernel started BOOT_ATTEMPTS times
    since `starts_before`), with how its last complete attempt ended; None while it may still boot."""
    try:
        text = console_log.read_text(errors="replace")
    except OSError:
        return None
    starts = [m.start() for m in KERNEL_START.finditer(text)]
    if len(starts) - starts_before < BOOT_ATTEMPTS:
        return None
    attempt = text[starts[-2] : starts[-1]].splitlines()
    # The kernel's panic, or the initramfs giving up on the root ("ALERT!  LABEL=... does not exist").
    panic = next(
        (_PRINTK_TIME.sub("", line) for line in attempt if "Kernel panic" in line or "ALERT!" in line), None
    )
    tail = "\n".join(attempt[-15:])
    return (
        f"its kernel started {len(starts) - starts_before} times without sshd answering (a reboot loop)"
        + (f": {panic}" if panic else "")
        + f"\nits last attempt ended with ({console_log}):\n{tail}"
    )


def machine_id(machine: str) -> str:
    """A stable machine-id per car (32 hex digits), the same at every boot of it."""
    return hashlib.sha256(f"simfleet|{machine}".encode()).hexdigest()[:32]


class Qmp:
    """A QEMU Machine Protocol session: one JSON command, one JSON answer; events are skipped."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        # A socket's path is limited to 107 bytes and a car's directory under $ROVER_CACHE may be longer:
        # reach it through a descriptor of its directory (QEMU made it relative to that directory).
        directory = -1
        try:
            directory = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
            self._sock.connect(f"/proc/self/fd/{directory}/{path.name}")
        except OSError as err:
            self._sock.close()
            raise SimFleetError(f"QEMU monitor {path} does not answer ({err}): is the car running?") from err
        finally:
            if directory >= 0:
                os.close(directory)
        self._file = self._sock.makefile("rw", encoding="utf-8")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise SimFleetError("QEMU closed its monitor")
            message: dict[str, Any] = json.loads(line)
            if "event" not in message:
                return message

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request) + "\n")
        self._file.flush()
        answer = self._read()
        if "error" in answer:
            raise SimFleetError(f"QEMU refused {command}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def usb_devices(qmp_path: Path) -> list[str]:
    """The ids of the devices on the car's USB bus (QMP qom-list of the xHCI bus)."""
    with Qmp(qmp_path) as qmp:
        children = qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return [c["name"] for c in children if c.get("type", "").startswith("child<usb-")]


def unplug_arduino(qmp_path: Path) -> None:
    with Qmp(qmp_path) as qmp:
        qmp.execute("device_del", {"id": ARDUINO_ID})
    _wait_usb(qmp_path, present=False)


def plug_arduino(qmp_path: Path, usb_serial: str) -> None:
    with Qmp(qmp_path) as qmp:
        qmp.execute("device_add", arduino_device(usb_serial))
    _wait_usb(qmp_path, present=True)


def _wait_usb(qmp_path: Path, *, present: bool, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (ARDUINO_ID in usb_devices(qmp_path)) != present:
        if time.monotonic() > deadline:
            state = "appear" if present else "go away"
            raise SimFleetError(f"the Arduino's USB device did not {state} within {timeout:.0f} s")
        time.sleep(0.1)


def power_button(qmp_path: Path) -> None:
    """ACPI's power button: the guest shuts down cleanly and QEMU exits."""
    with Qmp(qmp_path) as qmp:
        qmp.execute("system_powerdown")


def accelerator(image: VmImage) -> tuple[str, str]:
    """The accelerator for the image's kernel and why: kvm when a probe boot under KVM reaches the
    kernel proper, else tcg. Cached per QEMU, kernel and CPU (a hanging KVM costs its timeout once)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    cpu = _cpu_model()
    key_text = f"{qemu_version()}|{image.path.name}|{os.uname().release}|{cpu}"
    cache = images_dir() / f"kvm-probe-{hashlib.sha256(key_text.encode()).hexdigest()[:12]}.json"
    try:
        cached = json.loads(cache.read_text())
        return str(cached["accelerator"]), str(cached["reason"])
    except (OSError, ValueError, KeyError):
        pass
    result = _probe_kvm(image)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps({"accelerator": result[0], "reason": result[1], "cpu": cpu}) + "\n")
    tmp.replace(cache)
    return result


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _probe_kvm(image: VmImage) -> tuple[str, str]:
    """Boots the kernel alone (no root: it panics at once and QEMU exits); under a KVM that does not work
    here the kernel hangs right after decompression."""
    probe_dir = images_dir() / "kvm-probe"
    shutil.rmtree(probe_dir, ignore_errors=True)
    probe_dir.mkdir(parents=True)
    console = probe_dir / "console.log"
    cmd = [
        QEMU,
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-kernel",
        str(image.kernel),
        "-append",
        "console=ttyS0 panic=-1",
        "-no-reboot",
        "-nodefaults",
        "-display",
        "none",
        "-serial",
        f"file:{console}",
    ]
    proc = spawn(cmd, probe_dir / "qemu.log", what="qemu kvm probe")
    started = time.monotonic()
    try:
        while time.monotonic() - started < KVM_PROBE_SECONDS:
            if not is_alive(proc) and not console.exists():
                why = (probe_dir / "qemu.log").read_text(errors="replace").strip().splitlines()[-1:]
                return "tcg", f"QEMU could not start under KVM ({' '.join(why) or 'no message'})"
            text = console.read_text(errors="replace") if console.exists() else ""
            if "Kernel panic" in text or "VFS:" in text:
                return (
                    "kvm",
                    f"a probe boot under KVM reached the kernel in {time.monotonic() - started:.1f} s",
                )
            time.sleep(0.2)
        return "tcg", f"a probe boot under KVM printed nothing from the kernel in {KVM_PROBE_SECONDS:.0f} s"
    finally:
        kill_now([proc])
        shutil.rmtree(probe_dir, ignore_errors=True)
