"""Recorded episodes from two cars -> one LeRobotDataset with lerobot's writer, loaded back by lerobot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fleet_drives.merge import SIDECAR, MergeError, find_episodes, merge_episodes
from rover_runtime.episode_format import FRAMES_SUFFIX, CameraSpec, EpisodeInfo, StepRecord, finished_episodes
from rover_runtime.recording import Recorder, RecorderSettings

SHAPE = (3, 48, 64)


def record(
    store: Path, car: str, steps: int, *, takeover: tuple[int, int] | None = None, shape=SHAPE
) -> Path:
    """One episode recorded by the car's own Recorder, moved into the collect store's layout."""
    directory = store.parent / f"disk-of-{car}"  # the car's own disk: its episode numbers go on
    rec = Recorder(
        RecorderSettings(
            directory=directory, max_bytes=10**9, min_free_bytes=0, episode_max_s=600.0, end_after_s=1.0,
            min_steps=1, queue_steps=10_000, jpeg_quality=95, fps=10.0,
        )
    )  # fmt: skip
    info = EpisodeInfo(
        car=car,
        release=f"release-{car}",
        bundle="b" * 64,
        cameras=(CameraSpec("front", "observation.images.front", shape),),
        state_names=("steering", "throttle"),
    )
    rec.start()
    rec.begin(info)
    for i in range(steps):
        driver = takeover is not None and takeover[0] <= i < takeover[1]
        image = np.zeros((shape[1], shape[2], 3), np.uint8)
        image[:, :, 2] = 200  # red in BGR
        rec.record(
            StepRecord(
                step=i, monotonic=10.0 + i / 10, wall=1.79e9 + i / 10,
                mode="manual" if driver else "autopilot", driver=driver, state=(0.1 * (i % 5), 0.2),
                policy_action=(0.0, 0.2), command=None if driver else (0.0, 0.2),
                applied=(0.5, 0.3) if driver else (0.0, 0.2), faults=(),
                images={"front": None if i == 3 else image}, latency_ms=12.5,
            )
        )  # fmt: skip
    rec.stop()
    episode = finished_episodes(directory / "episodes")[-1]
    target = store / car / episode.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(episode, target)
    return target


@pytest.mark.slow
def test_the_fleet_drives_become_one_lerobot_dataset(tmp_path: Path) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415

    store = tmp_path / "store"
    store.mkdir()
    record(store, "car1", 20, takeover=(8, 14))
    record(store, "car2", 15)
    corrupt = record(store, "car2", 12)
    frames_file = corrupt / f"front{FRAMES_SUFFIX}"
    data = bytearray(frames_file.read_bytes())
    data[100] ^= 0xFF  # one flipped bit on the way home
    frames_file.write_bytes(bytes(data))
    other = record(store, "car1", 10, shape=(3, 24, 32))  # another bundle's resolution

    episodes = find_episodes(store)
    assert len(episodes) == 4
    result = merge_episodes(episodes, tmp_path / "dataset")
    assert result.episodes == 2
    assert result.frames == 19 + 14  # the step without a frame is left out of each
    assert result.steps_left_out == 2
    errors = {Path(s["episode"]).name: s["error"] for s in result.skipped}
    assert "does not match its sha256 (corrupt)" in errors[corrupt.name]
    assert "cameras" in errors[other.name]

    dataset = LeRobotDataset("rover/fleet_drives", root=tmp_path / "dataset")
    assert dataset.num_episodes == 2
    assert len(dataset) == 33
    item = dataset[0]
    image = item["observation.images.front"]
    assert tuple(image.shape) == (3, 48, 64)
    assert float(image[0].mean()) > 0.7 > float(image[2].mean())  # red stays red (BGR -> RGB)
    takeover = [float(dataset[i]["takeover"]) for i in range(19)]
    # steps 8-13 of the recording; the frameless step 3 is left out, so frames 7-12
    assert [i for i, t in enumerate(takeover) if t] == list(range(7, 13))
    assert [float(v) for v in dataset[8]["action"]] == pytest.approx([0.5, 0.3])  # the driver's sticks
    rows = [json.loads(line) for line in (tmp_path / "dataset" / "meta" / SIDECAR).read_text().splitlines()]
    assert [(r["car"], r["release"], r["frames"]) for r in rows] == [
        ("car1", "release-car1", 19),
        ("car2", "release-car2", 14),
    ]
    assert rows[0]["takeovers"] == [[7, 13]]
    assert rows[0]["modes"] == {"autopilot": 14, "manual": 6}


@pytest.mark.slow
def test_merging_the_same_store_again_changes_nothing_and_new_episodes_are_appended(tmp_path: Path) -> None:
    """A collect that brought nothing new does not rewrite the dataset; one that brought later episodes
    appends them, giving the dataset a full merge would write; other settings or a damaged dataset make a
    full merge."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415

    store = tmp_path / "store"
    store.mkdir()
    record(store, "car1", 12, takeover=(4, 8))
    record(store, "car2", 8)
    output = tmp_path / "dataset"
    first = merge_episodes(find_episodes(store), output, force=True)
    assert (first.episodes, first.unchanged) == (2, False)
    info = output / "meta" / "info.json"
    stamp = info.stat().st_mtime_ns
    again = merge_episodes(find_episodes(store), output, force=True)
    assert again.unchanged
    assert (again.episodes, again.frames, again.skipped) == (first.episodes, first.frames, first.skipped)
    assert info.stat().st_mtime_ns == stamp  # not rewritten

    record(store, "car2", 5)
    record(store, "car1", 7, takeover=(2, 3))
    grown = merge_episodes(find_episodes(store), output, force=True)
    assert (grown.episodes, grown.frames, grown.unchanged) == (4, first.frames + 4 + 6, False)
    full = merge_episodes(find_episodes(store), tmp_path / "full")
    assert (full.episodes, full.frames, full.steps_left_out) == (
        grown.episodes,
        grown.frames,
        grown.steps_left_out,
    )
    appended = LeRobotDataset("rover/fleet_drives", root=output)
    whole = LeRobotDataset("rover/fleet_drives", root=tmp_path / "full")
    assert (appended.num_episodes, len(appended)) == (whole.num_episodes, len(whole)) == (4, grown.frames)
    for i in (0, len(whole) - 1):  # the first frame, and the last of the last appended episode
        for key in ("observation.state", "action", "takeover", "observation.images.front"):
            assert torch.equal(appended[i][key], whole[i][key]), key
    rows = [json.loads(line) for line in (output / "meta" / SIDECAR).read_text().splitlines()]
    assert rows == [
        json.loads(line) for line in (tmp_path / "full" / "meta" / SIDECAR).read_text().splitlines()
    ]
    assert merge_episodes(find_episodes(store), output, force=True).unchanged

    assert merge_episodes(find_episodes(store), output, force=True, task="another task").unchanged is False
    shutil.rmtree(output / "data")  # a damaged dataset is merged again, not trusted
    (output / "meta" / "info.json").unlink()
    assert merge_episodes(find_episodes(store), output, force=True, task="another task").episodes == 4


