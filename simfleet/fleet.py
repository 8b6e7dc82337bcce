"""up / down / status / set-thermal for a named fleet of simulated cars."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet_firmware.build import BuildError, build
from rover_runtime.firmware import HEX_NAME
from simfleet.binfmt import ensure_emulation, require_qemu
from simfleet.board import CAR_DEFINES, build_board, start_board_process
from simfleet.errors import SimFleetError
from simfleet.host import boot, generate_key, log_tail, prepare_root, wait_for_ssh, write_identity
from simfleet.host_root import remove_tree
from simfleet.image import DEFAULT_RELEASE, RELEASES, ensure_image, native_arch
from simfleet.inventory import remove_inventory, write_inventory
from simfleet.paths import fleet_dir, rover_cache
from simfleet.pi_tools import ThermalReading, thermal_files, write_thermal
from simfleet.ports import METRICS_PORT_OFFSET, highest_base_port, metrics_port
from simfleet.processes import Proc, child_processes, is_alive, kill_now, send_sigterm, stop_all
from simfleet.serial_link import start_firmware_sim, start_pty_pair
from simfleet.ssh import SshTarget, ssh_run
from simfleet.state import FleetState, HostState, load_state, save_state, state_path
from simfleet.vm import (
    VmSpec,
    accelerator,
    create_overlay,
    kernel_starts,
    machine_id,
    plug_arduino,
    power_button,
    qemu_version,
    reboot_loop,
    unplug_arduino,
    write_seed,
)
from simfleet.vm import start as start_vm
from simfleet.vm_image import PI_UID, VmImage, ensure_vm_image

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
# A classroom or an event of cars (benchmarks/fleet_scale.py runs 50). Measured at 2-10 cars: 14-21 MB per
# idle car, 84-87 MB with its runtime at 5 Hz (docs/scale.md).
MAX_HOSTS = 64
# Seconds until sshd must answer: emulated arm64 boots slower.
BOOT_TIMEOUT = {"amd64": 90.0, "arm64": 300.0}
POWEROFF_GRACE = {"amd64": 30.0, "arm64": 90.0}
KINDS = ("nspawn", "vm")
# Each car's Arduino: "sim", the firmware simulator in Python (fast; an RC receiver with --transmitter), or
# "board", the compiled sketch on a simulated ATmega328P behind Optiboot (simfleet.board), which avrdude on
# the car flashes for real.
ARDUINOS = ("sim", "board")
# A VM car under TCG emulation (measured: sshd after 30-40 s on 2 shared cores; more while others boot).
VM_BOOT_TIMEOUT = 240.0
VM_POWEROFF_GRACE = 90.0
# The firmware simulator's failsafe timeout for a VM car under TCG: an emulated car's commands can be late
# by more than the sketch's 250 ms when the controller is busy (its runtime's acknowledgement limit is
# raised to match in group_vars/simulated_vm.yml). KVM cars and containers get the sketch's own.
TCG_FIRMWARE_TIMEOUT_MS = 1000
FIRMWARE_TIMEOUT_MS = 250  # the sketch's
DEVICES = ("arduino", "camera")
NSPAWN_PROPAGATE = Path("/run/systemd/nspawn/propagate")
# Emulated hosts: systemd 257 (trixie) starts every unit through clone(CLONE_PIDFD), which qemu-user
# rejects before 8.0 ("Failed to spawn executor: Invalid argument": nothing starts, not even sshd).
# Debian bookworm has qemu 7.2, bookworm-backports 10.0.
QEMU_MINIMUM = {"trixie": (8, 0)}


@dataclass(frozen=True)
class FleetConfig:
    name: str = "sim"
    hosts: int = 2
    arch: str = "amd64"
    base_port: int = 2221
    inventory: Path = Path("inventory/sim/hosts.yml")
    # Debian suites, assigned to car1, car2, ... in turn: ("trixie", "bookworm") mixes them.
    releases: tuple[str, ...] = (DEFAULT_RELEASE,)
    # Each car's firmware simulator has an RC receiver, its transmitter in autopilot until `transmitter`.
    transmitter: bool = False
    # "nspawn" (containers, the default: fast) or "vm" (QEMU virtual machines with their own kernel).
    kind: str = "nspawn"
    arduino: str = "sim"  # one of ARDUINOS

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SimFleetError(f"--kind {self.kind!r}: choose {' or '.join(KINDS)}")
        if self.arduino not in ARDUINOS:
            raise SimFleetError(f"--arduino {self.arduino!r}: choose {' or '.join(ARDUINOS)}")
        if self.arduino == "board" and self.kind != "nspawn":
            raise SimFleetError(
                "--arduino board runs on container cars only: a VM's USB serial (QEMU's usb-serial on a "
                "pty) carries no DTR, so nothing would reset the board into its bootloader for avrdude"
            )
        if self.arduino == "board" and self.transmitter:
            raise SimFleetError(
                "--arduino board has no RC receiver wired to its pins: --transmitter needs --arduino sim"
            )
        if self.kind == "vm" and (self.arch != "amd64" or native_arch() != "amd64"):
            raise SimFleetError(
                f"--kind vm runs amd64 cars on an amd64 controller (this is {native_arch()}, --arch "
                f"{self.arch}): an emulated arm64 machine is far too slow to provision"
            )
        if not _NAME.match(self.name):
            raise SimFleetError(f"--name {self.name!r}: use lowercase letters, digits and '-' (max 31)")
        if not 1 <= self.hosts <= MAX_HOSTS:
            raise SimFleetError(f"--hosts {self.hosts}: must be 1..{MAX_HOSTS}")
        if self.arch not in BOOT_TIMEOUT:
            raise SimFleetError(f"--arch {self.arch!r}: choose amd64 or arm64")
        if not 1024 <= self.base_port <= highest_base_port(self.hosts):
            raise SimFleetError(
                f"--base-port {self.base_port}: must be 1024..{highest_base_port(self.hosts)} "
                f"(each car takes its ssh port and that port + {METRICS_PORT_OFFSET} for its metrics)"
            )
        for release in self.releases:
            if release not in RELEASES:
                raise SimFleetError(f"--release {release!r}: choose one of {', '.join(RELEASES)}")
        if not self.releases:
            raise SimFleetError("--release: give at least one release")
        if len(self.releases) > self.hosts:
            raise SimFleetError(
                f"--release: {len(self.releases)} releases for {self.hosts} host(s): at most {self.hosts}"
            )

    def release_of(self, index: int) -> str:
        """The release of car`index + 1`: round-robin over `releases`."""
        return self.releases[index % len(self.releases)]


def port_free(port: int) -> bool:
    """Whether sshd could listen on 127.0.0.1:`port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like sshd: connections in TIME_WAIT from an earlier fleet do not make the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def target_for(state: FleetState, host: HostState) -> SshTarget:
    return SshTarget(f"{state.name}/{host.name}", host.port, Path(state.key), Path(state.known_hosts))


# Each car's systemd holds inotify instances (about 5 at boot, more with its services); they all count
# against root's fs.inotify.max_user_instances, 128 by default: about 25 cars fail to boot with "Failed to
# create control group inotify object: Too many open files". Raised for the fleet, never lowered.
INOTIFY_INSTANCES_PER_HOST = 32
INOTIFY_LIMIT = Path("/proc/sys/fs/inotify/max_user_instances")


def ensure_inotify_instances(hosts: int, limit_file: Path = INOTIFY_LIMIT) -> None:
    wanted = 128 + hosts * INOTIFY_INSTANCES_PER_HOST
    try:
        current = int(limit_file.read_text())
        if current < wanted:
            limit_file.write_text(f"{wanted}\n")
            log.info(
                "fs.inotify.max_user_instances raised from %d to %d for %d hosts", current, wanted, hosts
            )
    except (OSError, ValueError) as exc:
        log.warning(
            "could not raise fs.inotify.max_user_instances to %d (%s): large fleets may not boot", wanted, exc
        )


def up(config: FleetConfig) -> FleetState:
    """Boots the fleet and writes its inventory; on any failure stops whatever it had started."""
    if os.geteuid() != 0:
        raise SimFleetError("simfleet up needs root (systemd-nspawn, bind mounts, binfmt_misc)")
    existing = load_state(config.name)
    if existing is not None:
        raise SimFleetError(
            f"fleet {config.name!r} is already up ({state_path(config.name)}); run down first"
        )
    ports = [config.base_port + i for i in range(config.hosts)]
    busy = [p for p in [*ports, *map(metrics_port, ports)] if not port_free(p)]
    if busy:
        raise SimFleetError(f"127.0.0.1 port(s) {busy} in use (another fleet?): choose another --base-port")
    if config.kind == "vm":
        qemu_version()  # missing or too old: one line, before anything is built or started
    if config.arch != native_arch():
        ensure_emulation(config.arch)
        for release in dict.fromkeys(config.releases):
            if release in QEMU_MINIMUM:
                what = f"--arch {config.arch} --release {release}"
                require_qemu(config.arch, QEMU_MINIMUM[release], what)
    sketch = _board_sketch() if config.arduino == "board" else None  # avr-gcc or simavr missing: one line
    # Only once the fleet's settings hold: a refused `up` changes nothing on the machine.
    ensure_inotify_instances(config.hosts)
    images: dict[str, Path] = {}
    build_seconds = 0.0
    for release in dict.fromkeys(config.releases):
        if config.kind == "vm":
            vm_image, seconds = ensure_vm_image(release)
            images[release] = vm_image.path
        else:
            images[release], seconds = ensure_image(config.arch, release)
        build_seconds += seconds
    base = fleet_dir(config.name)
    remove_tree(base)
    base.mkdir(parents=True)
    key = base / "id_ed25519"
    state = FleetState(
        name=config.name,
        arch=config.arch,
        base_port=config.base_port,
        releases=list(config.releases),
        image_build_seconds=round(build_seconds, 1),
        key=str(key),
        known_hosts=str(base / "known_hosts"),
        inventory=str(config.inventory.resolve()),
        kind=config.kind,
        arduino=config.arduino,
    )
    save_state(state)
    try:
        if config.kind == "vm":
            _start_vm_hosts(state, config, key, ports, images)
        else:
            _start_hosts(state, config, key, ports, images, sketch=sketch)
    except BaseException:
        log.error("fleet %s did not come up; stopping what was started", config.name)
        # A systemd still booting may not act on the halt signal yet: no long wait for a failed fleet.
        down(config.name, grace_seconds=5.0)
        raise
    return state


def _start_hosts(
    state: FleetState,
    config: FleetConfig,
    key: Path,
    ports: list[int],
    images: dict[str, Path],
    *,
    sketch: Path | None,
) -> None:
    base = fleet_dir(config.name)
    controller_key = generate_key(key, f"simfleet-{config.name}")
    known = []
    for i, port in enumerate(ports, start=1):
        name = f"car{i}"
        hdir = base / "hosts" / name
        release = config.release_of(i - 1)
        host = HostState(
            name=name,
            machine=f"{config.name}-{name}",
            port=port,
            release=release,
            image=str(images[release]),
            root=str(hdir / "root"),
            host_key_pub="",
            serial_controller=str(hdir / "serial-controller"),
            serial_host=str(hdir / "serial-host"),
            firmware_status=str(hdir / "firmware-status.json"),
            firmware_log=str(hdir / "firmware.log"),
            nspawn_log=str(hdir / "boot.log"),
            socat_log=str(hdir / "socat.log"),
        )
        state.hosts.append(host)
        started = time.monotonic()
        host.host_key_pub = prepare_root(
            Path(host.image),
            Path(host.root),
            name,
            port,
            controller_key,
            emulated=config.arch != native_arch(),
        )
        known.append(f"[127.0.0.1]:{port} {' '.join(host.host_key_pub.split()[:2])}")
        if sketch is not None:
            _wire_board(state, host, hdir, sketch)
        else:
            _wire_arduino(state, host, hdir, transmitter=config.transmitter, timeout_ms=FIRMWARE_TIMEOUT_MS)
        host.nspawn = boot(
            Path(host.root),
            host.machine,
            name,
            host.serial_pty,
            Path(host.nspawn_log),
            emulated=config.arch != native_arch(),
        )
        save_state(state)
        log.info(
            "%s (%s): root ready and booting (%.1f s)", host.machine, release, time.monotonic() - started
        )
    Path(state.known_hosts).write_text("\n".join(known) + "\n")
    boot_started = time.monotonic()
    for host in state.hosts:
        assert host.nspawn is not None
        wait_for_ssh(target_for(state, host), host.nspawn, Path(host.nspawn_log), BOOT_TIMEOUT[config.arch])
        host.init = container_init(host.nspawn)
        host.boot_seconds = round(time.monotonic() - boot_started, 1)
        log.info("%s: sshd answers on 127.0.0.1:%d after %.1f s", host.machine, host.port, host.boot_seconds)
    write_inventory(state)
    save_state(state)


def _wire_arduino(
    state: FleetState, host: HostState, hdir: Path, *, transmitter: bool, timeout_ms: int
) -> None:
    """The car's Arduino stand-in: its socat pty pair, its RC receiver's file (with `transmitter`) and the
    firmware simulator on the controller's side of the pair."""
    host.socat, host.serial_pty = start_pty_pair(
        Path(host.serial_controller), Path(host.serial_host), Path(host.socat_log)
    )
    save_state(state)
    if transmitter:
        host.rc_file = str(hdir / "rc.json")
        write_transmitter(Path(host.rc_file), Transmitter("autopilot"))
    host.firmware = start_firmware_sim(
        Path(host.serial_controller),
        Path(host.firmware_status),
        Path(host.firmware_log),
        rc_file=Path(host.rc_file) if host.rc_file else None,
        timeout_ms=timeout_ms,
    )
    save_state(state)


def _board_sketch() -> Path:
    """Builds the simulated board and the sketch as it is for an Uno (both cached; make and the firmware
    build leave what is current alone); returns the sketch's hex, each new board's program."""
    firmware = rover_cache() / "firmware"
    build_board(firmware / "board")
    try:
        image = build("uno", firmware / "simfleet-uno", build_dir=firmware / "build", defines=CAR_DEFINES)
    except BuildError as err:
        raise SimFleetError(f"--arduino board: {err}") from None
    return image / HEX_NAME


def _wire_board(state: FleetState, host: HostState, hdir: Path, sketch: Path) -> None:
    """The car's Arduino: a simulated Uno (Optiboot, the sketch flashed), its flash kept in the car's
    directory across power cycles, its port the pty bound into the container at /dev/ttyUSB0."""
    host.arduino_flash = str(hdir / "arduino-flash.bin")
    host.firmware, host.serial_pty = start_board_process(
        rover_cache() / "firmware" / "board",
        Path(host.arduino_flash),
        Path(host.serial_host),
        Path(host.firmware_log),
        bootloader="optiboot",
        program=sketch,
    )
    save_state(state)


def _start_vm_hosts(
    state: FleetState, config: FleetConfig, key: Path, ports: list[int], images: dict[str, Path]
) -> None:
    """Each car: a seed disk with its identity, a qcow2 overlay of the release's image, the pty pair
    and firmware simulator of its Arduino, then QEMU; returns when every car's sshd answers."""
    base = fleet_dir(config.name)
    controller_key = generate_key(key, f"simfleet-{config.name}")
    accel = {r: accelerator(VmImage(images[r])) for r in dict.fromkeys(config.releases)}
    for release, (name, reason) in accel.items():
        log.info("VM cars of %s run on %s: %s", release, name, reason)
    known = []
    for i, port in enumerate(ports, start=1):
        name = f"car{i}"
        hdir = base / "hosts" / name
        release = config.release_of(i - 1)
        hdir.mkdir(parents=True, exist_ok=True)
        host = HostState(
            name=name,
            machine=f"{config.name}-{name}",
            port=port,
            release=release,
            image=str(images[release]),
            root="",
            host_key_pub="",
            serial_controller=str(hdir / "serial-controller"),
            serial_host=str(hdir / "serial-host"),
            firmware_status=str(hdir / "firmware-status.json"),
            firmware_log=str(hdir / "firmware.log"),
            nspawn_log=str(hdir / "qemu.log"),
            socat_log=str(hdir / "socat.log"),
            disk=str(hdir / "disk.qcow2"),
            seed=str(hdir / "seed.img"),
            qmp=str(hdir / "qmp.sock"),
            console_log=str(hdir / "console.log"),
            accelerator=accel[release][0],
            usb_serial=f"SIMFLEET-{config.name}-{name}"[:30],
        )
        state.hosts.append(host)
        seed_dir = hdir / "seed"
        host.host_key_pub = write_identity(
            seed_dir / "root", name, controller_key, (PI_UID, PI_UID), listen_port=None
        )
        write_seed(seed_dir, Path(host.seed))
        create_overlay(VmImage(images[release]), Path(host.disk))
        known.append(f"[127.0.0.1]:{port} {' '.join(host.host_key_pub.split()[:2])}")
        timeout_ms = TCG_FIRMWARE_TIMEOUT_MS if host.accelerator == "tcg" else FIRMWARE_TIMEOUT_MS
        _wire_arduino(state, host, hdir, transmitter=config.transmitter, timeout_ms=timeout_ms)
        host.qemu = start_vm(vm_spec(host), Path(host.nspawn_log))
        save_state(state)
        log.info("%s (%s): VM booting on %s", host.machine, release, host.accelerator)
    Path(state.known_hosts).write_text("\n".join(known) + "\n")
    boot_started = time.monotonic()
    for host in state.hosts:
        _wait_for_vm(state, host, kernel_starts_before=0)
        host.boot_seconds = round(time.monotonic() - boot_started, 1)
        log.info("%s: sshd answers on 127.0.0.1:%d after %.1f s", host.machine, host.port, host.boot_seconds)
    write_inventory(state)
    save_state(state)


def vm_spec(host: HostState) -> VmSpec:
    return VmSpec(
        machine=host.machine,
        hostname=host.name,
        image=VmImage(Path(host.image)),
        disk=Path(host.disk),
        seed=Path(host.seed),
        port=host.port,
        serial_pty=host.serial_pty,
        usb_serial=host.usb_serial,
        qmp=Path(host.qmp),
        console_log=Path(host.console_log),
        accelerator=host.accelerator,
        machine_id=machine_id(host.machine),
    )


def _wait_for_vm(state: FleetState, host: HostState, kernel_starts_before: int) -> None:
    """Until the car's sshd answers; a clear error, with the console's or QEMU's last lines, when QEMU
    exits, the guest loops rebooting (it does not boot) or VM_BOOT_TIMEOUT passes."""
    assert host.qemu is not None
    console = Path(host.console_log)
    try:
        wait_for_ssh(
            target_for(state, host),
            host.qemu,
            console,
            VM_BOOT_TIMEOUT,
            gave_up=lambda: reboot_loop(console, kernel_starts_before),
        )
    except SimFleetError as err:
        qemu_log = Path(host.nspawn_log)
        if not qemu_log.is_file() or not qemu_log.read_text(errors="replace").strip():
            raise
        raise SimFleetError(f"{err}\nQEMU ({qemu_log}):\n{log_tail(qemu_log, 5)}") from None


def container_init(nspawn: Proc) -> Proc | None:
    """The container's PID 1 as seen from the controller: the one child of the nspawn process."""
    children = child_processes(nspawn.pid)
    if len(children) != 1:
        log.warning(
            "%s has %d child processes, expected 1 (the container's init)", nspawn.what, len(children)
        )
        return None
    return Proc(pid=children[0].pid, start_time=children[0].start_time, what=f"init of {nspawn.what}")


def _poweroff_over_ssh(state: FleetState, host: HostState) -> bool:
    command = ["sudo -n systemctl poweroff --no-block"]
    return ssh_run(target_for(state, host), command, timeout=30).returncode == 0


def down(name: str, grace_seconds: float | None = None) -> list[str]:
    """Stops every process of the fleet, removes the host roots, the state and its inventory.
    `grace_seconds` overrides how long containers get to power off before SIGKILL (default per arch).
    Returns what had to be killed (empty when all stopped cleanly)."""
    state = load_state(name)
    if state is None:
        remove_tree(fleet_dir(name))
        return []
    # A VM car's disk is removed with the fleet: nothing to shut down cleanly for.
    vms = [h.qemu for h in state.hosts if h.qemu is not None and is_alive(h.qemu)]
    kill_now(vms)
    nspawns = [h.nspawn for h in state.hosts if h.nspawn is not None and is_alive(h.nspawn)]
    for host in state.hosts:
        if host.nspawn is None or not is_alive(host.nspawn):
            continue
        # nspawn's SIGTERM sends PID 1 SIGRTMIN+3 (halt); qemu-user remaps real-time signals, so an
        # emulated systemd gets another one (it went to rescue mode). Ask it over ssh instead.
        if state.arch == native_arch() or not _poweroff_over_ssh(state, host):
            send_sigterm(host.nspawn)
    grace = POWEROFF_GRACE.get(state.arch, 30.0) if grace_seconds is None else grace_seconds
    killed = [p.what for p in stop_all(nspawns, grace, sigterm=False)]
    # A container whose nspawn was killed (here or by someone else) can outlive it: end its init.
    inits = [h.init for h in state.hosts if h.init is not None and is_alive(h.init)]
    killed += [p.what for p in inits]
    kill_now(inits)
    helpers = [p for h in state.hosts for p in (h.firmware, h.socat) if p is not None]
    killed += [p.what for p in stop_all(helpers, 5.0)]
    left = [
        p.what
        for h in state.hosts
        for p in (h.nspawn, h.init, h.qemu, h.firmware, h.socat)
        if p is not None and is_alive(p)
    ]
    if left:
        raise SimFleetError(
            f"fleet {name!r}: could not stop {', '.join(left)}; state kept in {state_path(name)}"
        )
    for host in state.hosts:
        # nspawn leaves an empty mount-propagation directory per machine behind.
        with contextlib.suppress(OSError):
            (NSPAWN_PROPAGATE / host.machine).rmdir()
    remove_inventory(state)
    remove_tree(fleet_dir(name))
    return killed


def power_off(name: str, host_name: str, *, hard: bool = True) -> list[str]:
    """Switches one car off. `hard` (the default) as its battery would: at once, no clean shutdown (SIGKILL
    to its QEMU, or to nspawn and the container's init); else as its owner would (ACPI's power button for
    a VM, `systemctl poweroff` in a container), waiting for it to stop. Its disk, serial stand-in and
    firmware simulator stay. Returns what had to be killed."""
    state = require_state(name)
    host = state.host(host_name)
    procs = [p for p in (host.nspawn, host.init, host.qemu) if p is not None and is_alive(p)]
    if procs and not hard:
        _shut_down(state, host)
        procs = [p for p in procs if is_alive(p)]
    killed = [p.what for p in procs]
    kill_now(procs)
    left = [p.what for p in procs if is_alive(p)]
    if left:
        raise SimFleetError(f"{host.machine}: could not stop {', '.join(left)}")
    with contextlib.suppress(OSError):
        (NSPAWN_PROPAGATE / host.machine).rmdir()
    host.nspawn = None
    host.init = None
    host.qemu = None
    save_state(state)
    return killed


def _shut_down(state: FleetState, host: HostState) -> None:
    """A clean shutdown, waited for (up to the grace period; the caller kills what is left)."""
    if state.kind == "vm":
        assert host.qemu is not None
        power_button(Path(host.qmp))
        grace, procs = VM_POWEROFF_GRACE, [host.qemu]
    else:
        _poweroff_over_ssh(state, host)
        grace = POWEROFF_GRACE.get(state.arch, 30.0)
        procs = [p for p in (host.nspawn, host.init) if p is not None]
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(p) for p in procs):
        time.sleep(0.5)


def power_on(name: str, host_name: str) -> HostState:
    """Boots a car that was switched off (power_off) from the disk it had; returns once sshd answers."""
    state = require_state(name)
    host = state.host(host_name)
    if any(p is not None and is_alive(p) for p in (host.nspawn, host.qemu)):
        raise SimFleetError(f"{host.machine} is already running")
    started = time.monotonic()
    if state.kind == "vm":
        starts = kernel_starts(Path(host.console_log))
        host.qemu = start_vm(vm_spec(host), Path(host.nspawn_log))
        save_state(state)
        _wait_for_vm(state, host, kernel_starts_before=starts)
    else:
        emulated = state.arch != native_arch()
        host.nspawn = boot(
            Path(host.root),
            host.machine,
            host.name,
            host.serial_pty,
            Path(host.nspawn_log),
            emulated=emulated,
        )
        save_state(state)
        wait_for_ssh(target_for(state, host), host.nspawn, Path(host.nspawn_log), BOOT_TIMEOUT[state.arch])
        host.init = container_init(host.nspawn)
    host.boot_seconds = round(time.monotonic() - started, 1)
    save_state(state)
    log.info("%s: powered on, sshd answers after %.1f s", host.machine, host.boot_seconds)
    return host


# The camera of a VM car is vivid's platform device; unbinding its driver removes /dev/video0 as pulling a
# USB camera's cable would, binding it again brings it back.
VIVID_DRIVER = "/sys/bus/platform/drivers/vivid"
VIVID_DEVICE = "vivid.0"


def unplug(name: str, host_name: str, device: str) -> None:
    """Pulls a VM car's Arduino (its USB device leaves the bus) or camera (its driver is unbound)."""
    _replug(name, host_name, device, plugged=False)


def plug(name: str, host_name: str, device: str) -> None:
    """Plugs a VM car's Arduino or camera back in."""
    _replug(name, host_name, device, plugged=True)


def _replug(name: str, host_name: str, device: str, *, plugged: bool) -> None:
    if device not in DEVICES:
        raise SimFleetError(f"device {device!r}: choose {' or '.join(DEVICES)}")
    state = require_state(name)
    host = state.host(host_name)
    verb = "plug" if plugged else "unplug"
    if state.kind != "vm":
        raise SimFleetError(
            f"{verb}: fleet {name!r} is of kind {state.kind}; devices can be pulled only on VM cars "
            "(up --kind vm), where a kernel sees them go"
        )
    if host.qemu is None or not is_alive(host.qemu):
        raise SimFleetError(f"{host.machine} is not running")
    if device == "arduino":
        if plugged:
            plug_arduino(Path(host.qmp), host.usb_serial)
        else:
            unplug_arduino(Path(host.qmp))
        return
    action = "bind" if plugged else "unbind"
    script = f"echo {VIVID_DEVICE} > {VIVID_DRIVER}/{action}"
    result = ssh_run(target_for(state, host), ["sudo", "-n", "sh", "-c", shlex.quote(script)], timeout=60)
    if result.returncode != 0:
        raise SimFleetError(f"{host.machine}: camera {action} failed: {result.stderr.strip()[:300]}")


def _read_firmware_status(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def status(name: str, check_ssh: bool = True) -> dict[str, Any]:
    """Per host: container up, ssh answers, serial wired, firmware simulator status."""
    state = load_state(name)
    if state is None:
        return {"name": name, "up": False, "hosts": []}
    hosts = []
    for host in state.hosts:
        running = any(p is not None and is_alive(p) for p in (host.nspawn, host.init, host.qemu))
        ssh_ok = (
            running and check_ssh and ssh_run(target_for(state, host), ["true"], timeout=15).returncode == 0
        )
        stand_in = host.firmware if host.arduino_flash else host.socat  # a board is its own port
        serial = stand_in is not None and is_alive(stand_in) and Path(host.serial_host).exists()
        hosts.append(
            {
                "host": host.name,
                "machine": host.machine,
                "release": host.release,
                "port": host.port,
                "running": running,
                "ssh": ssh_ok,
                "serial": serial,
                "firmware_sim": host.firmware is not None and is_alive(host.firmware),
                # "sim" (the firmware simulator) or "board" (the sketch on simavr, flashed by avrdude)
                "arduino": "board" if host.arduino_flash else "sim",
                "transmitter": bool(host.rc_file),
                "firmware_status": _read_firmware_status(Path(host.firmware_status)),
                "boot_seconds": host.boot_seconds,
                # VM cars: what QEMU runs them on (kvm or tcg); "" for containers.
                "accelerator": host.accelerator,
            }
        )
    return {
        "name": name,
        "up": all(h["running"] for h in hosts),
        "arch": state.arch,
        "kind": state.kind,
        "arduino": state.arduino,
        "releases": state.releases,
        "inventory": state.inventory,
        "image_build_seconds": state.image_build_seconds,
        "hosts": hosts,
    }


def require_state(name: str) -> FleetState:
    state = load_state(name)
    if state is None:
        raise SimFleetError(f"fleet {name!r} is not up (no {state_path(name)})")
    return state


def set_thermal(name: str, host_name: str, reading: ThermalReading) -> None:
    state = require_state(name)
    host = state.host(host_name)
    if state.kind != "vm":
        write_thermal(Path(host.root), reading)
        return
    # A VM's disk is its own: the same files, written inside it (each atomically, as write_thermal does).
    script = " && ".join(
        f"printf %s {shlex.quote(text)} > {path}.tmp && mv {path}.tmp {path}"
        for path, text in thermal_files(reading).items()
    )
    result = ssh_run(target_for(state, host), ["sudo", "-n", "sh", "-c", shlex.quote(script)], timeout=60)
    if result.returncode != 0:
        raise SimFleetError(f"{host.machine}: set-thermal failed: {result.stderr.strip()[:300]}")


# The receiver's mode switch pulse per mode (the firmware: < 1300 us manual, <= 1700 us autopilot with the
# sticks as fallback, above: autopilot with neutral as fallback).
SWITCH_US = {"manual": 1000, "autopilot": 1500, "autopilot_neutral": 2000}


@dataclass(frozen=True)
class Transmitter:
    """What the simulated driver does: the switch's mode and the sticks (-1..1); mode "off" = no signal."""

    mode: str
    steering: float = 0.0
    throttle: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in (*SWITCH_US, "off"):
            raise SimFleetError(f"transmitter mode {self.mode!r}: choose {', '.join(SWITCH_US)} or off")
        for what, value in (("steering", self.steering), ("throttle", self.throttle)):
            if not -1.0 <= value <= 1.0:
                raise SimFleetError(f"transmitter {what} {value:g}: must be within -1..1")


def write_transmitter(path: Path, transmitter: Transmitter) -> None:
    """The firmware simulator re-reads the file when it changes; no file = no receiver signal."""
    if transmitter.mode == "off":
        path.unlink(missing_ok=True)
        return
    pulses = {
        "steer_us": round(1500 + 500 * transmitter.steering),
        "throttle_us": round(1500 + 500 * transmitter.throttle),
        "switch_us": SWITCH_US[transmitter.mode],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(pulses) + "\n")
    tmp.replace(path)


def set_transmitter(name: str, host_name: str, transmitter: Transmitter) -> list[str]:
    """Set one car's transmitter, or every car's with `host_name` "all"; returns the cars set."""
    state = require_state(name)
    hosts = state.hosts if host_name == "all" else [state.host(host_name)]
    missing = [host.name for host in hosts if not host.rc_file]
    if missing:
        raise SimFleetError(
            f"{', '.join(missing)} of fleet {name!r} has no RC receiver: start it with up --transmitter"
        )
    for host in hosts:
        write_transmitter(Path(host.rc_file), transmitter)
    return [host.name for host in hosts]
