"""The parts declare what they read and write, and the vehicle refuses, when it is built, a part that reads a
value no earlier part writes (it would read None every cycle, silently).

Generated: the runtime's real compositions (build_vehicle) for 1-3 cameras, several state vectors, with and
without the black box; each builds, and moving any reader in front of the part that writes what it reads is
refused naming both. BasePart's defaults do nothing (and a part without update() says so)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from rover_runtime.camera import Camera, SyntheticSource
from rover_runtime.config import load_config, make_serial_link
from rover_runtime.drive import build_vehicle
from rover_runtime.policy import StubPolicy
from rover_runtime.vehicle import BasePart, Cycle, Part, Vehicle, WiringError, check_wiring

CAMERAS = (("front",), ("front", "rear"), ("front", "left", "right"))
STATES: tuple[tuple[str, ...], ...] = ((), ("steering", "throttle"), ("throttle", "steering", "speed_mps"))


def _vehicle(tmp_path: Path, cameras: tuple[str, ...], state: tuple[str, ...], record: bool) -> Vehicle:
    overrides: dict[str, Any] = {
        "camera.source": "synthetic",
        "serial.port": str(tmp_path / "tty"),
        "metrics.path": "",
        "policy.stub": True,
        "record.enabled": record,
        "record.directory": str(tmp_path / "drives"),
    }
    config = load_config(None, overrides)
    policy = StubPolicy(
        chunk_size=10,
        latency_s=0.001,
        image_keys=tuple(f"observation.images.{name}" for name in cameras),
        state_names=state,
    )
    cams = [Camera(SyntheticSource(32, 24, fps=30), name=name) for name in cameras]
    return build_vehicle(config, policy, make_serial_link(config.serial), cameras=cams)


COMPOSITIONS = list(itertools.product(CAMERAS, STATES, (False, True)))


@pytest.mark.parametrize(("cameras", "state", "record"), COMPOSITIONS)
def test_every_composition_is_wired_and_any_reader_moved_before_its_writer_is_refused(
    tmp_path: Path, cameras: tuple[str, ...], state: tuple[str, ...], record: bool
) -> None:
    parts = _vehicle(tmp_path, cameras, state, record).parts
    names = [part.name for part in parts]
    assert [f"cameras.{c}" for c in cameras] == [n for n in names if n.startswith("cameras.")]
    moved = 0
    for i, reader in enumerate(parts):
        for key in reader.reads:
            writer = next(j for j, part in enumerate(parts[:i]) if key in part.writes)
            if any(key in part.writes for part in parts[:writer]):
                continue
            reordered: list[Part] = [*parts[:writer], reader, *(p for p in parts[writer:] if p is not reader)]
            with pytest.raises(WiringError) as refused:
                check_wiring(reordered)
            # The refusal names the reader's first value that nothing before it writes now, and its writer.
            earlier = {k for part in parts[:writer] for k in part.writes}
            first = next(k for k in reader.reads if k not in earlier)
            first_writer = next(part.name for part in parts if first in part.writes)
            assert str(refused.value) == (
                f"part {reader.name!r} reads {first!r}, which no earlier part writes "
                f"(part {first_writer!r} writes it, after it)"
            )
            moved += 1
    assert moved >= len(cameras) + 3  # at least: each image, the state, the action, the command


class _Reads(BasePart):
    name = "reader"
    reads = ("image.nowhere",)

    def update(self, cycle: Cycle) -> None:
        cycle.values.get("image.nowhere")


def test_a_value_no_part_writes_and_a_repeated_name_are_refused(tmp_path: Path) -> None:
    parts = _vehicle(tmp_path, ("front",), (), False).parts
    with pytest.raises(WiringError, match=r"part 'reader' reads 'image.nowhere', .* \(no part writes it\)"):
        check_wiring([*parts, _Reads()])
    with pytest.raises(WiringError, match="two parts share a name"):
        check_wiring([*parts, parts[0]])


def test_base_part_defaults_do_nothing_and_update_is_required() -> None:
    part = BasePart()
    part.start()
    part.stop()
    assert part.status() == {}
    assert (part.reads, part.writes) == ((), ())
    with pytest.raises(NotImplementedError, match="has no update"):
        part.update(Cycle(0, 0.0))
