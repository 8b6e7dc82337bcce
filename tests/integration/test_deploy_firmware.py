"""The Arduino's firmware as part of every release (role rover_firmware), with playbooks/deploy.yml against
car1 of the session's simulated fleet: real ansible-playbook, sshd, systemd and avrdude on the car, the
firmware simulator on the serial pty (it answers the firmware's ping like the sketch, and has no bootloader,
so avrdude can never write it: a flash the board cannot take). avrdude writing the compiled sketch through
Optiboot on a simulated board is tested in test_firmware_flash.py.

The tests run in order and share car1."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    FORCE,
    RELEASES,
    PlaybookRun,
    car,
    current_release,
    fleet_inventory,
    leftovers,
    make_bundle,
    new_signing_key,
    releases,
    run_playbook,
    sign_manifest,
    signing_key,
    wait_running,
)

from fleet_firmware.build import build
from rover_runtime.firmware_sim import FIRMWARE_VERSION

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

NEXT_VERSION = '"9.9.9"'  # a version the simulated board never answers with


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest, fleet_provisioned: PlaybookRun) -> Path:
    return fleet_inventory(request)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("fw-bundle") / "bundle", chunk_size=10)


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fw-builds")


def deploy(inventory: Path, bundle: Path, *args: str) -> PlaybookRun:
    return run_playbook(
        inventory, "deploy.yml", *FORCE, "--limit", "car1", "-e", f"rover_deploy_bundle={bundle}", *args
    )


def defines(**values: str) -> tuple[str, str]:
    return ("-e", json.dumps({"rover_firmware_defines": values}))


def flash_result(host: Any) -> dict[str, Any]:
    return dict(json.loads(host.file("/run/rover-firmware.json").content_string))


@pytest.fixture(scope="module")
def good(fleet: Path, bundle: Path) -> str:
    """car1 on a release of `bundle` with the sketch as it is (the version the simulated board answers)."""
    run = deploy(fleet, bundle)
    assert run.rc == 0, run.report()
    host = car(fleet, "car1")
    release = current_release(host)
    wait_running(host, release)
    return release


def test_a_release_carries_its_signed_firmware_and_a_board_that_runs_it_is_not_flashed(
    fleet: Path, good: str
) -> None:
    host = car(fleet, "car1")
    firmware = f"{RELEASES}/releases/{good}/firmware"
    for name in ("rover_car.hex", "firmware.json", "firmware.json.sig"):
        assert host.file(f"{firmware}/{name}").exists, name
    check = host.run(
        "ssh-keygen -Y verify -f /etc/rover/allowed_signers -I rover-controller -n rover-bundle "
        f"-s {firmware}/firmware.json.sig < {firmware}/firmware.json"
    )
    assert check.rc == 0, check.stderr
    described = json.loads(host.file(f"{RELEASES}/releases/{good}/release.json").content_string)["firmware"]
    assert described["version"] == FIRMWARE_VERSION
    assert described["board"] == "uno"
    result = flash_result(host)
    assert result["ok"] is True, result
    assert result["flashed"] is False, result  # the board answered the release's version: left alone
    assert result["before"]["version"] == FIRMWARE_VERSION, result
    assert result["image_sha256"] == described["sha256"]


def test_the_firmware_is_part_of_the_release_id(fleet: Path, bundle: Path, good: str) -> None:
    """Check mode names the release each would build: other firmware is another release; the same sketch
    with the same bundle, runtime and config is the same release (nothing to do)."""
    same = deploy(fleet, bundle, "--check")
    assert same.rc == 0, same.report()
    assert f"release {good} unchanged" in same.text, same.report()
    other = deploy(fleet, bundle, "--check", *defines(ROVER_FIRMWARE_VERSION=NEXT_VERSION))
    assert other.rc == 0, other.report()
    assert "would build release" in other.text, other.report()
    assert f"would build release {good}" not in other.text, other.report()


def test_firmware_the_board_cannot_take_fails_the_gate_and_the_rollback_takes_the_board_back(
    fleet: Path, bundle: Path, good: str
) -> None:
    """A new firmware version: the runtime is stopped, the board answers the old version, avrdude gets no
    answer from a bootloader (attempts 1), so the restart fails, the release is marked bad, and the rollback's
    restart checks the previous release's firmware on the board (it runs it) and drives again."""
    host = car(fleet, "car1")
    run = deploy(
        fleet, bundle, *defines(ROVER_FIRMWARE_VERSION=NEXT_VERSION), "-e", "rover_firmware_flash_attempts=1"
    )
    assert run.rc != 0, run.report()
    assert "is not on the board: avrdude failed" in run.text, run.report()
    assert "the bootloader never answered" in run.text, run.report()
    assert f"rolled back to release {good}, which is running" in run.text, run.report()
    assert current_release(host) == good
    tried = {
        rid: info["state"]
        for rid, info in releases(host).items()
        if (info.get("firmware") or {}).get("version") == json.loads(NEXT_VERSION)
    }
    assert list(tried.values()) == ["bad"], releases(host)
    result = flash_result(host)  # the rollback's restart: the previous release's firmware, already there
    assert result["ok"] is True, result
    assert result["image_version"] == FIRMWARE_VERSION, result
    wait_running(host, good)


