"""Camera capture: a thread that keeps only the newest frame and the time it was captured.

Sources: an OpenCV V4L2 device (index or path, resolution, fps, FOURCC), a libcamera camera (the Pi's camera
module: rover_runtime.libcamera_source), a video file (paced at its frame rate, looping), or a synthetic
moving pattern for tests and benchmarks (which can be told to stop or to raise). A frame's timestamp is its
capture time: the driver's buffer timestamp for a V4L2 device (the kernel's CLOCK_MONOTONIC, the clock of
`time.monotonic()`), so a frame that sat in the driver's queue looks as old as it is; the dequeue time only
when the driver gives none.

The capture thread survives everything: a source that fails to open, raises, or stops delivering frames is
closed and reopened with a backoff (`retry_interval_s`, doubling up to 8x, reset by the next good frame),
and it never spins: a read that returns nothing waits a frame period before the next one.
`read_latest(max_age_s)` refuses a frame older than `max_age_s`.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from rover_runtime.config import CameraConfig
from rover_runtime.threads import lower_this_thread

log = logging.getLogger(__name__)


class CameraError(Exception):
    """A camera source cannot be opened."""


@dataclass(frozen=True)
class Frame:
    image: NDArray[Any]  # H x W x 3 uint8, BGR (OpenCV's order)
    timestamp: float  # time.monotonic() when captured
    index: int


@dataclass(frozen=True)
class CameraStats:
    frames: int
    open_failures: int
    reopens: int
    errors: int  # exceptions raised by the source (each one closes and reopens it)
    empty_reads: int  # reads that returned no frame
    connected: bool
    last_error: str | None
    fps: float | None  # frames per second over the last ~2 s
    timestamps: str  # "driver" (capture time from the driver) or "dequeue" (the time the frame was read)


@dataclass(frozen=True)
class Captured:
    """What a source's read returns: the image and, when the source knows it, its capture time."""

    image: NDArray[Any]
    captured_at: float | None = None  # time.monotonic() clock


MAX_PLAUSIBLE_AGE_S = 10.0


def plausible(stamp: float | None, now: float) -> float | None:
    """A driver's capture time (monotonic clock), or None when it is in the future or 10 s old or more."""
    if stamp is None:
        return None
    age = now - stamp
    return stamp if 0.0 <= age < MAX_PLAUSIBLE_AGE_S else None


class FrameSource(Protocol):
    name: str
    period_s: float  # the frame period the source is set to

    def open(self) -> None: ...
    def read(self) -> Captured | None: ...
    def close(self) -> None: ...


