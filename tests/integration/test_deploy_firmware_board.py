"""Deploys that flash a real sketch: a one-car simulated fleet whose Arduino is the compiled sketch on a
simulated Uno behind Optiboot (`simfleet up --arduino board`), so playbooks/deploy.yml and rollback.yml run
avrdude on the car through its serial port, the board's flash changes, and the firmware that answers the
runtime afterwards is the one the release carries.

Covered: a board that runs the release's firmware is left alone; an upgrade is flashed and drives; a
firmware that never answers after its flash fails the gate and the rollback flashes the previous release's
back; rollback.yml to an older release flashes that release's firmware. The tests run in order and share
the car. (test_firmware_flash.py covers the flash itself: cuts halfway, wrong boards, bad images.)"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    FORCE,
    RELEASES,
    PlaybookRun,
    car,
    current_release,
    make_bundle,
    releases,
    run_playbook,
    wait_running,
)

from rover_runtime.firmware import HEX_NAME, program_extent
from simfleet.board import BOOTLOADERS, CAR_DEFINES
from simfleet.state import FleetState
from simfleet.testing import running_fleet

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

FLEET = os.environ.get("SIMFLEET_TEST_NAME", "pytest") + "-board"
BASE_PORT = int(os.environ.get("SIMFLEET_TEST_BASE_PORT", "2321")) + 110


@pytest.fixture(scope="module")
def board_fleet() -> Iterator[FleetState]:
    with running_fleet(FLEET, hosts=1, base_port=BASE_PORT, arduino="board") as state:
        run = run_playbook(Path(state.inventory), "provision.yml", timeout=1800)
        assert run.rc == 0, run.report()
        yield state


@pytest.fixture(scope="module")
def inventory(board_fleet: FleetState) -> Path:
    return Path(board_fleet.inventory)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("board-bundle") / "bundle", chunk_size=10)


def deploy(inventory: Path, bundle: Path, *args: str, **settings: str) -> PlaybookRun:
    """deploy.yml with the car's own sketch settings plus `settings` (C defines)."""
    defines = {**CAR_DEFINES, **settings}
    return run_playbook(
        inventory, "deploy.yml", *FORCE, "-e", f"rover_deploy_bundle={bundle}",
        "-e", json.dumps({"rover_firmware_defines": defines}), *args,
    )  # fmt: skip


def flash_result(host: Any) -> dict[str, Any]:
    return dict(json.loads(host.file("/run/rover-firmware.json").content_string))


def firmware_fact(host: Any) -> dict[str, Any]:
    """The car's lasting record of its board (ansible_local.rover_firmware in later fact gatherings)."""
    return dict(json.loads(host.file("/etc/ansible/facts.d/rover_firmware.fact").content_string))


def board_flash(state: FleetState) -> str:
    """The sha256 of the simulated board's whole flash (bootloader and program)."""
    return hashlib.sha256(Path(state.hosts[0].arduino_flash).read_bytes()).hexdigest()


def program_on_board(state: FleetState, host: Any, release: str) -> tuple[bytes, bytes]:
    """The board's flash over `release`'s program (up to its image's extent) and its bootloader section."""
    hex_text = host.file(f"{RELEASES}/releases/{release}/firmware/{HEX_NAME}").content_string
    flash = Path(state.hosts[0].arduino_flash).read_bytes()
    return flash[: program_extent(hex_text, release)], flash[BOOTLOADERS["optiboot"].boot_address :]


def release_version(host: Any, release: str) -> str:
    return str(
        json.loads(host.file(f"{RELEASES}/releases/{release}/release.json").content_string)["firmware"][
            "version"
        ]
    )


def drives_on(host: Any, release: str, version: str) -> None:
    """The runtime runs `release`, healthy, and the firmware it talks to answers `version`."""
    metrics = wait_running(host, release)
    assert f" {version} " in f" {metrics['serial']['firmware']} ", metrics["serial"]


@pytest.fixture(scope="module")
def first(inventory: Path, bundle: Path, board_fleet: FleetState) -> str:
    """The first release: the sketch with the car's settings, the one the new board came with."""
    before = board_flash(board_fleet)
    run = deploy(inventory, bundle)
    assert run.rc == 0, run.report()
    host = car(inventory, "car1")
    release = current_release(host)
    result = flash_result(host)
    assert result["ok"] is True, result
    assert result["flashed"] is False, result  # it runs it: left alone
    assert board_flash(board_fleet) == before
    return release


