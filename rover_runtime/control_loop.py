"""The fixed-rate control loop: camera -> (worker) policy -> action queue -> serial, with failsafes.

Timing: cycle k starts at t0 + k * period on the monotonic clock (no drift: the schedule never moves),
sleeping until shortly before and spinning the last `spin_s`. A cycle whose work ends after the next
cycle's start is a deadline miss; when the loop is more than a period late it skips the lost ticks (each
counted as a miss) instead of bursting. The step number is the tick number, so actions stay aligned with
the time they were planned for.

Each cycle: pick up a finished inference, poll the serial link, decide the command, send it, and if the
action queue asks for it and the worker is idle, submit the newest camera frame with the state just sent.
Failsafe: neutral (and a log line) on any of
  - camera stale: the newest frame is older than camera.max_frame_age_s (or there is none);
  - inference stalled: the running inference is older than failsafe.inference_timeout_s;
  - inference failed: the last inference raised (counted; the next one is tried on the next cycle);
  - no action: the queue has no action for this step (start-up, or inference too slow for the chunk).
On entering the failsafe the queue is emptied and results of inferences submitted before it are dropped,
so the car only moves again on a plan made after the fault cleared.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rover_runtime.action_queue import ActionQueue, ChunkQueue, TemporalEnsembler
from rover_runtime.camera import Camera
from rover_runtime.config import RuntimeConfig
from rover_runtime.inference_worker import InferenceRequest, InferenceWorker, percentile
from rover_runtime.policy import Policy
from rover_runtime.sd_notify import Notifier

log = logging.getLogger(__name__)

NEUTRAL_EPS = 1e-3
SWITCH_INTERVAL_S = 0.0005


class CommandLink(Protocol):
    """What the loop needs of `rover_runtime.serial_link.SerialLink`."""

    def send_command(self, steering: float, throttle: float) -> tuple[float, float]: ...
    def send_neutral(self) -> None: ...
    def poll(self) -> None: ...
    def close(self) -> None: ...
    @property
    def stats(self) -> Any: ...


@dataclass
class TimingRecord:
    """Every cycle's timings, kept only when asked (benchmarks)."""

    wake: list[float] = field(default_factory=list)  # monotonic time each cycle started its work
    work: list[float] = field(default_factory=list)  # seconds of work in the cycle
    neutral: list[bool] = field(default_factory=list)  # the cycle sent neutral (failsafe)


def make_action_queue(config: RuntimeConfig, policy: Policy) -> ActionQueue:
    info = policy.info
    if config.control.mode == "ensemble":
        coeff = info.temporal_ensemble_coeff
        return TemporalEnsembler(
            config.control.temporal_ensemble_coeff if coeff is None else coeff, info.chunk_size
        )
    return ChunkQueue(min(config.control.n_action_steps or info.n_action_steps, info.chunk_size))


