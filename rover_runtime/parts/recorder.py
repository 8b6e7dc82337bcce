"""RecorderPart: the black box. While the transmitter's switch selects a driving mode (manual or autopilot,
or the car has no receiver) it hands every step to the recorder's writer thread: the frames, the state, the
policy's action, the command sent, what the car applied, the mode and the faults. An episode begins when a
driving mode begins and ends `end_after_s` after it ends (a brief signal loss stays in the episode). The part
only queues references (a few microseconds); encoding and writing happen in the recorder's thread
(`rover_runtime.recording`, writing with `rover_runtime.episode_writer`), which drops steps rather than delay
the loop."""

from __future__ import annotations

import time
from typing import Any

from rover_runtime.episode_format import EpisodeInfo, StepRecord
from rover_runtime.parts import (
    CAR_MODE,
    CAR_STEERING,
    CAR_THROTTLE,
    CAR_TRANSMITTER,
    COMMAND_SENT,
    PILOT_ACTION,
    PILOT_LATENCY_MS,
    STATE,
    image_key,
)
from rover_runtime.recording import Recorder
from rover_runtime.vehicle import BasePart, Cycle

# protocol.MODE_NAMES in which the car is being driven, by the driver or by the Pi.
RECORDING_MODES = ("pi_only", "manual", "autopilot", "autopilot_neutral_fallback")


class RecorderPart(BasePart):
    name = "recorder"

    def __init__(self, recorder: Recorder, info: EpisodeInfo, end_after_s: float) -> None:
        self.recorder = recorder
        self.info = info
        self.reads = (
            CAR_MODE, CAR_STEERING, CAR_THROTTLE, CAR_TRANSMITTER, STATE, PILOT_ACTION, PILOT_LATENCY_MS,
            COMMAND_SENT, *(image_key(camera.name) for camera in info.cameras),
        )  # fmt: skip
        self.end_after_s = end_after_s
        self._open = False
        self._last_driving_mode_at: float | None = None

    def start(self) -> None:
        self.recorder.start()

    def update(self, cycle: Cycle) -> None:
        values = cycle.values
        mode = values.get(CAR_MODE)
        if mode in RECORDING_MODES:
            self._last_driving_mode_at = cycle.now
            if not self._open:
                self.recorder.begin(self.info)
                self._open = True
        elif self._open and (
            self._last_driving_mode_at is None or cycle.now - self._last_driving_mode_at > self.end_after_s
        ):
            self.recorder.end("mode")
            self._open = False
        if not self._open:
            return
        steering, throttle = values.get(CAR_STEERING), values.get(CAR_THROTTLE)
        images = {}
        for camera in self.info.cameras:
            frame = values.get(image_key(camera.name))
            images[camera.name] = None if frame is None else frame.image
        self.recorder.record(
            StepRecord(
                step=cycle.step,
                monotonic=cycle.now,
                wall=time.time(),
                mode=mode,
                # The driver's sticks drive: the firmware says the transmitter decides (its ack, at once) in
                # manual mode (the R line, within 100 ms). A lost signal is the firmware's neutral, and an
                # autopilot mode not yet updated by the R line is not a takeover.
                driver=bool(values.get(CAR_TRANSMITTER)) and mode == "manual",
                state=values.get(STATE),
                policy_action=values.get(PILOT_ACTION),
                command=values.get(COMMAND_SENT),
                applied=None if steering is None or throttle is None else (steering, throttle),
                faults=tuple(cycle.faults),
                images=images,
                latency_ms=values.get(PILOT_LATENCY_MS),
            )
        )

    def status(self) -> dict[str, Any]:
        return self.recorder.snapshot()

    def stop(self) -> None:
        self.recorder.stop()