def test_a_board_that_runs_the_release_is_left_alone_and_drives(inventory: Path, first: str) -> None:
    host = car(inventory, "car1")
    version = release_version(host, first)
    assert version.startswith("2.0.0+"), version  # the car's settings are part of what the board answers
    drives_on(host, first, version)


@pytest.fixture(scope="module")
def upgraded(inventory: Path, bundle: Path, board_fleet: FleetState, first: str) -> str:
    before = board_flash(board_fleet)
    run = deploy(inventory, bundle, ROVER_FIRMWARE_VERSION='"2.0.1"')
    assert run.rc == 0, run.report()
    host = car(inventory, "car1")
    release = current_release(host)
    assert release != first
    assert "flashed onto the uno at /dev/ttyUSB0" in run.text, run.report()
    result = flash_result(host)
    assert result["ok"] is True, result
    assert result["flashed"] is True, result
    assert result["before"]["version"] == release_version(host, first), result
    assert board_flash(board_fleet) != before  # avrdude wrote the simulated flash
    return release


def test_an_upgrade_is_flashed_through_the_bootloader_and_drives(inventory: Path, upgraded: str) -> None:
    host = car(inventory, "car1")
    version = release_version(host, upgraded)
    assert version.startswith("2.0.1+"), version
    assert flash_result(host)["after"]["version"] == version
    fact = firmware_fact(host)
    assert (fact["ok"], fact["release"], fact["version"]) == (True, upgraded, version), fact
    assert fact["error"] == "", fact
    drives_on(host, upgraded, version)


def test_a_firmware_that_never_answers_is_flashed_back_and_rolled_back(
    inventory: Path, bundle: Path, board_fleet: FleetState, upgraded: str
) -> None:
    """Built for another line speed, the firmware passes every check before the flash and avrdude writes it,
    but it never answers the runtime's speed: the restart fails, the release is marked bad, and the
    rollback's restart flashes the previous release's firmware, which answers and drives."""
    host = car(inventory, "car1")
    good_program = program_on_board(board_fleet, host, upgraded)
    run = deploy(
        inventory, bundle, "-e", "rover_firmware_flash_attempts=1",
        ROVER_FIRMWARE_VERSION='"2.0.2"', SERIAL_BAUD="57600",
    )  # fmt: skip
    assert run.rc != 0, run.report()
    assert "is not on the board: after the flash the firmware answers nothing, not 2.0.2+" in run.text, (
        run.report()
    )
    assert f"rolled back to release {upgraded}, which is running" in run.text, run.report()
    assert current_release(host) == upgraded
    tried = [
        info["state"]
        for info in releases(host).values()
        if (info.get("firmware") or {}).get("version", "").startswith("2.0.2+")
    ]
    assert tried == ["bad"], releases(host)
    result = flash_result(host)  # the rollback's restart put the previous firmware back
    assert result["ok"] is True, result
    assert result["flashed"] is True, result
    assert result["before"] is None, result  # the bad firmware answered nothing
    # The good release's program byte for byte (pages past it may keep the bad one's tail), Optiboot intact.
    assert program_on_board(board_fleet, host, upgraded) == good_program
    fact = firmware_fact(host)
    assert fact["ok"] is True, fact
    assert (fact["release"], fact["version"]) == (upgraded, release_version(host, upgraded)), fact
    drives_on(host, upgraded, release_version(host, upgraded))


def test_rollback_to_an_older_release_flashes_its_firmware(
    inventory: Path, board_fleet: FleetState, first: str, upgraded: str
) -> None:
    host = car(inventory, "car1")
    run = run_playbook(
        inventory, "rollback.yml", *FORCE, "--limit", "car1", "-e", f"rover_rollback_release={first}"
    )
    assert run.rc == 0, run.report()
    assert current_release(host) == first
    result = flash_result(host)
    assert result["flashed"] is True, result
    assert result["before"]["version"] == release_version(host, upgraded), result
    fact = firmware_fact(host)
    assert (fact["release"], fact["version"]) == (first, release_version(host, first)), fact
    drives_on(host, first, release_version(host, first))
