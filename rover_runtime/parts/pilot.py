"""PilotPart: the policy, run in its inference worker, turned into one action per control step.

Each cycle: pick up a finished inference (into the action queue), raise the policy's own faults (an
inference running longer than `inference_timeout_s`, or one that raised), take this step's action from the
queue, and when the queue asks for the next chunk and the worker is idle, submit the cycle's frames and
state. A fault anywhere in the cycle (this part's or an earlier part's) means no action; on the first faulty
cycle the queue is emptied and results of inferences submitted before it are dropped, so the car only
moves again on a plan made after the fault cleared. An empty queue on its own (start-up, an inference a bit
late) is only a hold: nothing is thrown away, and the inference already running fills the queue.

The observation is taken at step s with the state the car has at s, so the chunk's first action is for
step s (lerobot's convention); entries for steps already past when it arrives are skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rover_runtime.action_queue import ActionQueue, ChunkQueue, TemporalEnsembler
from rover_runtime.camera import Frame
from rover_runtime.inference_worker import InferenceRequest, InferenceWorker
from rover_runtime.parts import PILOT_ACTION, PILOT_LATENCY_MS, STATE, image_key
from rover_runtime.policy import Policy, PolicyInfo
from rover_runtime.vehicle import BasePart, Cycle

log = logging.getLogger(__name__)

DEFAULT_ENSEMBLE_COEFF = 0.01  # ACT's default temporal_ensemble_coeff


@dataclass(frozen=True)
class PilotSettings:
    mode: str  # auto, chunk or ensemble
    n_action_steps: int  # 0: the bundle's
    temporal_ensemble_coeff: float  # negative: the bundle's
    request_margin_steps: int
    inference_timeout_s: float
    period_s: float
    background_nice: int = 0  # the inference thread's nice value (rover_runtime.threads)


def queue_mode(settings: PilotSettings, info: PolicyInfo) -> str:
    """ "auto" follows the bundle: ensemble when its policy was trained with temporal ensembling."""
    if settings.mode != "auto":
        return settings.mode
    return "ensemble" if info.temporal_ensemble_coeff is not None else "chunk"


def make_action_queue(settings: PilotSettings, info: PolicyInfo) -> ActionQueue:
    if queue_mode(settings, info) == "ensemble":
        coeff = settings.temporal_ensemble_coeff
        if coeff < 0:
            coeff = (
                info.temporal_ensemble_coeff
                if info.temporal_ensemble_coeff is not None
                else DEFAULT_ENSEMBLE_COEFF
            )
        return TemporalEnsembler(coeff, info.chunk_size)
    return ChunkQueue(min(settings.n_action_steps or info.n_action_steps, info.chunk_size))


class PilotPart(BasePart):
    name = "inference"
    writes = (PILOT_ACTION, PILOT_LATENCY_MS)

    def __init__(self, policy: Policy, settings: PilotSettings, cameras: Sequence[str]) -> None:
        if len(cameras) != len(policy.info.image_keys):
            raise ValueError(f"{len(cameras)} cameras for a policy taking {len(policy.info.image_keys)}")
        self.policy = policy
        self.settings = settings
        self.cameras = tuple(cameras)  # in the policy's image order
        self.reads = (STATE, *(image_key(camera) for camera in self.cameras))
        self.mode = queue_mode(settings, policy.info)
        self.queue = make_action_queue(settings, policy.info)
        self.worker = InferenceWorker(policy, nice=settings.background_nice)
        self._faulted = True  # start as after a fault: nothing to clear, nothing submitted yet
        self._discard_before = 0.0
        self._failed = False
        self._stall_counted = False
        self._last_error_log = float("-inf")
        self._underrun = False
        self.errors = 0
        self.stalls = 0
        self.dropped_results = 0
        self.underruns = 0  # times the queue ran dry while nothing was wrong (each episode once)
        self.action: tuple[float, float] | None = None
        self.latency_ms: float | None = None  # the newest chunk's inference

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.close()

    def update(self, cycle: Cycle) -> None:
        self._collect(cycle.step)
        age = self.worker.outstanding_age(cycle.now)
        if age is not None and age > self.settings.inference_timeout_s:
            cycle.fault(f"inference stalled: running for {age:.2f}s")
            if not self._stall_counted:
                self._stall_counted = True
                self.stalls += 1
        if self._failed:
            cycle.fault("inference failed")
        action = None if cycle.faults else self.queue.action_at(cycle.step)
        if action is not None and not np.all(np.isfinite(action)):
            cycle.fault("inference: non-finite action")
            action = None
        if cycle.faults:
            if not self._faulted:
                self._faulted = True
                self.queue.clear()
                self._discard_before = cycle.now
            self._underrun = False
        else:
            self._faulted = False
            if action is None:
                if not self._underrun:
                    self.underruns += 1
                self._underrun = True
                cycle.hold("no action queued (waiting for the next chunk)")
            else:
                self._underrun = False
        self.action = None if action is None else (float(action[0]), float(action[1]))
        cycle.values[PILOT_ACTION] = self.action
        cycle.values[PILOT_LATENCY_MS] = self.latency_ms
        self._maybe_request(cycle)

    def _collect(self, step: int) -> None:
        result = self.worker.take_result()
        if result is None:
            return
        if result.error is not None:
            self.errors += 1
            self._failed = True
            if result.request.submitted - self._last_error_log >= 1.0:
                self._last_error_log = result.request.submitted
                log.error("inference failed (%d so far): %s", self.errors, result.error)
            return
        self._failed = False
        self._stall_counted = False
        self.latency_ms = result.latency_s * 1000
        if result.request.submitted < self._discard_before or result.chunk is None:
            self.dropped_results += 1
            return
        self.queue.add(result.chunk, result.request.origin, step)

    def _maybe_request(self, cycle: Cycle) -> None:
        if self.worker.busy:
            return
        lead = self.worker.lead_steps(self.settings.period_s, self.settings.request_margin_steps)
        if not self.queue.wants_request(cycle.step, lead):
            return
        frames: list[Frame] = []
        for camera in self.cameras:
            frame = cycle.values.get(image_key(camera))
            if frame is None:
                return
            frames.append(frame)
        state = cycle.values.get(STATE)
        if state is None:
            return
        self.worker.submit(
            InferenceRequest(tuple(frames), tuple(state), origin=cycle.step, submitted=cycle.now)
        )

    def status(self) -> dict[str, Any]:
        latency = self.worker.latency_percentiles()
        return {
            "mode": self.mode,
            "latency_ms": {k: None if v is None else round(v * 1000, 3) for k, v in latency.items()},
            "completed": self.worker.completed,
            "errors": self.errors,
            "stalls": self.stalls,
            "dropped_results": self.dropped_results,
            "underruns": self.underruns,
            "action": None if self.action is None else [round(v, 4) for v in self.action],
        }