def test_the_merge_refuses_to_overwrite_and_reports_when_nothing_is_usable(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / "car1" / "20260101T000000Z-car1-000001").mkdir(parents=True)
    (store / "car1" / "20260101T000000Z-car1-000001" / "episode.json").write_text("{not json")
    with pytest.raises(MergeError, match="no usable episode among 1: episode 20260101T000000Z-car1-000001: "):
        merge_episodes(find_episodes(store), tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(MergeError, match="already exists"):
        merge_episodes(find_episodes(store), tmp_path / "out")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleet_drives",
            "merge",
            "--store",
            str(store),
            "--output",
            str(tmp_path / "o2"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "episode.json is not valid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_the_drive_report_compares_the_drives_with_the_training_data(
    demo_dataset: Path, tmp_path: Path
) -> None:
    from fleet_drives.report import write_report  # noqa: PLC0415

    store = tmp_path / "store"
    store.mkdir()
    record(store, "car1", 30, takeover=(10, 20))  # 3 s at 10 Hz, 1 s of it the driver's
    record(store, "car2", 20)
    broken = record(store, "car2", 10)
    (broken / "steps.jsonl").write_text("garbage\n")
    document = write_report(find_episodes(store), demo_dataset, tmp_path / "report")
    groups = {g["car"]: g for g in document["groups"]}
    one = groups["car1"]
    assert (one["episodes"], one["frames"], one["takeovers"]) == (1, 30, 1)
    assert one["takeover_seconds_mean"] == pytest.approx(1.0)
    assert one["modes"] == {
        "autopilot": pytest.approx(20 / 30, abs=1e-4),
        "manual": pytest.approx(10 / 30, abs=1e-4),
    }
    throttle = next(d for d in one["dimensions"] if d["kind"] == "action" and d["name"] == "throttle")
    # Applied throttle 0.2 (the Pi) and 0.3 (the driver): slower than anything in the demo's training
    # (0.47-0.81), which is what the report is there to show.
    assert throttle["road"]["mean"] == pytest.approx((20 * 0.2 + 10 * 0.3) / 30, abs=1e-3)
    assert throttle["training"]["p05"] > 0.4
    assert throttle["outside_range"] == 1.0
    steering = next(d for d in one["dimensions"] if d["kind"] == "action" and d["name"] == "steering")
    # Steering 0.0 (the Pi) is inside the training's -1.0..0.37; the driver's 0.5 (a third) is not.
    assert steering["outside_range"] == pytest.approx(10 / 30, abs=1e-4)
    assert groups["car2"]["episodes"] == 1
    assert [s["episode"] for s in document["skipped"]] == [str(broken)]
    report = tmp_path / "report"
    markdown = (report / "report.md").read_text()
    assert "| car1 | release-car1 | 1 | 0.1 | 67% | 33% | 1 | 1.0 |" in markdown
    assert "release-car2" in (report / "report.html").read_text()
    assert (report / "actions.png").read_bytes()[:4] == b"\x89PNG"
    assert (report / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    assert one["latency_ms"] == {"p50": 12.5, "p95": 12.5, "max": 12.5}


LOAD_TRAINING = """
import json, sys
from pathlib import Path
from fleet_drives.report import load_training
training = load_training(Path(sys.argv[1]))
assert "torch" not in sys.modules and "lerobot" not in sys.modules, "the report imported torch or lerobot"
print(json.dumps({"state": training.state.tolist(), "action": training.action.tolist()}))
"""


@pytest.mark.slow
def test_the_drive_report_reads_the_training_data_as_lerobot_does_without_torch(
    demo_dataset: Path, tmp_path: Path
) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415

    proc = subprocess.run(
        [sys.executable, "-c", LOAD_TRAINING, str(demo_dataset)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    read = json.loads(proc.stdout)
    columns = LeRobotDataset("rover/demo_track", root=demo_dataset).hf_dataset.with_format("numpy")
    for name, key in (("state", "observation.state"), ("action", "action")):
        expected = np.asarray(columns[key], np.float64)
        assert np.array_equal(np.asarray(read[name]), expected), name

    store = tmp_path / "store"
    store.mkdir()
    record(store, "car1", 10)
    old = tmp_path / "old"
    shutil.copytree(demo_dataset, old)
    info = json.loads((old / "meta" / "info.json").read_text())
    (old / "meta" / "info.json").write_text(json.dumps({**info, "codebase_version": "v2.1"}))
    no_data = tmp_path / "no-data"
    shutil.copytree(demo_dataset, no_data)
    shutil.rmtree(no_data / "data")
    bad_data = tmp_path / "bad-data"
    shutil.copytree(demo_dataset, bad_data)
    next((bad_data / "data").rglob("*.parquet")).write_bytes(b"PAR1 not parquet")
    for training, message in (
        (tmp_path / "missing", "dataset directory not found"),
        (store, "not a LeRobot dataset (missing"),
        (old, "codebase version 'v2.1' cannot be read by lerobot 0.6.1"),
        (no_data, "no data/chunk-*/file-*.parquet: not a training dataset"),
        (bad_data, "unreadable data or statistics"),
    ):
        out = tmp_path / f"report-{training.name}"
        args = ["report", "--store", str(store), "--training", str(training), "--output", str(out)]
        proc = subprocess.run(
            [sys.executable, "-m", "fleet_drives", *args], capture_output=True, text=True, check=False
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: the training dataset: "), proc.stderr
        assert message in proc.stderr, proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
        assert not out.exists()


@pytest.mark.slow
def test_train_demo_fine_tunes_a_policy_on_the_fleet_drives(tiny_policy: Path, tmp_path: Path) -> None:
    from quantization.errors import QuantizationError  # noqa: PLC0415
    from quantization.train_demo import TINY_TRAIN_CONFIG, train_demo_policy  # noqa: PLC0415

    store = tmp_path / "store"
    store.mkdir()
    for car in ("car1", "car2", "car3"):
        record(store, car, 40, takeover=(10, 20), shape=(3, 96, 128))  # the demo policy's camera size
    per_episode = merge_episodes(find_episodes(store), tmp_path / "drives").frames // 3
    config = replace(
        TINY_TRAIN_CONFIG,
        steps=3,
        batch_size=2,
        init_policy=str(tiny_policy),
        max_steering_mae_ratio=None,
        eval_max_frames=16,
    )
    result = train_demo_policy(tmp_path / "drives", tmp_path / "tuned", config)
    assert (result.policy_dir / "model.safetensors").is_file()
    metrics = json.loads(result.metrics_path.read_text())
    assert metrics["train_config"]["init_policy"] == str(tiny_policy)
    assert metrics["heldout_episodes"] == [2]  # the last of three (no split in a fleet dataset)
    # The MAE on 16 frames spread over the held-out episode's, its first frame among them.
    assert (metrics["heldout_frames"], metrics["heldout_frames_total"]) == (16, per_episode)
    indices = metrics["reference"]["dataset_indices"]
    assert indices[0] == 2 * per_episode
    assert indices[1] - indices[0] in (2, 3)

    small = tmp_path / "small-store"
    small.mkdir()
    record(small, "car1", 20, shape=(3, 48, 64))
    record(small, "car2", 20, shape=(3, 48, 64))
    merge_episodes(find_episodes(small), tmp_path / "small")
    with pytest.raises(
        QuantizationError, match=r"cannot fine-tune .* the policy takes .*96, 128.* the dataset has .*48, 64"
    ):
        train_demo_policy(tmp_path / "small", tmp_path / "nope", config)
    assert not (tmp_path / "nope").exists()