class ControlLoop:
    def __init__(
        self,
        config: RuntimeConfig,
        policy: Policy,
        camera: Camera,
        link: CommandLink,
        *,
        notifier: Notifier | None = None,
        record_timings: bool = False,
    ) -> None:
        self.config = config
        self.policy = policy
        self.camera = camera
        self.link = link
        self.notifier = notifier or Notifier(environ={})
        self.queue = make_action_queue(config, policy)
        self.worker = InferenceWorker(policy)
        self.period = config.control.period_s
        self.record = TimingRecord() if record_timings else None
        self._stop = threading.Event()
        window = max(100, int(config.control.rate_hz * 10))
        self._period_errors: deque[float] = deque(maxlen=window)
        self._work_times: deque[float] = deque(maxlen=window)
        self.started_at = time.monotonic()
        self.cycles = 0
        self.deadline_misses = 0
        self.failsafe_count = 0
        self.failsafe_cycles = 0
        self.inference_errors = 0
        self.inference_stalls = 0
        self.dropped_results = 0
        self.failsafe_reasons: tuple[str, ...] = ("starting",)
        self._failsafe_since: float | None = time.monotonic()
        self._discard_before = 0.0
        self._inference_failed = False
        self._stall_counted = False
        self._last_error_log = float("-inf")
        self.command = (0.0, 0.0)
        self.ready = False
        self.release = release_info(config.source)

    # --- control -----------------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def driving(self) -> bool:
        return self._failsafe_since is None and abs(self.command[1]) > NEUTRAL_EPS

    def healthy(self, now: float) -> bool:
        since = self._failsafe_since
        return since is None or now - since <= self.config.failsafe.unhealthy_after_s

    def run(self, max_cycles: int | None = None) -> None:
        """Run until request_stop() (or max_cycles); always leaves the car neutral."""
        self.worker.start()
        period = self.period
        spin = self.config.control.spin_s
        # A thread waiting for the GIL gets it after at most the switch interval (default 5 ms): shorten it
        # so the loop wakes on time while the camera and inference threads run Python code.
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(switch_interval, SWITCH_INTERVAL_S))
        if self.config.control.realtime_priority:
            _set_realtime(self.config.control.realtime_priority)
        try:
            self.link.send_neutral()
            self.ready = True
            self.notifier.ready(f"driving at {self.config.control.rate_hz:g} Hz")
            t0 = time.monotonic()
            step = 0
            previous_wake: float | None = None
            while not self._stop.is_set() and (max_cycles is None or self.cycles < max_cycles):
                target = t0 + step * period
                _wait_until(target, spin)
                wake = time.monotonic()
                self._cycle(step, wake)
                end = time.monotonic()
                self.cycles += 1
                if previous_wake is not None:
                    self._period_errors.append(abs(wake - previous_wake - period))
                previous_wake = wake
                self._work_times.append(end - wake)
                if self.record is not None:
                    self.record.wake.append(wake)
                    self.record.work.append(end - wake)
                    self.record.neutral.append(self._failsafe_since is not None)
                self.notifier.watchdog(end, self.healthy(end))
                step += 1
                next_target = t0 + step * period
                if end > next_target:
                    self.deadline_misses += 1
                    late_ticks = math.floor((end - next_target) / period)
                    if late_ticks > 0:
                        self.deadline_misses += late_ticks
                        step += late_ticks
        finally:
            sys.setswitchinterval(switch_interval)
            self._shutdown()

    def _shutdown(self) -> None:
        self.notifier.stopping()
        try:
            self.link.send_neutral()
        finally:
            self.command = (0.0, 0.0)
            self._failsafe_since = self._failsafe_since or time.monotonic()
            self.worker.close()

    # --- one cycle ---------------------------------------------------------------------------------

    def _cycle(self, step: int, now: float) -> None:
        self._collect_result(step)
        self.link.poll()
        reasons = self._fault_reasons(step, now)
        action = self.queue.action_at(step) if not reasons else None
        if action is not None and not np.all(np.isfinite(action)):
            reasons.append("non-finite action")
            action = None
        if action is None and not reasons:
            reasons.append("no action queued")
        if reasons:
            self._enter_failsafe(reasons, now)
            self.link.send_neutral()
            self.command = (0.0, 0.0)
            self.failsafe_cycles += 1
        else:
            assert action is not None
            self._leave_failsafe(now)
            self.command = self.link.send_command(float(action[0]), float(action[1]))
        self._maybe_request(step, now)

    def _collect_result(self, step: int) -> None:
        result = self.worker.take_result()
        if result is None:
            return
        if result.error is not None:
            self.inference_errors += 1
            self._inference_failed = True
            if result.request.submitted - self._last_error_log >= 1.0:
                self._last_error_log = result.request.submitted
                log.error("inference failed (%d so far): %s", self.inference_errors, result.error)
            return
        self._inference_failed = False
        self._stall_counted = False
        if result.request.submitted < self._discard_before or result.chunk is None:
            self.dropped_results += 1
            return
        self.queue.add(result.chunk, result.request.origin, step)

    def _fault_reasons(self, step: int, now: float) -> list[str]:
        reasons = []
        frame_time = self.camera.latest_timestamp()
        max_age = self.config.camera.max_frame_age_s
        if frame_time is None:
            reasons.append("camera: no frame yet")
        elif now - frame_time > max_age:
            reasons.append(f"camera stale: newest frame {now - frame_time:.2f}s old (max {max_age:g}s)")
        age = self.worker.outstanding_age(now)
        if age is not None and age > self.config.failsafe.inference_timeout_s:
            reasons.append(f"inference stalled: running for {age:.2f}s")
            if not self._stall_counted:
                self._stall_counted = True
                self.inference_stalls += 1
        if self._inference_failed:
            reasons.append("inference failed")
        return reasons

    def _enter_failsafe(self, reasons: list[str], now: float) -> None:
        kinds = tuple(r.split(":")[0] for r in reasons)
        if self._failsafe_since is None:
            self._failsafe_since = now
            self.failsafe_count += 1
            self.queue.clear()
            self._discard_before = now
            log.warning("failsafe #%d: neutral (%s)", self.failsafe_count, "; ".join(reasons))
        elif kinds != tuple(r.split(":")[0] for r in self.failsafe_reasons):
            log.warning("failsafe: still neutral (%s)", "; ".join(reasons))
        self.failsafe_reasons = tuple(reasons)

    def _leave_failsafe(self, now: float) -> None:
        if self._failsafe_since is not None:
            log.info("driving: failsafe cleared after %.2fs", now - self._failsafe_since)
            self._failsafe_since = None
            self.failsafe_reasons = ()

    def _maybe_request(self, step: int, now: float) -> None:
        if self.worker.busy:
            return
        lead = self.worker.lead_steps(self.period, self.config.control.request_margin_steps)
        if not self.queue.wants_request(step, lead):
            return
        frame = self.camera.read_latest(self.config.camera.max_frame_age_s, now)
        if frame is None:
            return
        steering, throttle = self.command
        self.worker.submit(InferenceRequest(frame, steering, throttle, origin=step + 1, submitted=now))

    # --- status ------------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = time.monotonic()
        errors = list(self._period_errors)
        work = list(self._work_times)
        latency = self.worker.latency_percentiles()
        info = self.policy.info
        frame_time = self.camera.latest_timestamp()
        return {
            "pid": os.getpid(),
            "time_unix": time.time(),
            "uptime_s": round(now - self.started_at, 3),
            "ready": self.ready,
            "healthy": self.healthy(now),
            "driving": self.driving,
            "command": {"steering": self.command[0], "throttle": self.command[1]},
            "loop": {
                "rate_hz_target": self.config.control.rate_hz,
                "mode": self.config.control.mode,
                "cycles": self.cycles,
                "deadline_misses": self.deadline_misses,
                "period_error_ms": _ms_stats(errors),
                "work_ms": _ms_stats(work),
            },
            "inference": {
                "latency_ms": {k: None if v is None else round(v * 1000, 3) for k, v in latency.items()},
                "completed": self.worker.completed,
                "errors": self.inference_errors,
                "stalls": self.inference_stalls,
                "dropped_results": self.dropped_results,
            },
            "failsafe": {
                "active": self._failsafe_since is not None,
                "count": self.failsafe_count,
                "cycles": self.failsafe_cycles,
                "reasons": list(self.failsafe_reasons),
            },
            "camera": {
                **dataclasses.asdict(self.camera.stats),
                "frame_age_s": None if frame_time is None else round(now - frame_time, 3),
            },
            "serial": self._serial_status(now),
            "release": dict(self.release),
            "bundle": {
                "content_hash": info.content_hash,
                "mode": info.mode,
                "backend": info.backend,
                "engine": info.engine,
                "model_bytes": info.model_bytes,
                "path": self.config.policy.bundle if info.backend != "stub" else None,
            },
        }

    def _serial_status(self, now: float) -> dict[str, Any]:
        stats = self.link.stats
        last_rx = getattr(stats, "last_rx_monotonic", None)
        return {
            **_as_dict(stats),
            "last_rx_age_s": None if last_rx is None else round(max(0.0, now - last_rx), 3),
        }


def release_info(config_source: str) -> dict[str, str | None]:
    """The release the runtime started from: the resolved config file's directory, if it holds release.json.

    `config_source` is `RuntimeConfig.source` (already resolved, so this names the release `current` pointed
    to at start, not whatever it points to now). Computed once; the snapshot only copies it.
    """
    if not config_source:
        return {"id": None, "config": None}
    directory = Path(config_source).parent
    try:
        is_release = (directory / "release.json").exists()
    except OSError:
        is_release = False
    return {"id": directory.name if is_release else None, "config": config_source}


def _ms_stats(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for q in (50, 95, 99):
        p = percentile(values, q)
        out[f"p{q}"] = None if p is None else round(p * 1000, 4)
    out["max"] = round(max(values) * 1000, 4) if values else None
    return out


def _as_dict(stats: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    return dict(vars(stats)) if hasattr(stats, "__dict__") else {"value": str(stats)}


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
