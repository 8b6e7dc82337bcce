"""Fixtures for tests that need the simulated fleet (simfleet; see docs/simulation.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from deploy_helpers import PlaybookRun, fleet_inventory, run_playbook

from simfleet.image import DEFAULT_RELEASE
from simfleet.state import FleetState
from simfleet.testing import running_fleet

# Overridable so two test sessions on one machine (e.g. two developers' runs) can each have a fleet.
SIM_FLEET_NAME = os.environ.get("SIMFLEET_TEST_NAME", "pytest")
SIM_FLEET_BASE_PORT = int(os.environ.get("SIMFLEET_TEST_BASE_PORT", "2321"))
# Debian release(s) of the session fleet's cars, a comma list taken by car1, car2 in turn (default trixie,
# what Raspberry Pi OS is based on); e.g. SIMFLEET_TEST_RELEASES=bookworm runs the playbooks on bookworm.
SIM_FLEET_RELEASES = tuple(os.environ.get("SIMFLEET_TEST_RELEASES", DEFAULT_RELEASE).split(","))


@pytest.fixture(scope="session")
def sim_fleet() -> Iterator[FleetState]:
    """Three simulated amd64 Debian trixie cars for the whole session (fleet "pytest", sshd on
    127.0.0.1:2321-2323; $SIMFLEET_TEST_NAME, $SIMFLEET_TEST_BASE_PORT and $SIMFLEET_TEST_RELEASES choose
    others).

    `sim_fleet.inventory` is the Ansible inventory; each host's firmware simulator status file is
    `host.firmware_status`, its release `host.release`. Stopped (nothing left running) at the end of the
    session.
    """
    with running_fleet(
        SIM_FLEET_NAME, hosts=3, base_port=SIM_FLEET_BASE_PORT, releases=SIM_FLEET_RELEASES
    ) as state:
        yield state


@pytest.fixture(scope="session")
def fleet_provisioned(request: pytest.FixtureRequest) -> PlaybookRun:
    """playbooks/provision.yml run once on the session's fleet (fleet_inventory), shared by every module
    that needs provisioned cars; test_provision checks this run."""
    run = run_playbook(fleet_inventory(request), "provision.yml", timeout=1800)
    assert run.rc == 0, run.report()
    return run
