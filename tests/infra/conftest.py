"""Testinfra suite for a provisioned car; the same command checks simulated and real fleets:

    pytest tests/infra --hosts=rovers --ansible-inventory=<inventory> --connection=ansible

Expected values are the role defaults (roles/*/defaults/main.yml) overridden by the car's inventory
variables, so a fleet with its own settings is checked against them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROLES = Path(__file__).resolve().parents[2] / "roles"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --hosts these tests would probe the controller itself: skip them with a hint instead."""
    if config.getoption("hosts", default=None):
        return
    skip = pytest.mark.skip(
        reason="needs a fleet: --hosts=rovers --ansible-inventory=INV --connection=ansible"
    )
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


def role_defaults() -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for defaults in sorted(ROLES.glob("*/defaults/main.yml")):
        merged.update(yaml.safe_load(defaults.read_text()) or {})
    return merged


@pytest.fixture
def settings(host: Any) -> dict[str, Any]:
    """Role defaults, overridden by this car's inventory variables."""
    merged = role_defaults()
    merged.update(host.ansible.get_variables())
    return merged
