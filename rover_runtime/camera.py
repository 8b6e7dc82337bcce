"""Camera capture: a thread that keeps only the newest frame and its timestamp.

Sources: an OpenCV V4L2 device (index or path, resolution, fps, FOURCC), a video file (paced at its frame
rate, looping), or a synthetic moving pattern for tests and benchmarks (which can be told to stop).
A source that fails to open or stops delivering frames is reopened every `retry_interval_s`, with a log
line saying so; `read_latest(max_age_s)` refuses a frame older than `max_age_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from rover_runtime.config import CameraConfig

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
    connected: bool
    last_error: str | None


class FrameSource(Protocol):
    name: str

    def open(self) -> None: ...
    def read(self) -> NDArray[Any] | None: ...
    def close(self) -> None: ...


class SyntheticSource:
    """A moving colour bar at `fps`; `stop_after_s` > 0 (or `stall()`) makes it deliver nothing."""

    def __init__(self, width: int, height: int, fps: float, stop_after_s: float = 0.0) -> None:
        self.name = f"synthetic {width}x{height}@{fps:g}"
        self.width, self.height, self.period = width, height, 1.0 / fps
        self.stop_after_s = stop_after_s
        self._stalled = threading.Event()
        self._start = 0.0
        self._next = 0.0
        self._count = 0

    def stall(self) -> None:
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()

    def open(self) -> None:
        self._next = time.monotonic()
        if not self._start:  # stop_after_s counts from the first open, not from each reopen
            self._start = self._next

    def read(self) -> NDArray[Any] | None:
        now = time.monotonic()
        if self._next > now:
            time.sleep(self._next - now)
        self._next = max(self._next + self.period, time.monotonic() - self.period)
        stopped = self.stop_after_s > 0 and time.monotonic() - self._start > self.stop_after_s
        if stopped or self._stalled.is_set():
            return None
        self._count += 1
        image = np.zeros((self.height, self.width, 3), dtype=np.uint8)
        x = (self._count * 4) % self.width
        image[:, x : x + max(1, self.width // 10)] = (0, 128, 255)
        image[..., 0] = (np.arange(self.width, dtype=np.uint16) * 255 // self.width).astype(np.uint8)
        return image

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

    def read(self) -> NDArray[Any] | None:
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
        return np.asarray(image)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


def make_source(config: CameraConfig) -> FrameSource:
    if config.source == "synthetic":
        return SyntheticSource(config.width, config.height, config.fps, config.synthetic_stop_after_s)
    return OpenCvSource(config)


class Camera:
    """Runs a FrameSource in a thread, keeping only the newest frame."""

    def __init__(self, source: FrameSource, retry_interval_s: float = 1.0) -> None:
        self.source = source
        self.retry_interval_s = retry_interval_s
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frames = 0
        self._open_failures = 0
        self._reopens = 0
        self._connected = False
        self._last_error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="camera", daemon=True)
        self._thread.start()

    def read_latest(self, max_age_s: float, now: float | None = None) -> Frame | None:
        """The newest frame if it is at most `max_age_s` old, else None."""
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
    def stats(self) -> CameraStats:
        return CameraStats(
            frames=self._frames,
            open_failures=self._open_failures,
            reopens=self._reopens,
            connected=self._connected,
            last_error=self._last_error,
        )

    def _run(self) -> None:
        name = self.source.name
        last_good = time.monotonic()
        while not self._stop.is_set():
            if not self._connected:
                try:
                    self.source.open()
                except CameraError as exc:
                    self._open_failures += 1
                    self._last_error = str(exc)
                    log.warning(
                        "%s (attempt %d); retrying in %.1fs", exc, self._open_failures, self.retry_interval_s
                    )
                    self._stop.wait(self.retry_interval_s)
                    continue
                self._connected = True
                log.info("%s: opened", name)
                last_good = time.monotonic()
            image = self.source.read()
            now = time.monotonic()
            if image is None:
                if now - last_good >= self.retry_interval_s:
                    self._last_error = f"{name}: no frames for {now - last_good:.1f}s"
                    log.warning("%s; reopening", self._last_error)
                    self.source.close()
                    self._connected = False
                    self._reopens += 1
                    self._stop.wait(min(self.retry_interval_s, 0.1))
                continue
            last_good = now
            self._frames += 1
            with self._lock:
                self._latest = Frame(image=image, timestamp=now, index=self._frames)
        self.source.close()
        self._connected = False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            if self._thread.is_alive():
                log.warning("camera thread did not stop within 5 s")
            self._thread = None
