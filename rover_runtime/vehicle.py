"""The vehicle: the runtime's parts composed into one fixed-rate loop, in the spirit of Donkeycar's Vehicle.

Parts: every cycle the vehicle calls `update(cycle)` on each part, in the order they were added (the order is
decided in one place, `rover_runtime.drive.build_vehicle`). Parts hand data to later parts through the
cycle's named values (`cycle.values`; the keys are listed in `rover_runtime.parts`) and say, in words:
  - a fault (`cycle.fault(reason)`): the car must not drive now. Later parts see it and the command sent is
    neutral. A failsafe (faults without a break) longer than `unhealthy_after_s` makes the runtime unhealthy:
    the systemd watchdog pings stop, and systemd restarts it;
  - a hold (`cycle.hold(reason)`): the Pi is not driving, but nothing is wrong (the transmitter's manual
    mode, an action queue that ran dry for a moment).
The vehicle keeps the failsafe bookkeeping (entered, left, counted, why), health, the watchdog and the
status snapshot (its own sections plus each part's `status()` under the part's name; a dotted name such as
"cameras.front" nests). It knows nothing of cameras, models or serial lines: a new part (a recorder, an
override) is added where the parts are composed, without touching this loop. The one value the vehicle
reads is `driving` (set by the part that writes the command: the Pi's command reached the car).

Timing: cycle k starts at t0 + k * period on the monotonic clock (no drift: the schedule never moves),
sleeping until shortly before and spinning the last `spin_s`. A cycle whose work ends after the next
cycle's start is a deadline miss; when the loop is more than a period late it skips the lost ticks (each
counted as a miss) instead of bursting. The step number is the tick number, so actions stay aligned with
the time they were planned for.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from rover_runtime.sd_notify import Notifier
from rover_runtime.stats import ms_stats

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.0005
# The value the part that writes commands sets: the Pi's command was written and the car applies it.
DRIVING = "driving"


@dataclass
class Cycle:
    """One control cycle: what the parts hand each other, and what they found wrong."""

    step: int
    now: float  # time.monotonic() when the cycle's work started
    values: dict[str, Any] = field(default_factory=dict)
    faults: list[str] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)

    def fault(self, reason: str) -> None:
        self.faults.append(reason)

    def hold(self, reason: str) -> None:
        self.holds.append(reason)


class Part(Protocol):
    """One piece of the vehicle. `name` is its key in the status snapshot; `reads` and `writes` are the
    cycle values it uses and sets (its wiring, checked when the vehicle is built)."""

    name: str

    @property
    def reads(self) -> tuple[str, ...]: ...
    @property
    def writes(self) -> tuple[str, ...]: ...
    def start(self) -> None: ...
    def update(self, cycle: Cycle) -> None: ...
    def status(self) -> dict[str, Any]: ...
    def stop(self) -> None: ...


class BasePart:
    """A part's defaults: nothing to start, stop or report. A part sets `name`, `reads`, `writes` and
    defines `update`."""

    name: str = ""
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()

    def start(self) -> None:
        """Nothing to open."""

    def update(self, cycle: Cycle) -> None:
        raise NotImplementedError(f"part {self.name!r} has no update()")

    def status(self) -> dict[str, Any]:
        return {}

    def stop(self) -> None:
        """Nothing to close."""


class WiringError(ValueError):
    """Parts that cannot work in this order: a part reads a value no earlier part writes."""


def check_wiring(parts: Sequence[Part]) -> None:
    """Refuses parts whose names repeat, or a part that reads a value no earlier part writes (it would read
    None every cycle)."""
    names = [part.name for part in parts]
    if len(set(names)) != len(names):
        raise WiringError(f"two parts share a name: {names}")
    written: dict[str, str] = {}  # value -> the first part that writes it
    for index, part in enumerate(parts):
        for key in part.reads:
            if key not in written:
                later = [p.name for p in parts[index + 1 :] if key in p.writes]
                where = f" (part {later[0]!r} writes it, after it)" if later else " (no part writes it)"
                raise WiringError(f"part {part.name!r} reads {key!r}, which no earlier part writes{where}")
        for key in part.writes:
            written.setdefault(key, part.name)


@dataclass(frozen=True)
class VehicleSettings:
    rate_hz: float
    spin_s: float
    unhealthy_after_s: float
    realtime_priority: int = 0


@dataclass
class TimingRecord:
    """Every cycle's timings, kept only when asked (benchmarks)."""

    wake: list[float] = field(default_factory=list)  # monotonic time each cycle started its work
    work: list[float] = field(default_factory=list)  # seconds of work in the cycle
    neutral: list[bool] = field(default_factory=list)  # the cycle had a fault (neutral sent)


