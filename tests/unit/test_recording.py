"""The black box's writer on real files: episodes, checksums, a killed process, a full disk, the budget."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rover_runtime.episode_format import (
    EPISODE_FILE,
    EPISODES,
    FRAMES_SUFFIX,
    PARTIAL,
    STEPS_FILE,
    CameraSpec,
    EpisodeInfo,
    StepRecord,
    decode_jpeg,
    finished_episodes,
)
from rover_runtime.episode_writer import recover_episode
from rover_runtime.recording import Recorder, RecorderSettings

INFO = EpisodeInfo(
    car="car1",
    release="20261130T120000Z-abc",
    bundle="f" * 64,
    cameras=(CameraSpec("front", "observation.images.front", (3, 48, 64)),),
    state_names=("steering", "throttle"),
)


def settings(directory: Path, **changes: object) -> RecorderSettings:
    values: dict[str, object] = {
        "directory": directory,
        "max_bytes": 10**9,
        "min_free_bytes": 0,
        "episode_max_s": 600.0,
        "end_after_s": 1.0,
        "min_steps": 5,
        "queue_steps": 10_000,
        "jpeg_quality": 90,
        "fps": 30.0,
    }
    values.update(changes)
    return RecorderSettings(**values)  # type: ignore[arg-type]


def step(i: int, *, driver: bool = False, mode: str = "autopilot", image: bool = True) -> StepRecord:
    frame = np.full((480, 640, 3), (i * 7) % 256, np.uint8)  # full camera size: recorded at 64x48
    return StepRecord(
        step=i,
        monotonic=100.0 + i / 30,
        wall=1_790_000_000.0 + i / 30,
        mode=mode,
        driver=driver,
        state=(0.1, 0.2),
        policy_action=(0.3, 0.2),
        command=None if driver else (0.3, 0.2),
        applied=(0.5, 0.4) if driver else (0.3, 0.2),
        faults=(),
        images={"front": frame if image else None},
        latency_ms=12.5,
    )


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[Recorder]:
    rec = Recorder(settings(tmp_path / "rec"), temperature=lambda: 48.5)
    rec.start()
    yield rec
    rec.stop()


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def read_episode(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    meta = json.loads((path / EPISODE_FILE).read_text())
    lines = [json.loads(line) for line in (path / STEPS_FILE).read_text().splitlines()]
    return meta, lines


def test_an_episode_is_written_with_its_frames_checksums_and_takeovers(
    recorder: Recorder, tmp_path: Path
) -> None:
    recorder.begin(INFO)
    for i in range(30):
        # the Pi drives, the driver takes over at 10-19, the Pi again, one step without a frame
        recorder.record(
            step(i, driver=10 <= i < 20, mode="manual" if 10 <= i < 20 else "autopilot", image=i != 25)
        )
    recorder.end("mode")
    episodes_dir = tmp_path / "rec" / EPISODES
    assert wait_for(lambda: len(finished_episodes(episodes_dir)) == 1)
    (episode,) = finished_episodes(episodes_dir)
    meta, lines = read_episode(episode)
    assert meta["steps"] == 30
    assert len(lines) == 30
    assert meta["car"] == "car1"
    assert meta["release"] == INFO.release
    assert meta["bundle"] == INFO.bundle
    assert meta["end_reason"] == "mode"
    assert meta["modes"] == {"autopilot": 20, "manual": 10}
    assert meta["driver_segments"] == [[10, 20]]
    assert meta["takeovers"] == [[10, 20]]  # the driver took the car from the Pi
    for name, entry in meta["files"].items():
        data = (episode / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    frames = (episode / f"front{FRAMES_SUFFIX}").read_bytes()
    offset, length, _ = lines[3]["frames"]["front"]
    image = decode_jpeg(frames[offset : offset + length])
    assert image.shape == (48, 64, 3)  # the bundle's resolution, not the camera's
    assert abs(int(image.mean()) - 21) <= 2
    assert lines[25]["frames"] == {"front": None}
    assert (lines[3]["latency_ms"], lines[3]["temp_c"]) == (12.5, 48.5)
    assert lines[12]["applied"] == [0.5, 0.4]
    assert lines[12]["command"] is None
    assert not list(episodes_dir.glob(f"*{PARTIAL}"))
    assert recorder.snapshot()["frames_missing"] == 1


def test_long_drives_are_split_and_numbering_survives_a_restart(tmp_path: Path) -> None:
    rec = Recorder(settings(tmp_path / "rec", episode_max_s=0.5))
    rec.start()
    rec.begin(INFO)
    for i in range(40):  # 1.3 s of steps at 30 Hz
        rec.record(step(i))
    rec.stop()
    names = [p.name for p in finished_episodes(tmp_path / "rec" / EPISODES)]
    assert len(names) == 3
    reasons = [
        json.loads((tmp_path / "rec" / EPISODES / n / EPISODE_FILE).read_text())["end_reason"] for n in names
    ]
    assert reasons == ["max_length", "max_length", "stopped"]
    again = Recorder(settings(tmp_path / "rec"))
    again.start()
    again.begin(INFO)
    again.record(step(0))
    again.stop()
    later = [p.name for p in finished_episodes(tmp_path / "rec" / EPISODES)]
    assert len(later) == 4
    assert later[-1].endswith("-000004")


CRASHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from test_recording import INFO, settings, step
    from rover_runtime.recording import Recorder
    rec = Recorder(settings(Path(sys.argv[1])))
    rec.start()
    rec.begin(INFO)
    for i in range(40):
        rec.record(step(i))
    rec.end("mode")  # one finished episode
    rec.begin(INFO)
    i = 0
    while True:  # a second one, being written when the process is killed
        rec.record(step(i)); i += 1
        time.sleep(1 / 30)
        if i == 60:
            while rec.snapshot()["steps_written"] < 40 + 60:
                time.sleep(0.01)
            print("ready", flush=True)
    """
)


