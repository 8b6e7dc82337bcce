"""Camera capture: newest frame only, stale frames refused, missing devices retried, video files."""

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
    camera.start()
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
        camera.close()


def test_missing_device_is_retried_with_a_clear_log(caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(None, {"camera.device": "/dev/video-rover-missing", "camera.retry_interval_s": 0.1})
    camera = Camera(OpenCvSource(config.camera), retry_interval_s=0.1)
    with caplog.at_level(logging.WARNING, logger="rover_runtime.camera"):
        camera.start()
        try:
            assert _wait(lambda: camera.stats.open_failures >= 2)
        finally:
            camera.close()
    assert camera.read_latest(1.0) is None
    assert "camera /dev/video-rover-missing: cannot be opened (attempt 1); retrying in 0.1s" in caplog.text


def test_video_file_source_plays_and_loops(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 100.0, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), i * 40, dtype=np.uint8))
    writer.release()
    config = load_config(None, {"camera.source": "file", "camera.file": str(path)})
    camera = Camera(OpenCvSource(config.camera))
    camera.start()
    try:
        assert _wait(lambda: camera.stats.frames > 12)  # more frames than the file has: it loops
        frame = camera.read_latest(0.5)
        assert frame is not None
        assert frame.image.shape == (48, 64, 3)
    finally:
        camera.close()


def test_metrics_file_is_replaced_atomically(tmp_path: Path) -> None:
    target = tmp_path / "run" / "metrics.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert target.read_text().strip().replace(" ", "").replace("\n", "") == '{"a":2}'
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]  # no temporary left behind