class Vehicle:
    def __init__(
        self,
        parts: Sequence[Part],
        settings: VehicleSettings,
        *,
        notifier: Notifier | None = None,
        info: dict[str, Any] | None = None,
        record_timings: bool = False,
    ) -> None:
        check_wiring(parts)
        self.parts = list(parts)
        self.settings = settings
        self.period = 1.0 / settings.rate_hz
        self.notifier = notifier or Notifier(environ={})
        self.info = dict(info or {})  # static sections of the snapshot (release, bundle)
        self.record = TimingRecord() if record_timings else None
        self._stop = threading.Event()
        window = max(100, int(settings.rate_hz * 10))
        self._period_errors: deque[float] = deque(maxlen=window)
        self._work_times: deque[float] = deque(maxlen=window)
        self.started_at = time.monotonic()
        self.cycles = 0
        self.deadline_misses = 0
        self.failsafe_count = 0
        self.failsafe_cycles = 0
        self.failsafe_reasons: tuple[str, ...] = ("starting",)
        self.holds: tuple[str, ...] = ()
        self._failsafe_since: float | None = time.monotonic()
        self.driving = False
        self._last_driving_at: float | None = None  # when a cycle last drove (for `driving_age_s`)
        self.ready = False

    # --- control -----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def failsafe_active(self) -> bool:
        return self._failsafe_since is not None

    def healthy(self, now: float) -> bool:
        since = self._failsafe_since
        return since is None or now - since <= self.settings.unhealthy_after_s

    def run(self, max_cycles: int | None = None) -> None:
        """Starts the parts, runs until request_stop() (or max_cycles), stops the parts in reverse order
        (the part that owns the serial link leaves the car neutral)."""
        started: list[Part] = []
        switch_interval = sys.getswitchinterval()
        try:
            for part in self.parts:
                part.start()
                started.append(part)
            # A thread waiting for the GIL gets it after at most the switch interval (default 5 ms):
            # shorten it so the loop wakes on time while the camera and inference threads run Python code.
            sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL_S))
            if self.settings.realtime_priority:
                _set_realtime(self.settings.realtime_priority)
            self.ready = True
            self.notifier.ready(f"driving at {self.settings.rate_hz:g} Hz")
            self._loop(max_cycles)
        finally:
            sys.setswitchinterval(switch_interval)
            self.notifier.stopping()
            self.driving = False
            self._failsafe_since = self._failsafe_since or time.monotonic()
            for part in reversed(started):
                try:
                    part.stop()
                except Exception:
                    log.exception("part %s failed to stop", part.name)

    def _loop(self, max_cycles: int | None) -> None:
        period = self.period
        spin = self.settings.spin_s
        t0 = time.monotonic()
        step = 0
        previous_wake: float | None = None
        while not self._stop.is_set() and (max_cycles is None or self.cycles < max_cycles):
            _wait_until(t0 + step * period, spin)
            wake = time.monotonic()
            cycle = Cycle(step, wake)
            for part in self.parts:
                part.update(cycle)
            self._account(cycle)
            end = time.monotonic()
            self.cycles += 1
            if previous_wake is not None:
                self._period_errors.append(abs(wake - previous_wake - period))
            previous_wake = wake
            self._work_times.append(end - wake)
            if self.record is not None:
                self.record.wake.append(wake)
                self.record.work.append(end - wake)
                self.record.neutral.append(bool(cycle.faults))
            self.notifier.watchdog(end, self.healthy(end))
            step += 1
            next_target = t0 + step * period
            if end > next_target:
                self.deadline_misses += 1
                late_ticks = math.floor((end - next_target) / period)
                if late_ticks > 0:
                    self.deadline_misses += late_ticks
                    step += late_ticks

    def _account(self, cycle: Cycle) -> None:
        """The failsafe bookkeeping for one finished cycle."""
        if cycle.faults:
            kinds = tuple(_kind(r) for r in cycle.faults)
            if self._failsafe_since is None:
                self._failsafe_since = cycle.now
                self.failsafe_count += 1
                log.warning("failsafe #%d: neutral (%s)", self.failsafe_count, "; ".join(cycle.faults))
            elif kinds != tuple(_kind(r) for r in self.failsafe_reasons):
                log.warning("failsafe: still neutral (%s)", "; ".join(cycle.faults))
            self.failsafe_reasons = tuple(cycle.faults)
            self.failsafe_cycles += 1
        elif self._failsafe_since is not None:
            log.info("failsafe cleared after %.2fs", cycle.now - self._failsafe_since)
            self._failsafe_since = None
            self.failsafe_reasons = ()
        if tuple(cycle.holds) != self.holds and any(not h.startswith("no action") for h in cycle.holds):
            log.info("not driving: %s", "; ".join(cycle.holds))
        self.holds = tuple(cycle.holds)
        self.driving = bool(cycle.values.get(DRIVING)) and not cycle.faults and not cycle.holds
        if self.driving:
            self._last_driving_at = cycle.now

    # --- status ------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "time_unix": time.time(),
            "uptime_s": round(now - self.started_at, 3),
            "ready": self.ready,
            "healthy": self.healthy(now),
            "driving": self.driving,
            # Seconds since a cycle last drove (null: never): a car in a brief failsafe is still on the road.
            "driving_age_s": None if self._last_driving_at is None else round(now - self._last_driving_at, 3),
            "loop": {
                "rate_hz_target": self.settings.rate_hz,
                "cycles": self.cycles,
                "deadline_misses": self.deadline_misses,
                "period_error_ms": ms_stats(list(self._period_errors)),
                "work_ms": ms_stats(list(self._work_times)),
            },
            "failsafe": {
                "active": self._failsafe_since is not None,
                # When the current failsafe began (the cycle that went neutral), as Unix time; null if none.
                "since_unix": None
                if self._failsafe_since is None
                else round(time.time() - (now - self._failsafe_since), 3),
                "count": self.failsafe_count,
                "cycles": self.failsafe_cycles,
                "reasons": list(self.failsafe_reasons),
                "holds": list(self.holds),
            },
            **self.info,
        }
        for part in self.parts:
            section, _, sub = part.name.partition(".")
            if sub:
                out.setdefault(section, {})[sub] = part.status()
            else:
                out[section] = part.status()
        return out


def _kind(reason: str) -> str:
    return reason.split(":", maxsplit=1)[0]


def _set_realtime(priority: int) -> None:
    """SCHED_FIFO for the calling thread only (Linux applies pid 0 to the calling thread)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
        log.info("control loop thread: SCHED_FIFO priority %d", priority)
    except (OSError, AttributeError) as exc:
        log.warning("control.realtime_priority %d refused (%s); normal scheduling", priority, exc)


def _wait_until(target: float, spin_s: float) -> None:
    """Sleep until `spin_s` before `target`, then spin: wake-up jitter of sleep() stays out of the timing."""
    remaining = target - time.monotonic()
    if remaining > spin_s:
        time.sleep(remaining - spin_s)
    while time.monotonic() < target:
        pass
