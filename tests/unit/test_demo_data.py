"""The demo dataset: written by lerobot's writer, reopened offline, driven by a sensible expert."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq  # type: ignore[import-untyped]
import pytest
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from quantization import demo_data
from quantization.demo_data import CAMERA_KEY, DemoDataConfig, ensure_demo_dataset, write_demo_dataset
from quantization.errors import QuantizationError
from quantization.track_render import (
    CarState,
    Lighting,
    RoadProfile,
    expert_action,
    render_front_camera,
    step_car,
)

TINY = DemoDataConfig(episodes=2, frames_per_episode=6, heldout_episodes=1, height=48, width=64, seed=3)


def _straight_road() -> RoadProfile:
    return RoadProfile(np.random.default_rng(0), max_curvature=0.0)


def _data_table(root: Path) -> Any:
    files = sorted((root / "data").rglob("*.parquet"))
    assert files, f"no parquet data under {root}"
    return pq.read_table(files[0])


def test_dataset_reopens_offline_with_expected_layout(demo_dataset: Path) -> None:
    dataset = LeRobotDataset("rover/demo_track", root=demo_dataset)

    assert dataset.fps == 30
    assert dataset.num_episodes == 6
    assert dataset.num_frames == 6 * 60
    assert dataset.meta.info["splits"] == {"train": "0:5", "test": "5:6"}
    features = dataset.meta.features
    assert features[CAMERA_KEY]["dtype"] == "image"
    assert tuple(features[CAMERA_KEY]["shape"]) == (96, 128, 3)
    assert features[CAMERA_KEY]["names"] == ["height", "width", "channels"]
    for key in ("observation.state", "action"):
        assert features[key]["dtype"] == "float32"
        assert tuple(features[key]["shape"]) == (2,)
        assert features[key]["names"] == ["steering", "throttle"]

    item = dataset[61]  # second frame of episode 1
    assert tuple(item[CAMERA_KEY].shape) == (3, 96, 128)
    assert float(item[CAMERA_KEY].min()) >= 0.0
    assert float(item[CAMERA_KEY].max()) <= 1.0
    # observation.state is the previous action; the first frame of an episode starts from rest.
    assert np.allclose(item["observation.state"].numpy(), dataset[60]["action"].numpy())
    assert np.allclose(dataset[60]["observation.state"].numpy(), [0.0, 0.0])


def test_actions_stay_in_range_and_vary(demo_dataset: Path) -> None:
    actions = np.stack(_data_table(demo_dataset).column("action").to_pylist())
    assert actions.shape == (360, 2)
    assert actions[:, 0].min() >= -1.0
    assert actions[:, 0].max() <= 1.0
    assert actions[:, 1].min() >= 0.0
    assert actions[:, 1].max() <= 1.0
    assert actions[:, 0].std() > 0.05, "steering should vary along the track"


@pytest.mark.parametrize(
    ("offset", "heading", "expected_sign"), [(0.2, 0.0, -1), (-0.2, 0.0, 1), (0.0, 0.3, -1)]
)
def test_expert_steers_back_toward_the_lane(offset: float, heading: float, expected_sign: int) -> None:
    steering, _ = expert_action(
        CarState(distance=0.0, offset=offset, heading=heading, speed=1.0), _straight_road()
    )
    assert np.sign(steering) == expected_sign


def test_expert_recovers_from_an_offset_in_closed_loop() -> None:
    road = _straight_road()
    state = CarState(distance=0.0, offset=0.3, heading=0.0, speed=1.0)
    for _ in range(90):  # 3 s at 30 fps
        steering, throttle = expert_action(state, road)
        state = step_car(state, steering=steering, throttle=throttle, road=road, dt=1 / 30, slip=0.0)
    assert abs(state.offset) < 0.05
    assert abs(state.heading) < 0.1


def test_expert_slows_down_in_curves() -> None:
    curvy = RoadProfile(np.random.default_rng(1), max_curvature=0.9)
    state = CarState(distance=0.0, offset=0.0, heading=0.0, speed=1.0)
    sharpest = max(np.linspace(0, 20, 200), key=lambda s: abs(float(curvy.curvature(s))))
    _, straight_throttle = expert_action(state, _straight_road())
    _, curve_throttle = expert_action(CarState(sharpest - 0.5, 0.0, 0.0, 1.0), curvy)
    assert curve_throttle < straight_throttle - 0.1


def test_camera_sees_the_lane_shift_with_the_offset() -> None:
    """With the car right of the centre line, the road appears further left in the image."""
    lighting = Lighting(brightness=1.0, tint=(1.0, 1.0, 1.0), texture=0.0, sensor_noise=0.0)

    def road_centre_column(offset: float) -> float:
        image = render_front_camera(
            CarState(0.0, offset, 0.0, 1.0),
            road=_straight_road(),
            lighting=lighting,
            height=96,
            width=128,
            rng=np.random.default_rng(0),
            texture_seed=0,
        )
        rows = image[60:90].astype(int)
        grass = rows[..., 1] > rows[..., 0] + 30  # green dominates only off the road
        columns = np.nonzero(~grass)[1]
        return float(columns.mean())

    assert road_centre_column(0.2) < road_centre_column(0.0) - 5 < road_centre_column(-0.2) - 10


def test_same_seed_same_data_other_seed_other_data(tmp_path: Path) -> None:
    first = write_demo_dataset(tmp_path / "a", TINY)
    second = write_demo_dataset(tmp_path / "b", TINY)
    other = write_demo_dataset(tmp_path / "c", replace(TINY, seed=4))

    columns = [CAMERA_KEY, "observation.state", "action", "episode_index", "frame_index"]
    assert _data_table(first).select(columns).equals(_data_table(second).select(columns))
    assert not _data_table(first).select(["action"]).equals(_data_table(other).select(["action"]))


def test_refuses_an_existing_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "keep.txt").write_text("user data")

    with pytest.raises(QuantizationError, match=r"already exists: .*dataset.*--force"):
        write_demo_dataset(out, TINY)
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"], "no temporary directory left behind"

    write_demo_dataset(out, TINY, force=True)
    assert not (out / "keep.txt").exists()
    assert json.loads((out / "meta" / "info.json").read_text())["total_episodes"] == 2


def test_cli_hook_writes_the_dataset_and_refuses_to_overwrite(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    demo_data.add_arguments(parser)
    argv = [
        "--out",
        str(tmp_path / "ds"),
        "--episodes",
        "3",
        "--frames-per-episode",
        "4",
        "--heldout-episodes",
        "1",
    ]
    argv += ["--height", "32", "--width", "32"]
    assert demo_data.run(parser.parse_args(argv)) == 0
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert info["splits"] == {"train": "0:2", "test": "2:3"}
    assert info["total_frames"] == 12

    with pytest.raises(QuantizationError, match="already exists"):
        demo_data.run(parser.parse_args(argv))


def test_ensure_reuses_the_cached_dataset(tmp_path: Path) -> None:
    root = ensure_demo_dataset(tmp_path, TINY)
    assert root == tmp_path / "datasets" / TINY.cache_key()
    info = root / "meta" / "info.json"
    stamp = info.stat().st_mtime_ns
    assert ensure_demo_dataset(tmp_path, TINY) == root
    assert info.stat().st_mtime_ns == stamp, "the cached dataset was rewritten"
    other = replace(TINY, frames_per_episode=7)
    assert other.cache_key() != TINY.cache_key()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"episodes": 1}, "at least 2 episodes"),
        ({"heldout_episodes": 0}, "heldout_episodes"),
        ({"heldout_episodes": 24}, "heldout_episodes"),
        ({"frames_per_episode": 1}, "frames_per_episode"),
        ({"height": 8}, "image size"),
    ],
)
def test_bad_configs_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(QuantizationError, match=message):
        replace(DemoDataConfig(), **changes)


def test_slip_keeps_episodes_within_the_lane(demo_dataset: Path) -> None:
    """Throttle stays moderate and the expert keeps the car near the lane: actions never saturate for long."""
    actions = np.stack(_data_table(demo_dataset).column("action").to_pylist())
    saturated = np.mean(np.abs(actions[:, 0]) > 0.99)
    assert saturated < 0.1
    assert math.isfinite(float(actions.sum()))
