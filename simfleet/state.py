"""What `up` started, saved as $ROVER_CACHE/fleets/<name>/state.json so `down` and `status` find it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simfleet.errors import SimFleetError
from simfleet.paths import fleet_dir
from simfleet.processes import Proc


@dataclass
class HostState:
    """One simulated car: its root, sshd port, serial stand-in and the processes behind them."""

    name: str
    machine: str
    port: int
    release: str  # Debian suite: trixie, bookworm
    image: str  # the cached image its root is made from
    root: str
    host_key_pub: str
    serial_controller: str
    serial_host: str
    firmware_status: str
    firmware_log: str
    nspawn_log: str
    socat_log: str
    nspawn: Proc | None = None
    socat: Proc | None = None
    firmware: Proc | None = None
    # The container's init as seen from the controller: SIGKILL to nspawn alone would leave it running.
    init: Proc | None = None
    serial_pty: str = ""
    boot_seconds: float | None = None
    # The firmware simulator's RC receiver pulses (`up --transmitter`); "" = the car has no receiver.
    rc_file: str = ""
    # A virtual-machine car (fleet kind "vm"): its QEMU, qcow2 disk, seed disk, monitor socket, console
    # log, accelerator (kvm or tcg) and the serial number of its USB Arduino.
    qemu: Proc | None = None
    disk: str = ""
    seed: str = ""
    qmp: str = ""
    console_log: str = ""
    accelerator: str = ""
    usb_serial: str = ""
    # A car whose Arduino is a simulated board (fleet arduino "board"): its flash file; "" = the simulator.
    arduino_flash: str = ""


@dataclass
class FleetState:
    """A fleet started by `up`; several fleets with different names can run side by side."""

    name: str
    arch: str
    base_port: int
    releases: list[str]  # as given to `up`; car N runs releases[(N - 1) % len(releases)]
    image_build_seconds: float
    key: str
    known_hosts: str
    inventory: str
    hosts: list[HostState] = field(default_factory=list)
    # "nspawn": containers sharing the controller's kernel; "vm": QEMU virtual machines with their own.
    kind: str = "nspawn"
    arduino: str = "sim"  # "sim" or "board" (simfleet.fleet.ARDUINOS)

    def host(self, name: str) -> HostState:
        for host in self.hosts:
            if name in (host.name, host.machine):
                return host
        names = ", ".join(h.name for h in self.hosts)
        raise SimFleetError(f"fleet {self.name!r} has no host {name!r} (hosts: {names})")


def state_path(name: str) -> Path:
    return fleet_dir(name) / "state.json"


def save_state(state: FleetState) -> None:
    path = state_path(state.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
    tmp.replace(path)


def load_state(name: str) -> FleetState | None:
    path = state_path(name)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        # A fleet started before simfleet had releases (one image, every host bookworm) can still go down.
        old_image = raw.pop("image", "")
        raw.setdefault("releases", ["bookworm"])
        hosts = [_host_from_dict({"release": "bookworm", "image": old_image, **h}) for h in raw.pop("hosts")]
        return FleetState(**raw, hosts=hosts)
    except (ValueError, TypeError, KeyError) as err:
        raise SimFleetError(f"{path}: unreadable fleet state ({err}); remove the fleet directory") from err


def _host_from_dict(raw: dict[str, Any]) -> HostState:
    fields = dict(raw)
    for key in ("nspawn", "socat", "firmware", "init", "qemu"):
        value = fields.get(key)
        fields[key] = Proc(**value) if isinstance(value, dict) else None
    return HostState(**fields)
