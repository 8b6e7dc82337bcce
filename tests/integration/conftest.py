"""Fixtures for tests that need the simulated fleet (simfleet; see docs/simulation.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from simfleet.state import FleetState
from simfleet.testing import running_fleet

# Overridable so two test sessions on one machine (e.g. two developers' runs) can each have a fleet.
SIM_FLEET_NAME = os.environ.get("SIMFLEET_TEST_NAME", "pytest")
SIM_FLEET_BASE_PORT = int(os.environ.get("SIMFLEET_TEST_BASE_PORT", "2321"))


@pytest.fixture(scope="session")
def sim_fleet() -> Iterator[FleetState]:
    """Two simulated amd64 cars for the whole session (fleet "pytest", sshd on 127.0.0.1:2321-2322;
    $SIMFLEET_TEST_NAME and $SIMFLEET_TEST_BASE_PORT choose others).

    `sim_fleet.inventory` is the Ansible inventory; each host's firmware simulator status file is
    `host.firmware_status`. Stopped (nothing left running) at the end of the session.
    """
    with running_fleet(SIM_FLEET_NAME, hosts=2, base_port=SIM_FLEET_BASE_PORT) as state:
        yield state
