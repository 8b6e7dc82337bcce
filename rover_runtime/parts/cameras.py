"""CameraPart: one camera's newest frame into the cycle, or a fault saying why there is none."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from rover_runtime.camera import Camera
from rover_runtime.parts import image_key
from rover_runtime.vehicle import BasePart, Cycle


class CameraPart(BasePart):
    """Wraps a `Camera` (its capture thread). Faults when the camera is disconnected (a failed open or read:
    at once, not when its last frame has aged) or its newest frame is older than `max_age_s`."""

    def __init__(self, camera: Camera, max_age_s: float) -> None:
        self.camera = camera
        self.name = f"cameras.{camera.name}"
        self.writes = (image_key(camera.name),)
        self.max_age_s = max_age_s
        self._age: float | None = None

    def start(self) -> None:
        self.camera.connect()

    def update(self, cycle: Cycle) -> None:
        name = self.camera.name
        stamp = self.camera.latest_timestamp()
        self._age = None if stamp is None else cycle.now - stamp
        connected, frames, last_error = self.camera.health
        if not connected and frames:
            cycle.fault(f"camera {name} lost: {last_error or 'disconnected'}")
            return
        if self._age is None:
            cycle.fault(f"camera {name}: no frame yet" + (f" ({last_error})" if last_error else ""))
            return
        if self._age > self.max_age_s:
            cycle.fault(f"camera {name} stale: newest frame {self._age:.2f}s old (max {self.max_age_s:g}s)")
            return
        frame = self.camera.read_latest(self.max_age_s, cycle.now)
        if frame is not None:
            cycle.values[image_key(name)] = frame

    def status(self) -> dict[str, Any]:
        stamp = self.camera.latest_timestamp()
        age = None if stamp is None else max(0.0, time.monotonic() - stamp)
        return {
            **dataclasses.asdict(self.camera.stats),
            "source": self.camera.source.name,
            "frame_age_s": None if age is None else round(age, 3),
        }

    def stop(self) -> None:
        self.camera.disconnect()
