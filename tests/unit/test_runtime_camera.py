"""Camera capture: newest frame only, aged from its capture time, stale frames refused, a capture thread
that survives every exception and never spins, missing devices retried with backoff, video files."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pytest

from rover_runtime.camera import Camera, OpenCvSource, SyntheticSource
from rover_runtime.config import load_config
from rover_runtime.metrics import write_json_atomic


def _wait(predicate, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_synthetic_camera_keeps_the_newest_frame_and_refuses_stale_ones() -> None:
    source = SyntheticSource(64, 48, fps=50)
    camera = Camera(source, retry_interval_s=0.2)
    camera.connect()
    try:
        assert _wait(lambda: camera.read_latest(0.1) is not None)
        first = camera.read_latest(0.1)
        assert first is not None
        assert first.image.shape == (48, 64, 3)
        assert _wait(lambda: (f := camera.read_latest(0.1)) is not None and f.index > first.index + 2)
        source.stall()
        time.sleep(0.15)
        assert camera.read_latest(0.1) is None  # older than max age: refused
        assert camera.read_latest(10.0) is not None
        assert _wait(lambda: camera.stats.reopens >= 1)  # no frames for retry_interval_s: reopened
        source.resume()
        assert _wait(lambda: camera.read_latest(0.1) is not None)
    finally:
        camera.disconnect()


def test_missing_device_is_retried_with_a_clear_log(caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(None, {"camera.device": "/dev/video-rover-missing", "camera.retry_interval_s": 0.1})
    camera = Camera(OpenCvSource(config.camera), retry_interval_s=0.1)
    with caplog.at_level(logging.WARNING, logger="rover_runtime.camera"):
        camera.connect()
        try:
            assert _wait(lambda: camera.stats.open_failures >= 2)
        finally:
            camera.disconnect()
    assert camera.read_latest(1.0) is None
    assert "camera /dev/video-rover-missing: cannot be opened (attempt 1); reopening in 0.1s" in caplog.text
    assert "reopening in 0.2s" in caplog.text  # backoff: the wait doubles with each failure in a row


def test_a_source_that_raises_anything_is_reopened_and_the_thread_lives_on() -> None:
    source = SyntheticSource(64, 48, fps=50)
    camera = Camera(source, retry_interval_s=0.05)
    camera.connect()
    try:
        assert _wait(lambda: camera.read_latest(0.1) is not None)
        source.fail(ZeroDivisionError("driver bug"))  # not a CameraError: must not end the thread
        assert _wait(lambda: camera.stats.errors >= 2)
        assert not camera.stats.connected
        assert camera.stats.last_error is not None
        assert "ZeroDivisionError: driver bug" in camera.stats.last_error
        frames = camera.stats.frames
        source.resume()
        assert _wait(lambda: camera.stats.frames > frames + 2)
        assert camera.stats.connected
        assert source.opens >= 2
    finally:
        camera.disconnect()


def test_a_source_with_nothing_to_give_is_not_spun_on() -> None:
    source = SyntheticSource(64, 48, fps=20)  # a read with nothing returns at once, like a driver
    camera = Camera(source, retry_interval_s=10.0)
    camera.connect()
    try:
        assert _wait(lambda: camera.stats.frames > 0)
        source.stall()
        before = camera.stats.empty_reads
        time.sleep(0.5)
        empty = camera.stats.empty_reads - before
        assert 5 <= empty <= 15  # one read per frame period (50 ms), not thousands
    finally:
        camera.disconnect()


def test_frame_age_counts_from_the_capture_not_the_dequeue() -> None:
    source = SyntheticSource(64, 48, fps=50)
    camera = Camera(source, retry_interval_s=1.0)
    camera.connect()
    try:
        assert _wait(lambda: camera.read_latest(0.1) is not None)
        source.delay(0.3)  # frames come out of a driver queue 0.3 s after they were captured
        time.sleep(0.2)
        assert camera.read_latest(0.2) is None  # fresh from the queue, but 0.3 s old: refused
        stamp = camera.latest_timestamp()
        assert stamp is not None
        assert time.monotonic() - stamp >= 0.3
        assert camera.stats.timestamps == "driver"
        assert camera.stats.fps is not None
        assert 40 <= camera.stats.fps <= 60
    finally:
        camera.disconnect()


def test_video_file_source_plays_and_loops(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 100.0, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), i * 40, dtype=np.uint8))
    writer.release()
    config = load_config(None, {"camera.source": "file", "camera.file": str(path)})
    camera = Camera(OpenCvSource(config.camera))
    camera.connect()
    try:
        assert _wait(lambda: camera.stats.frames > 12)  # more frames than the file has: it loops
        frame = camera.read_latest(0.5)
        assert frame is not None
        assert frame.image.shape == (48, 64, 3)
    finally:
        camera.disconnect()


def test_metrics_file_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "run" / "metrics.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":2}'
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temporary left behind