class SyntheticSource:
    """A moving colour bar at `fps`; `stop_after_s` > 0 (or `stall()`) makes it deliver nothing, `fail()`
    makes its reads raise, `delay(s)` makes it deliver frames captured `s` seconds ago (a driver queue)."""

    def __init__(self, width: int, height: int, fps: float, stop_after_s: float = 0.0) -> None:
        self.name = f"synthetic {width}x{height}@{fps:g}"
        self.width, self.height, self.period = width, height, 1.0 / fps
        self.period_s = self.period
        self.stop_after_s = stop_after_s
        self._stalled = threading.Event()
        self._failing: Exception | None = None
        self._delay_s = 0.0
        self._start = 0.0
        self._next = 0.0
        self._count = 0
        self.opens = 0

    def stall(self) -> None:
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()
        self._failing = None
        self._delay_s = 0.0

    def fail(self, error: Exception) -> None:
        self._failing = error

    def delay(self, seconds: float) -> None:
        self._delay_s = seconds

    def open(self) -> None:
        self.opens += 1
        self._next = time.monotonic()
        if not self._start:  # stop_after_s counts from the first open, not from each reopen
            self._start = self._next

    def read(self) -> Captured | None:
        if self._failing is not None:
            raise self._failing
        stopped = self.stop_after_s > 0 and time.monotonic() - self._start > self.stop_after_s
        if stopped or self._stalled.is_set():
            return None  # like a driver with nothing to give: returns at once
        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(self._next + self.period, time.monotonic() - self.period)
        self._count += 1
        image = np.zeros((self.height, self.width, 3), dtype=np.uint8)
        x = (self._count * 4) % self.width
        image[:, x : x + max(1, self.width // 10)] = (0, 128, 255)
        image[..., 0] = (np.arange(self.width, dtype=np.uint16) * 255 // self.width).astype(np.uint8)
        return Captured(image, time.monotonic() - self._delay_s)

    def close(self) -> None:
        pass


class OpenCvSource:
    """A V4L2 device (index or path) or a video file, through OpenCV."""

    def __init__(self, config: CameraConfig) -> None:
        self.config = config
        self.is_file = config.source == "file"
        self.name = f"video file {config.file}" if self.is_file else f"camera {config.device}"
        self._capture: Any = None
        self._period = 1.0 / config.fps
        self.period_s = self._period
        self._next = 0.0

    def open(self) -> None:
        import cv2  # noqa: PLC0415 - hardware library, imported only when a real camera is used

        c = self.config
        if self.is_file:
            if not Path(c.file).is_file():
                raise CameraError(f"{self.name}: no such file")
            capture = cv2.VideoCapture(c.file)
            file_fps = capture.get(cv2.CAP_PROP_FPS)
            self._period = 1.0 / (file_fps if file_fps and file_fps > 0 else c.fps)
            self.period_s = self._period
        else:
            target: int | str = int(c.device) if c.device.isdigit() else c.device
            capture = cv2.VideoCapture(target, cv2.CAP_V4L2)
            if capture.isOpened():
                if c.fourcc:
                    capture.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter.fourcc(*c.fourcc))
                capture.set(cv2.CAP_PROP_FRAME_WIDTH, c.width)
                capture.set(cv2.CAP_PROP_FRAME_HEIGHT, c.height)
                capture.set(cv2.CAP_PROP_FPS, c.fps)
                capture.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        if not capture.isOpened():
            capture.release()
            raise CameraError(f"{self.name}: cannot be opened")
        self._capture = capture
        self._next = time.monotonic()

    def read(self) -> Captured | None:
        if self._capture is None:
            return None
        if self.is_file:  # pace a file at its own frame rate, like a camera
            now = time.monotonic()
            if self._next > now:
                time.sleep(self._next - now)
            self._next = max(self._next + self._period, time.monotonic() - self._period)
        ok, image = self._capture.read()
        if not ok and self.is_file and self.config.loop_file:
            import cv2  # noqa: PLC0415

            self._capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, image = self._capture.read()
        if not ok or image is None:
            return None
        return Captured(np.asarray(image), None if self.is_file else self._driver_timestamp())

    def _driver_timestamp(self) -> float | None:
        """The V4L2 buffer's timestamp (CLOCK_MONOTONIC, as OpenCV reports it in CAP_PROP_POS_MSEC), when
        it is plausible: not in the future and less than 10 s old."""
        import cv2  # noqa: PLC0415

        stamp_ms = self._capture.get(cv2.CAP_PROP_POS_MSEC)
        if not stamp_ms or stamp_ms <= 0:
            return None
        return plausible(stamp_ms / 1000.0, time.monotonic())

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


def make_source(config: CameraConfig, device: str | None = None) -> FrameSource:
    """The source for `config`; `device` (from [cameras]) replaces camera.device, or camera.file when the
    source is a video file."""
    if config.source == "synthetic":
        return SyntheticSource(config.width, config.height, config.fps, config.synthetic_stop_after_s)
    if device is not None and config.source == "file":
        config = dataclasses.replace(config, file=device)
    elif device is not None:
        config = dataclasses.replace(config, device=device)
    if config.source == "libcamera":
        from rover_runtime.libcamera_source import LibcameraSource  # noqa: PLC0415 - needs python3-libcamera

        return LibcameraSource(config)
    return OpenCvSource(config)


class Camera:
    """Runs a FrameSource in a capture thread, keeping only the newest frame (lerobot-style: `connect`,
    `read_latest`, `disconnect`)."""

    MAX_BACKOFF_FACTOR = 8

    def __init__(
        self, source: FrameSource, retry_interval_s: float = 1.0, name: str = "front", nice: int = 0
    ) -> None:
        self.source = source
        self.nice = nice  # the capture thread's nice value (rover_runtime.threads)
        self.name = name
        self.retry_interval_s = retry_interval_s
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frames = 0
        self._open_failures = 0
        self._reopens = 0
        self._errors = 0
        self._empty_reads = 0
        self._connected = False
        self._last_error: str | None = None
        self._failures_in_a_row = 0
        self._driver_timestamps = False
        self._recent: deque[float] = deque(maxlen=120)  # dequeue times of the recent frames, for fps

    def connect(self) -> None:
        """Starts the capture thread (which opens the source, and keeps reopening it when it fails)."""
        self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
        self._thread.start()

    def read_latest(self, max_age_s: float, now: float | None = None) -> Frame | None:
        """The newest frame if it was captured at most `max_age_s` ago, else None."""
        with self._lock:
            frame = self._latest
        if frame is None:
            return None
        now = time.monotonic() if now is None else now
        return frame if now - frame.timestamp <= max_age_s else None

    def latest_timestamp(self) -> float | None:
        with self._lock:
            return None if self._latest is None else self._latest.timestamp

    @property
    def health(self) -> tuple[bool, int, str | None]:
        """(connected, frames, last_error): what the control loop checks every cycle, without building
        `stats` (which also computes the frame rate)."""
        return self._connected, self._frames, self._last_error

    @property
    def stats(self) -> CameraStats:
        with self._lock:
            recent = list(self._recent)
        now = time.monotonic()
        window = [t for t in recent if now - t <= 2.0]
        fps = (
            (len(window) - 1) / (window[-1] - window[0])
            if len(window) >= 2 and window[-1] > window[0]
            else None
        )
        return CameraStats(
            frames=self._frames,
            open_failures=self._open_failures,
            reopens=self._reopens,
            errors=self._errors,
            empty_reads=self._empty_reads,
            connected=self._connected,
            last_error=self._last_error,
            fps=None if fps is None else round(fps, 2),
            timestamps="driver" if self._driver_timestamps else "dequeue",
        )

    def _backoff(self) -> float:
        """The wait before the next open: retry_interval_s, doubling with each failure in a row, capped."""
        factor: int = min(2 ** max(0, self._failures_in_a_row - 1), self.MAX_BACKOFF_FACTOR)
        return self.retry_interval_s * factor

    def _fail(self, message: str) -> None:
        """A failed open, raising read, or a source that went quiet: close it, wait, open again."""
        self._failures_in_a_row += 1
        self._last_error = message
        wait = self._backoff()
        log.warning("%s; reopening in %.1fs", message, wait)
        self._close_source()
        self._stop.wait(wait)

    def _close_source(self) -> None:
        try:
            self.source.close()
        except Exception as exc:  # a source that cannot even close must not end the thread
            log.warning("%s: close failed: %s", self.source.name, exc)
        if self._connected:
            self._reopens += 1
        self._connected = False

    def _run(self) -> None:
        lower_this_thread(self.nice)
        name = self.source.name
        last_good = time.monotonic()
        while not self._stop.is_set():
            if not self._connected:
                try:
                    self.source.open()
                except Exception as exc:
                    self._open_failures += 1
                    why = str(exc) if isinstance(exc, CameraError) else f"{name}: open raised {exc!r}"
                    self._fail(f"{why} (attempt {self._open_failures})")
                    continue
                self._connected = True
                log.info("%s: opened", name)
                last_good = time.monotonic()
            try:
                captured = self.source.read()
            except Exception as exc:
                self._errors += 1
                self._fail(f"{name}: read raised {type(exc).__name__}: {exc}")
                continue
            now = time.monotonic()
            if captured is None:
                self._empty_reads += 1
                if now - last_good >= self.retry_interval_s:
                    self._fail(f"{name}: no frames for {now - last_good:.1f}s")
                else:
                    self._stop.wait(self.source.period_s)  # never spin on a source with nothing to give
                continue
            last_good = now
            self._failures_in_a_row = 0
            self._frames += 1
            self._driver_timestamps = captured.captured_at is not None
            timestamp = captured.captured_at if captured.captured_at is not None else now
            with self._lock:
                self._latest = Frame(image=captured.image, timestamp=timestamp, index=self._frames)
                self._recent.append(now)
        self._close_source()

    def disconnect(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.warning("camera %s thread did not stop within 5 s", self.name)
            self._thread = None