def test_firmware_of_another_protocol_or_board_is_refused_on_the_controller(
    fleet: Path, bundle: Path, good: str, builds: Path
) -> None:
    """Refused before anything on the car changes: firmware speaking another protocol than the runtime it
    ships with, firmware built for another board, a hex changed after its firmware.json was written, and a
    board the role does not know (its argument spec)."""
    host = car(fleet, "car1")
    newer = deploy(fleet, bundle, *defines(ROVER_PROTOCOL_VERSION="3"))
    assert newer.rc != 0
    assert "speaks protocol 3, this runtime protocol 2: the car would not drive" in newer.text, newer.report()
    assert "refused on the controller, nothing sent" in newer.text, newer.report()

    nano = build("nano_old_bootloader", builds / "old-nano", build_dir=builds / "build")
    other_board = deploy(fleet, bundle, "-e", f"rover_firmware_dir={nano}")
    assert other_board.rc != 0
    assert "built for the board 'nano_old_bootloader', the car has 'uno'" in other_board.text

    corrupt = builds / "corrupt"
    shutil.copytree(build("uno", builds / "uno", build_dir=builds / "build"), corrupt)
    hex_file = corrupt / "rover_car.hex"
    hex_file.write_text(hex_file.read_text() + ":00000001FF\n")  # firmware.json's sha256 no longer holds
    changed = deploy(fleet, bundle, "-e", f"rover_firmware_dir={corrupt}")
    assert changed.rc != 0
    assert "(a corrupt or replaced image)" in changed.text, changed.report()

    unknown = deploy(fleet, bundle, "-e", "rover_firmware_board=mega")
    assert unknown.rc != 0
    assert "rover_firmware_board" in unknown.text, unknown.report()
    assert "mega" in unknown.text, unknown.report()
    assert current_release(host) == good
    assert leftovers(host) == []


def test_firmware_signed_with_another_key_is_refused_on_the_car(
    fleet: Path, good: str, builds: Path, tmp_path: Path
) -> None:
    """A bundle signed beforehand with the controller's key, firmware signed with a key the car does not
    trust, both sent as they are (rover_release_sign false): the car refuses the release before it is
    published."""
    host = car(fleet, "car1")
    signed = make_bundle(tmp_path / "signed", chunk_size=13)
    sign_manifest(signed, signing_key())
    firmware = build("uno", builds / "foreign", build_dir=builds / "build")
    other = new_signing_key(tmp_path / "keys" / "other")
    with (firmware / "firmware.json").open("rb") as manifest:
        signature = subprocess.run(
            ["ssh-keygen", "-Y", "sign", "-f", str(other), "-n", "rover-bundle"],
            stdin=manifest, capture_output=True, check=True,
        ).stdout  # fmt: skip
    (firmware / "firmware.json.sig").write_bytes(signature)
    run = deploy(fleet, signed, "-e", "rover_release_sign=false", "-e", f"rover_firmware_dir={firmware}")
    assert run.rc != 0, run.report()
    assert "failed verification on the car and was not activated" in run.text, run.report()
    assert 'firmware.json.sig is not a good "rover-bundle" signature' in run.text, run.report()
    assert current_release(host) == good
    assert leftovers(host) == []
