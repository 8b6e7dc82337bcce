"""The loopback ports a simulated car takes on the controller."""

from __future__ import annotations

# A car's node_exporter answers on its ssh port + this (an nspawn car listens there itself; QEMU forwards it
# to a VM car's 9100).
METRICS_PORT_OFFSET = 10000
GUEST_METRICS_PORT = 9100
HIGHEST_PORT = 65535


def metrics_port(ssh_port: int) -> int:
    return ssh_port + METRICS_PORT_OFFSET


def highest_base_port(hosts: int) -> int:
    """The highest --base-port whose cars' ssh and metrics ports all fit."""
    return HIGHEST_PORT - METRICS_PORT_OFFSET - hosts
