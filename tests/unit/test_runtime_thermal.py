"""Thermal state: vcgencmd when present, else /sys/class/thermal, else None."""

from __future__ import annotations

from pathlib import Path

from rover_runtime.thermal import read_thermal


def test_sysfs_zones_give_the_hottest(tmp_path: Path) -> None:
    for i, millideg in enumerate(["45250", "51000", "garbage"]):
        zone = tmp_path / f"thermal_zone{i}"
        zone.mkdir()
        (zone / "temp").write_text(millideg + "\n")
    state = read_thermal(vcgencmd=None, thermal_root=tmp_path)
    assert state.temperature_c == 51.0
    assert state.source == "sysfs"
    assert state.throttled is None
    assert state.to_dict()["throttled_now"] is None


def test_nothing_available_gives_none(tmp_path: Path) -> None:
    state = read_thermal(vcgencmd="no-such-vcgencmd-here", thermal_root=tmp_path)
    assert (state.temperature_c, state.throttled, state.source) == (None, None, None)


def test_vcgencmd_output_is_parsed(tmp_path: Path) -> None:
    # vcgencmd exists only on a Raspberry Pi: a stand-in printing what the real one prints.
    tool = tmp_path / "vcgencmd"
    tool.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  measure_temp) echo "temp=63.4\'C" ;;\n'
        "  get_throttled) echo throttled=0x50005 ;;\n"
        "esac\n"
    )
    tool.chmod(0o755)
    state = read_thermal(vcgencmd=str(tool), thermal_root=tmp_path)
    assert state.temperature_c == 63.4
    assert state.throttled == 0x50005
    assert state.source == "vcgencmd"
    assert state.throttled_now is True
    flags = state.to_dict()["throttle_flags"]
    assert flags == ["under_voltage", "throttled", "under_voltage_occurred", "throttling_occurred"]
