"""simfleet's transmitter: the pulses it writes are what the firmware simulator reads as the driver's
mode and sticks (the real simulator on a pty, no Pi talking to it)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rover_runtime.firmware_sim import FirmwareLimits, FirmwareSimulator
from simfleet.errors import SimFleetError
from simfleet.fleet import (
    INOTIFY_INSTANCES_PER_HOST,
    Transmitter,
    ensure_inotify_instances,
    set_transmitter,
    write_transmitter,
)
from simfleet.state import FleetState, HostState, save_state


def wait_for_mode(sim: FirmwareSimulator, mode: str, timeout: float = 3.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = sim.snapshot()
        if snap["mode"] == mode:
            return snap
        time.sleep(0.02)
    raise AssertionError(f"the firmware never reported {mode}: {sim.snapshot()}")


def test_the_simulated_driver_takes_over_and_hands_back(tmp_path: Path) -> None:
    rc = tmp_path / "rc.json"
    write_transmitter(rc, Transmitter("autopilot"))
    sim = FirmwareSimulator(
        pty_link=tmp_path / "tty",
        log_file=None,
        status_file=None,
        limits=FirmwareLimits(rc_receiver=True),
        rc_file=rc,
    ).start()
    try:
        wait_for_mode(sim, "autopilot")
        write_transmitter(rc, Transmitter("manual", steering=0.6, throttle=0.2))
        snap = wait_for_mode(sim, "manual")
        assert (snap["steer_us"], snap["throttle_us"]) == (1800, 1600)  # the sticks, passed through
        write_transmitter(rc, Transmitter("autopilot_neutral"))
        wait_for_mode(sim, "autopilot_neutral_fallback")
        write_transmitter(rc, Transmitter("off"))
        wait_for_mode(sim, "rc_lost")
        assert not rc.exists()
    finally:
        sim.stop()


@pytest.mark.parametrize(
    ("transmitter", "message"),
    [
        (
            lambda: Transmitter("drift"),
            "transmitter mode 'drift': choose manual, autopilot, autopilot_neutral or off",
        ),
        (lambda: Transmitter("manual", steering=1.5), "transmitter steering 1.5: must be within -1..1"),
    ],
)
def test_bad_transmitter_settings_are_refused(transmitter: object, message: str) -> None:
    with pytest.raises(SimFleetError, match=message):
        transmitter()  # type: ignore[operator]


def test_the_inotify_instance_limit_is_raised_for_a_large_fleet_and_never_lowered(tmp_path: Path) -> None:
    """50 cars' systemds need more inotify instances than Linux's default 128 (car 26 failed to boot)."""
    limit = tmp_path / "max_user_instances"
    limit.write_text("128\n")
    ensure_inotify_instances(50, limit)
    assert int(limit.read_text()) == 128 + 50 * INOTIFY_INSTANCES_PER_HOST
    limit.write_text("100000\n")
    ensure_inotify_instances(50, limit)
    assert int(limit.read_text()) == 100000


def _fleet(tmp_path: Path, receivers: list[bool]) -> FleetState:
    hosts = [
        HostState(
            name=f"car{i}",
            machine=f"t-car{i}",
            port=2400 + i,
            release="trixie",
            image="",
            root="",
            host_key_pub="",
            serial_controller="",
            serial_host="",
            firmware_status="",
            firmware_log="",
            nspawn_log="",
            socat_log="",
            rc_file=str(tmp_path / f"car{i}-rc.json") if receiver else "",
        )
        for i, receiver in enumerate(receivers, start=1)
    ]
    state = FleetState("t", "amd64", 2401, ["trixie"], 0.0, "", "", "", hosts=hosts)
    save_state(state)
    return state


def test_all_sets_every_cars_transmitter_and_one_car_only_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROVER_CACHE", str(tmp_path / "cache"))
    _fleet(tmp_path, [True, True, True])
    assert set_transmitter("t", "all", Transmitter("autopilot")) == ["car1", "car2", "car3"]
    assert all((tmp_path / f"car{i}-rc.json").exists() for i in (1, 2, 3))
    assert set_transmitter("t", "car2", Transmitter("off")) == ["car2"]
    assert [(tmp_path / f"car{i}-rc.json").exists() for i in (1, 2, 3)] == [True, False, True]
    set_transmitter("t", "all", Transmitter("off"))  # parked
    assert not any((tmp_path / f"car{i}-rc.json").exists() for i in (1, 2, 3))


def test_all_refuses_a_fleet_with_a_car_without_a_receiver_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROVER_CACHE", str(tmp_path / "cache"))
    _fleet(tmp_path, [True, False])
    with pytest.raises(SimFleetError, match=r"car2 of fleet 't' has no RC receiver: start it with up"):
        set_transmitter("t", "all", Transmitter("autopilot"))
    assert not (tmp_path / "car1-rc.json").exists()
