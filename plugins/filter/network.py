"""Filters for addresses: rover.fleet.host_port ("host:port", an IPv6 address in brackets) and
rover.fleet.monitor_target (a car's entry in Prometheus's file-based service discovery)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError


def host_port(address: str, port: int | str) -> str:
    """The "<address>:<port>" a URL or a listen flag wants: "[::1]:9100" for an IPv6 address.
    An address already in brackets is kept as it is; a port outside 1-65535 is refused."""
    host = str(address).strip()
    if not host:
        raise AnsibleFilterError("host_port: the address is empty")
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise AnsibleFilterError(f"host_port: {port!r} is not a port number") from None
    if not 1 <= number <= 65535:
        raise AnsibleFilterError(f"host_port: {number} is not a port (1-65535)")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{number}"


def monitor_target(car: Mapping[str, Any], default_port: int = 9100) -> dict[str, Any]:
    """{"targets": ["host:port"], "labels": {"car": name}} from the car's host variables: its
    rover_monitor_target when set (an address the monitor reaches, e.g. a forwarded port), else
    <ansible_host>:<rover_node_exporter_port | default_port>."""
    name = str(car.get("inventory_hostname", ""))
    if not name:
        raise AnsibleFilterError("monitor_target: pass a car's hostvars (hostvars[car])")
    target = car.get("rover_monitor_target")
    if not target:
        port = int(car.get("rover_node_exporter_port") or default_port)
        if not 1 <= port <= 65535:
            raise AnsibleFilterError(f"{name}: rover_node_exporter_port {port} is not a port (1-65535)")
        target = host_port(str(car.get("ansible_host") or name), port)
    return {"targets": [str(target)], "labels": {"car": name}}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"host_port": host_port, "monitor_target": monitor_target}