def test_a_killed_car_leaves_finished_episodes_intact_and_the_partial_one_is_recovered(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "rec"
    here = Path(__file__).resolve().parent
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(directory), str(here)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    episodes_dir = directory / EPISODES
    (finished,) = finished_episodes(episodes_dir)
    before = {p.name: p.read_bytes() for p in finished.iterdir()}
    (partial,) = episodes_dir.glob(f"*{PARTIAL}")
    # The power cut also lost the end of the files: half a line, and a frame whose bytes never landed.
    steps_file = partial / STEPS_FILE
    lines = steps_file.read_bytes().splitlines(keepends=True)
    good = 50
    frame = json.loads(lines[good])["frames"]["front"]
    frames_file = partial / f"front{FRAMES_SUFFIX}"
    data = bytearray(frames_file.read_bytes())
    data[frame[0] : frame[0] + 10] = b"\0" * 10  # step 50's frame is garbage
    frames_file.write_bytes(bytes(data))
    steps_file.write_bytes(b"".join(lines) + b'{"i": 999, "t": 1.0, "fra')

    rec = Recorder(settings(directory))
    rec.start()
    assert wait_for(lambda: rec.snapshot()["episodes_recovered"] == 1)
    rec.stop()
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before  # untouched
    recovered = [p for p in finished_episodes(episodes_dir) if p != finished]
    assert len(recovered) == 1
    assert not list(episodes_dir.glob(f"*{PARTIAL}"))
    meta, kept = read_episode(recovered[0])
    assert meta["end_reason"] == "recovered"
    assert meta["steps"] == good == len(kept)  # everything before the first damaged step
    for name, entry in meta["files"].items():
        assert hashlib.sha256((recovered[0] / name).read_bytes()).hexdigest() == entry["sha256"]


def test_a_partial_episode_with_too_few_good_steps_is_deleted(tmp_path: Path) -> None:
    rec = Recorder(settings(tmp_path / "rec"))
    rec.start()
    rec.begin(INFO)
    for i in range(3):
        rec.record(step(i))
    assert wait_for(lambda: rec.snapshot()["steps_written"] == 3)
    partial = next((tmp_path / "rec" / EPISODES).glob(f"*{PARTIAL}"))
    assert recover_episode(partial, min_steps=5) is None
    assert not partial.exists()


def test_the_budget_deletes_the_oldest_finished_episodes_first(tmp_path: Path) -> None:
    rec = Recorder(settings(tmp_path / "rec", max_bytes=60_000))
    rec.start()
    for _ in range(6):
        rec.begin(INFO)
        for i in range(20):
            rec.record(step(i))
        rec.end("mode")
    rec.stop()
    episodes_dir = tmp_path / "rec" / EPISODES
    kept = [p.name for p in finished_episodes(episodes_dir)]
    snap = rec.snapshot()
    assert snap["episodes_deleted"] >= 1
    assert kept
    assert kept[-1].endswith("-000006")
    assert sum(f.stat().st_size for p in finished_episodes(episodes_dir) for f in p.iterdir()) <= 60_000
    assert snap["episodes_finished"] == 6


def test_a_writer_that_falls_behind_drops_steps_and_counts_them(tmp_path: Path) -> None:
    rec = Recorder(settings(tmp_path / "rec", queue_steps=5))
    rec.begin(INFO)  # not started yet: nothing is written, the queue fills
    accepted = [rec.record(step(i)) for i in range(50)]
    assert accepted.count(True) == 5
    assert rec.snapshot()["steps_dropped"] == 45
    rec.start()
    rec.stop()
    (episode,) = finished_episodes(tmp_path / "rec" / EPISODES)
    assert json.loads((episode / EPISODE_FILE).read_text())["steps"] == 5


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")
def test_a_full_disk_stops_the_recorder_and_keeps_what_was_written(tmp_path: Path) -> None:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], check=True)
    try:
        rec = Recorder(settings(mount, min_steps=1))
        rec.start()
        rec.begin(INFO)
        noisy = np.random.default_rng(0)
        i = 0
        while rec.snapshot()["stopped_reason"] is None and i < 5000:
            record = step(i)
            record.images["front"] = noisy.integers(0, 255, (48, 64, 3), dtype=np.uint8)  # ~5 KB JPEGs
            rec.record(record)
            i += 1
            time.sleep(0.001)
        snap = rec.snapshot()
        assert "No space left on device" in snap["stopped_reason"]
        assert "driving goes on" in snap["stopped_reason"]
        assert rec.record(step(i)) is False  # nothing more is taken
        rec.stop()
        # What was fully written before the disk filled up is a finished episode, or left for recovery.
        episodes = finished_episodes(mount / EPISODES)
        partials = list((mount / EPISODES).glob(f"*{PARTIAL}"))
        assert episodes or partials
        for episode in episodes:
            meta, lines = read_episode(episode)
            assert meta["steps"] == len(lines) > 0
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_low_free_space_deletes_old_episodes_then_stops(tmp_path: Path) -> None:
    free = {"bytes": 10**9}
    rec = Recorder(settings(tmp_path / "rec", min_free_bytes=10**6), free_bytes=lambda _: free["bytes"])
    rec.start()
    rec.begin(INFO)
    for i in range(10):
        rec.record(step(i))
    rec.end("mode")
    assert wait_for(lambda: rec.snapshot()["episodes_finished"] == 1)
    free["bytes"] = 10  # something else filled the card
    rec.begin(INFO)
    for i in range(40):
        rec.record(step(i))
    assert wait_for(lambda: rec.snapshot()["stopped_reason"] is not None)
    rec.stop()
    snap = rec.snapshot()
    assert snap["episodes_deleted"] >= 1  # the old one went first
    assert "disk full" in snap["stopped_reason"]
    assert "record.min_free_mb" in snap["stopped_reason"]


def test_a_frame_the_writer_cannot_encode_stops_the_recorder_and_says_why(tmp_path: Path) -> None:
    rec = Recorder(settings(tmp_path / "rec", min_steps=1))
    rec.start()
    rec.begin(INFO)
    for i in range(5):
        rec.record(step(i))
    bad = step(5)
    bad.images["front"] = np.zeros((0, 0, 3), np.uint8)  # an empty frame: cv2 refuses to resize it
    rec.record(bad)
    assert wait_for(lambda: rec.snapshot()["stopped_reason"] is not None)
    assert "write failed" in rec.snapshot()["stopped_reason"]
    assert rec.record(step(6)) is False
    rec.stop()
    (episode,) = finished_episodes(tmp_path / "rec" / EPISODES)  # the good steps were kept
    assert json.loads((episode / EPISODE_FILE).read_text())["steps"] == 5
