"""Filter rover.fleet.monitor_target: a car's entry in Prometheus's file-based service discovery."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ansible.errors import AnsibleFilterError


def monitor_target(car: Mapping[str, Any], default_port: int = 9100) -> dict[str, Any]:
    """{"targets": ["host:port"], "labels": {"car": name}} from the car's host variables: its
    rover_monitor_target when set (an address the monitor reaches, e.g. a forwarded port), else
    <ansible_host>:<rover_node_exporter_port | default_port>."""
    name = str(car.get("inventory_hostname", ""))
    if not name:
        raise AnsibleFilterError("monitor_target: pass a car's hostvars (hostvars[car])")
    target = car.get("rover_monitor_target")
    if not target:
        host = str(car.get("ansible_host") or name)
        port = int(car.get("rover_node_exporter_port") or default_port)
        if not 1 <= port <= 65535:
            raise AnsibleFilterError(f"{name}: rover_node_exporter_port {port} is not a port (1-65535)")
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {"targets": [str(target)], "labels": {"car": name}}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {"monitor_target": monitor_target}
