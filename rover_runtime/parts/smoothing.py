"""SmoothingPart: the policy's action -> the command, without jumps.

- Steering moves at most `steering_rate` per second (normalized units; -1..1 is 2 units).
- Throttle grows in magnitude at most `throttle_rate` per second; slowing down is never delayed.
- After every fault (and at start) the throttle's magnitude is also capped by a ramp from 0 to full over
  `ramp_s` seconds from the first faultless cycle.
- The limits start from what the car outputs now (`car.steering`, `car.throttle`) whenever the Pi was not in
  control on the previous cycle (a fault, a hold, the transmitter's manual mode), so taking over from the
  driver continues from the driver's commands. While the Pi is in control they start from the last command.
- A fault or a hold gives neutral at once: stopping is never smoothed. Except while the transmitter has the
  car: then the command mirrors what the car outputs (the driver's sticks), so that when the switch hands
  the car to the Pi the firmware starts from the driver's commands rather than from neutral.
A rate of 0 (or ramp_s 0) turns that limit off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rover_runtime.parts import CAR_STEERING, CAR_THROTTLE, CAR_TRANSMITTER, COMMAND, PILOT_ACTION
from rover_runtime.vehicle import BasePart, Cycle


@dataclass(frozen=True)
class SmoothingSettings:
    steering_rate: float  # per second; 0 = unlimited
    throttle_rate: float  # per second, magnitude increases only; 0 = unlimited
    ramp_s: float  # throttle ramp after a fault; 0 = none
    period_s: float


def _toward(current: float, target: float, max_step: float) -> float:
    if max_step <= 0:
        return target
    return current + max(-max_step, min(max_step, target - current))


class SmoothingPart(BasePart):
    name = "smoothing"
    reads = (PILOT_ACTION, CAR_STEERING, CAR_THROTTLE, CAR_TRANSMITTER)
    writes = (COMMAND,)

    def __init__(self, settings: SmoothingSettings) -> None:
        self.settings = settings
        self._in_control = False
        self._since: float | None = None  # start of the current faultless stretch
        self.command = (0.0, 0.0)
        self.limited_cycles = 0  # cycles where the command differs from the policy's action

    def update(self, cycle: Cycle) -> None:
        action = cycle.values.get(PILOT_ACTION)
        if cycle.faults or cycle.holds or action is None:
            if cycle.faults:
                self._since = None  # the ramp starts again after every fault
            self._in_control = False
            self.command = (0.0, 0.0)
            if not cycle.faults and cycle.values.get(CAR_TRANSMITTER):
                self.command = (
                    float(cycle.values.get(CAR_STEERING, 0.0)),
                    float(cycle.values.get(CAR_THROTTLE, 0.0)),
                )
            cycle.values[COMMAND] = self.command
            return
        if self._since is None:
            self._since = cycle.now
        if self._in_control:
            steering, throttle = self.command
        else:
            steering = float(cycle.values.get(CAR_STEERING, 0.0))
            throttle = float(cycle.values.get(CAR_THROTTLE, 0.0))
        s = self.settings
        target_steering, target_throttle = action
        steering = _toward(steering, target_steering, s.steering_rate * s.period_s)
        if target_throttle * throttle < 0:
            throttle = 0.0  # reversing: slowing down to zero is at once, the rest is a speed-up
        if abs(target_throttle) > abs(throttle):
            throttle = _toward(throttle, target_throttle, s.throttle_rate * s.period_s)
        else:
            throttle = target_throttle  # slowing down: at once
        if s.ramp_s > 0:
            cap = min(1.0, (cycle.now - self._since) / s.ramp_s)
            throttle = max(-cap, min(cap, throttle))
        self.command = (steering, throttle)
        if self.command != (target_steering, target_throttle):
            self.limited_cycles += 1
        self._in_control = True
        cycle.values[COMMAND] = self.command

    def status(self) -> dict[str, Any]:
        return {
            "command": [round(v, 4) for v in self.command],
            "limited_cycles": self.limited_cycles,
            "steering_rate": self.settings.steering_rate,
            "throttle_rate": self.settings.throttle_rate,
            "ramp_s": self.settings.ramp_s,
        }
