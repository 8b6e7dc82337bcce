"""TransmitterPart: the RC transmitter is in charge. While its switch says manual (or its signal is lost and
the firmware holds neutral) the Pi is not driving: a hold, not a fault (nothing is wrong with the Pi, and the
policy keeps running so autopilot resumes at once). The mode is reported in the status."""

from __future__ import annotations

import logging
import time
from typing import Any

from rover_runtime.parts import CAR_MODE, CAR_TRANSMITTER
from rover_runtime.vehicle import BasePart, Cycle

log = logging.getLogger(__name__)


class TransmitterPart(BasePart):
    name = "rc"
    reads = (CAR_MODE, CAR_TRANSMITTER)

    def __init__(self) -> None:
        self.mode: str | None = None
        self.in_charge = False
        self._since = time.monotonic()
        self.handovers = 0  # times the transmitter took the car

    def update(self, cycle: Cycle) -> None:
        mode = cycle.values.get(CAR_MODE)
        in_charge = bool(cycle.values.get(CAR_TRANSMITTER))
        if mode != self.mode:
            log.info("transmitter mode: %s", mode or "unknown")
            self.mode = mode
        if in_charge != self.in_charge:
            self.in_charge, self._since = in_charge, cycle.now
            if in_charge:
                self.handovers += 1
                log.warning("the transmitter has the car (%s): the Pi is not driving", mode or "?")
            else:
                log.info("the transmitter hands the car to the Pi (%s)", mode or "?")
        if in_charge:
            cycle.hold(f"transmitter in charge: {mode or 'receiver'}")

    def status(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "in_charge": self.in_charge,
            "for_s": round(time.monotonic() - self._since, 3),
            "handovers": self.handovers,
        }
