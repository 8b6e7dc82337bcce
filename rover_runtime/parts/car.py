"""The car's Arduino, as two parts around one `SerialLink`: CarInput reads what the car reports at the
start of a cycle, CarOutput writes the cycle's command at its end.

CarInput faults whenever the link cannot be trusted to drive (`SerialLink.faults`: not connected, firmware
not identified or speaking another protocol, acknowledgements too old, the firmware's own failsafe), and
when the firmware lacks a sensor the policy's state needs. CarOutput counts a command as sent only when it
was written, and sets `driving` only when it was the Pi's command, it moves the car, and the firmware's last
word says it applies the Pi's commands.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from rover_runtime import protocol
from rover_runtime.parts import (
    CAR_BATTERY,
    CAR_MODE,
    CAR_STEERING,
    CAR_THROTTLE,
    CAR_TRANSMITTER,
    CAR_WHEEL_SPEED,
    COMMAND,
    COMMAND_SENT,
)
from rover_runtime.serial_link import SerialLink
from rover_runtime.vehicle import DRIVING, BasePart, Cycle

log = logging.getLogger(__name__)

NEUTRAL_EPS = 1e-3


def missing_features(needed: dict[int, str], firmware: protocol.Version) -> list[str]:
    """What the policy needs (protocol.FEATURE_* -> why) that this firmware does not have fitted, in words."""
    return [
        f"{why}, but the firmware ({firmware.describe()}) has none fitted"
        for bit, why in needed.items()
        if not firmware.features & bit
    ]


class CarInput(BasePart):
    """Polls the link, publishes what the car outputs and senses, and faults when the link is not sound.

    `needed_features`: protocol.FEATURE_* bits the policy's inputs need (e.g. the wheel speed sensor); a
    firmware that identifies itself without one is a fault naming it."""

    name = "serial"
    writes = (CAR_STEERING, CAR_THROTTLE, CAR_TRANSMITTER, CAR_MODE, CAR_WHEEL_SPEED, CAR_BATTERY)

    def __init__(self, link: SerialLink, needed_features: dict[int, str] | None = None) -> None:
        self.link = link
        self.needed_features = dict(needed_features or {})
        self._last_faults: list[str] = []

    def start(self) -> None:
        if not self.link.open():
            log.warning("serial port %s not available yet; retrying", self.link.config.port)

    def update(self, cycle: Cycle) -> None:
        link = self.link
        link.poll()
        faults = link.faults(cycle.now)
        firmware = link.firmware
        if firmware is not None and not faults:
            faults += [f"serial: {m}" for m in missing_features(self.needed_features, firmware)]
        for fault in faults:
            cycle.fault(fault)
        self._last_faults = faults
        stats = link.stats
        ack = stats.last_ack
        steering = throttle = 0.0
        if ack is not None:
            steering = protocol.us_to_normalized(ack.steer_us)
            throttle = protocol.us_to_normalized(ack.throttle_us)
        cycle.values[CAR_STEERING] = steering
        cycle.values[CAR_THROTTLE] = throttle
        cycle.values[CAR_TRANSMITTER] = ack is not None and bool(ack.flags & protocol.FLAG_RC)
        rc = stats.last_rc
        cycle.values[CAR_MODE] = rc.mode_name if rc is not None else None
        features = firmware.features if firmware is not None else 0
        wheel = rc.wheel_mmps / 1000.0 if rc is not None and features & protocol.FEATURE_WHEEL else None
        battery = rc.battery_mv / 1000.0 if rc is not None and features & protocol.FEATURE_BATTERY else None
        cycle.values[CAR_WHEEL_SPEED] = wheel
        cycle.values[CAR_BATTERY] = battery

    def status(self) -> dict[str, Any]:
        stats = self.link.stats
        out = dataclasses.asdict(stats)
        last_rx = stats.last_rx_monotonic
        last_ack = stats.last_ack_monotonic
        now = time.monotonic()
        out["last_rx_age_s"] = None if last_rx is None else round(max(0.0, now - last_rx), 3)
        out["last_ack_age_s"] = None if last_ack is None else round(max(0.0, now - last_ack), 3)
        out["faults"] = list(self._last_faults)
        out["port"] = self.link.config.port
        return out

    def stop(self) -> None:
        self.link.close()  # sends neutral first


class CarOutput(BasePart):
    """Writes the cycle's command (neutral when a part found a fault) and says whether the Pi drives.

    `neutral_only` (benchmarks): every part does its real work but the line written is always neutral."""

    name = "command"
    reads = (COMMAND, CAR_TRANSMITTER)
    writes = (COMMAND_SENT, DRIVING)

    def __init__(self, link: SerialLink, *, neutral_only: bool = False) -> None:
        self.link = link
        self.neutral_only = neutral_only
        self.steering = 0.0
        self.throttle = 0.0
        self.sent = False

    def start(self) -> None:
        self.link.send_neutral()

    def update(self, cycle: Cycle) -> None:
        if cycle.faults or self.neutral_only:
            written = self.link.send_neutral()
            sent: tuple[float, float] | None = (0.0, 0.0) if written else None
        else:
            steering, throttle = cycle.values.get(COMMAND, (0.0, 0.0))
            sent = self.link.send_command(steering, throttle)
        cycle.values[COMMAND_SENT] = sent
        self.sent = sent is not None
        if sent is not None:
            self.steering, self.throttle = sent
        applies = not cycle.values.get(CAR_TRANSMITTER, False)
        cycle.values[DRIVING] = (
            sent is not None
            and applies
            and not cycle.faults
            and not cycle.holds
            and abs(sent[1]) > NEUTRAL_EPS
        )

    def status(self) -> dict[str, Any]:
        return {
            "steering": self.steering,
            "throttle": self.throttle,
            "sent": self.sent,
            "unsent": self.link.stats.unsent_commands,
            "neutral_only": self.neutral_only,
        }
