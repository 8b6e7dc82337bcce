"""Inference in a worker thread, so the control loop keeps its rate while the policy runs.

One request at a time (the model uses all the inference threads anyway): the loop `submit`s an observation
when the action queue asks for one and the worker is idle, and picks the result up with `take_result` on a
later cycle. Latencies are kept for percentiles and for `lead_steps`, the number of control periods an
inference is expected to take, which decides how early the next chunk is requested.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from numpy.typing import NDArray

from rover_runtime.camera import Frame
from rover_runtime.policy import Policy
from rover_runtime.stats import percentile
from rover_runtime.threads import lower_this_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceRequest:
    frames: tuple[Frame, ...]  # one per camera, in the policy's image order
    state: tuple[float, ...]  # in the policy's state order
    origin: int  # the step the chunk's first entry is for
    submitted: float  # time.monotonic()


@dataclass(frozen=True)
class InferenceResult:
    request: InferenceRequest
    chunk: NDArray[Any] | None  # [chunk_size, 2] or None when the policy raised
    error: str | None
    latency_s: float


class InferenceWorker:
    def __init__(self, policy: Policy, history: int = 500, nice: int = 0) -> None:
        self.policy = policy
        self.nice = nice
        self._cond = threading.Condition()
        self._request: InferenceRequest | None = None  # waiting or running
        self._result: InferenceResult | None = None
        self._closing = False
        self._thread: threading.Thread | None = None
        self.latencies: deque[float] = deque(maxlen=history)
        self.completed = 0
        self.errors = 0
        self.recent_p95_s: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._request is not None

    def outstanding_age(self, now: float) -> float | None:
        request = self._request
        return None if request is None else now - request.submitted

    def submit(self, request: InferenceRequest) -> bool:
        with self._cond:
            if self._request is not None or self._closing:
                return False
            self._request = request
            self._cond.notify()
        return True

    def take_result(self) -> InferenceResult | None:
        with self._cond:
            result, self._result = self._result, None
        return result

    def latency_percentiles(self) -> dict[str, float | None]:
        values = list(self.latencies)
        return {f"p{q}": percentile(values, q) for q in (50, 95, 99)}

    def lead_steps(self, period_s: float, margin: int) -> int:
        """Control periods to allow for one inference: p95 of recent latencies (1 period before any)."""
        p95 = self.recent_p95_s
        return (math.ceil(p95 / period_s) if p95 is not None else 1) + margin

    def _run(self) -> None:
        lower_this_thread(self.nice)
        while True:
            with self._cond:
                while self._request is None and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                request = self._request
            assert request is not None
            start = time.monotonic()
            chunk: NDArray[Any] | None = None
            error: str | None = None
            try:
                chunk = self.policy.predict([frame.image for frame in request.frames], request.state)
            except Exception as exc:  # a failing policy must not kill the loop: counted, reported
                error = f"{type(exc).__name__}: {exc}"
            latency = time.monotonic() - start
            with self._cond:
                if error is None:
                    self.latencies.append(latency)
                    self.completed += 1
                    # computed here, in the worker, so the control loop only reads a float
                    self.recent_p95_s = percentile(list(self.latencies)[-50:], 95)
                else:
                    self.errors += 1
                self._result = InferenceResult(request=request, chunk=chunk, error=error, latency_s=latency)
                self._request = None

    def close(self, timeout_s: float = 2.0) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                log.warning(
                    "inference thread still running after %.1fs (a stalled policy); leaving it", timeout_s
                )
            self._thread = None
