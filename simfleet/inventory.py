"""Writes the Ansible inventory for a simulated fleet: the groups of a real fleet plus sim-only vars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from simfleet.board import CAR_DEFINES
from simfleet.host import SERIAL_DEVICE
from simfleet.pi_tools import CPUFREQ_ROOT, THERMAL_FILE, THERMAL_ZONE_TEMP
from simfleet.ports import GUEST_METRICS_PORT, metrics_port
from simfleet.ssh import SshTarget
from simfleet.state import FleetState, HostState

MARKER = "# Written by `python -m simfleet up`"
KIND_TEXT = {"nspawn": "systemd-nspawn", "vm": "QEMU virtual machines"}


def host_vars(state: FleetState, index: int) -> dict[str, Any]:
    host = state.hosts[index]
    target = SshTarget(host.name, host.port, Path(state.key), Path(state.known_hosts))
    return (
        {
            "ansible_host": "127.0.0.1",
            "ansible_port": host.port,
            "ansible_user": "pi",
            "ansible_ssh_private_key_file": state.key,
            "ansible_ssh_common_args": " ".join(target.options()),
            "ansible_python_interpreter": "/usr/bin/python3",
            "simfleet_name": state.name,
            "simfleet_machine": host.machine,
            "simfleet_arch": state.arch,
            "simfleet_release": host.release,
            "simfleet_root": host.root,
            "simfleet_serial_device": SERIAL_DEVICE,
            "simfleet_serial_controller": host.serial_controller,
            "simfleet_firmware_status": host.firmware_status,
            "simfleet_firmware_log": host.firmware_log,
            "simfleet_thermal_file": THERMAL_FILE,
            "simfleet_thermal_zone_temp": THERMAL_ZONE_TEMP,
            "simfleet_cpufreq_root": CPUFREQ_ROOT,
            "simfleet_kind": state.kind,
            # Cars share the controller's network: each exporter on its own loopback port.
            "rover_node_exporter_listen_address": "127.0.0.1",
            "rover_node_exporter_port": metrics_port(host.port),
        }
        | (_vm_vars(host) if state.kind == "vm" else {})
        | (_board_vars(host) if host.arduino_flash else {})
    )


def _board_vars(host: HostState) -> dict[str, Any]:
    """A car whose Arduino is a simulated Uno (up --arduino board): the deploy builds its sketch as the
    board's was built (no receiver wired), and tests find the board's flash. No simulator status file: as on a
    real car, the firmware's replies counted in the runtime's metrics prove the link to the health gate."""
    return {
        "rover_firmware_defines": dict(CAR_DEFINES),
        "simfleet_arduino_flash": host.arduino_flash,
        "simfleet_firmware_status": "",
    }


def _vm_vars(host: HostState) -> dict[str, Any]:
    """A VM car's Arduino is QEMU's FTDI adapter on USB: the rover_serial rule matches it by its ids and
    serial number, as on a car with more than one such board."""
    return {
        "rover_serial_usb_vendor_id": "0403",
        "rover_serial_usb_product_id": "6001",
        "rover_serial_usb_serial": host.usb_serial,
        "simfleet_accelerator": host.accelerator,
        # The guest listens on its own network; QEMU forwards the car's metrics port to it.
        "rover_node_exporter_listen_address": "0.0.0.0",
        "rover_node_exporter_port": GUEST_METRICS_PORT,
        "rover_monitor_target": f"127.0.0.1:{metrics_port(host.port)}",
    }


def render(state: FleetState) -> str:
    hosts = {h.name: host_vars(state, i) for i, h in enumerate(state.hosts)}
    releases = ", ".join(f"{h.name} {h.release}" for h in state.hosts)
    doc = {
        "all": {
            "children": {
                "rovers": {"hosts": hosts},
                # Sim-only group: group_vars/simulated can point role variables at the stand-ins,
                # group_vars/simulated_vm (its child) back at the real devices a VM car has.
                "simulated": {
                    "hosts": dict.fromkeys(hosts),
                    **(
                        {"children": {"simulated_vm": {"hosts": dict.fromkeys(hosts)}}}
                        if state.kind == "vm"
                        else {}
                    ),
                },
            }
        }
    }
    header = (
        f"{MARKER} --name {state.name}; removed by `down`. Do not edit.\n"
        f"# {len(hosts)} simulated {state.arch} hosts ({releases}; {KIND_TEXT[state.kind]}); "
        "see docs/simulation.md.\n"
    )
    return header + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def write_inventory(state: FleetState) -> Path:
    path = Path(state.inventory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(state))
    tmp.replace(path)
    return path


def remove_inventory(state: FleetState) -> None:
    """Removes the inventory only if it is still the one this fleet wrote."""
    path = Path(state.inventory)
    try:
        first = path.read_text().splitlines()[0]
    except (OSError, IndexError):
        return
    if first.startswith(MARKER) and first.endswith(f"--name {state.name}; removed by `down`. Do not edit."):
        path.unlink()
