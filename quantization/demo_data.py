"""The demo dataset: a synthetic RC-car driving dataset written with lerobot's own LeRobotDataset writer.

Each episode drives a random smooth track (``track_render``) with a simple expert; every frame records the
front camera image, ``observation.state`` = the previous action and ``action`` = [steering, throttle]. The
last ``heldout_episodes`` episodes form the held-out split, recorded in ``meta/info.json`` as lerobot's
``"splits": {"train": "0:N", "test": "N:M"}``. Everything is deterministic from the seed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from quantization.code_fingerprint import code_fingerprint, package_files
from quantization.errors import QuantizationError
from quantization.track_render import (
    CarState,
    Lighting,
    RoadProfile,
    expert_action,
    render_front_camera,
    step_car,
)

log = logging.getLogger(__name__)

# The code whose output a cached dataset is: any change to it (or to the lock) makes a new cache entry.
GENERATOR_FILES = ("quantization/demo_data.py", "quantization/track_render.py")
CAMERA_KEY = "observation.images.front"
ACTION_NAMES = ["steering", "throttle"]
TASK = "Drive along the lane."


def generator_fingerprint() -> str:
    return code_fingerprint(package_files(*GENERATOR_FILES))


@dataclass(frozen=True)
class DemoDataConfig:
    """What the demo dataset looks like; the cache key is derived from all of it."""

    episodes: int = 24
    frames_per_episode: int = 150
    height: int = 96
    width: int = 128
    fps: int = 30
    heldout_episodes: int = 4
    seed: int = 0
    repo_id: str = "rover/demo_track"

    def __post_init__(self) -> None:
        if self.episodes < 2:
            raise QuantizationError(f"demo dataset needs at least 2 episodes, got {self.episodes}")
        if not 1 <= self.heldout_episodes < self.episodes:
            raise QuantizationError(
                f"heldout_episodes must be in [1, {self.episodes - 1}], got {self.heldout_episodes}"
            )
        if self.frames_per_episode < 2:
            raise QuantizationError(f"frames_per_episode must be >= 2, got {self.frames_per_episode}")
        if self.height < 16 or self.width < 16:
            raise QuantizationError(f"image size must be at least 16x16, got {self.height}x{self.width}")
        if self.fps <= 0:
            raise QuantizationError(f"fps must be positive, got {self.fps}")

    @property
    def train_episodes(self) -> int:
        return self.episodes - self.heldout_episodes

    def cache_key(self) -> str:
        """A short hash of the config, the generator's code and the locked libraries."""
        payload = json.dumps({"config": asdict(self), "generator": generator_fingerprint()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def dataset_features(config: DemoDataConfig) -> dict[str, dict[str, object]]:
    """The LeRobot feature spec of the demo dataset (the same layout a user's RC-car dataset has)."""
    return {
        CAMERA_KEY: {
            "dtype": "image",
            "shape": (config.height, config.width, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (2,), "names": list(ACTION_NAMES)},
        "action": {"dtype": "float32", "shape": (2,), "names": list(ACTION_NAMES)},
    }


def _episode_frames(config: DemoDataConfig, episode: int) -> list[dict[str, object]]:
    """Drive one episode and return its frames (image, previous action, action)."""
    rng = np.random.default_rng([config.seed, episode])
    road = RoadProfile(rng)
    lighting = Lighting(
        brightness=float(rng.uniform(0.7, 1.2)),
        tint=(float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.1)), float(rng.uniform(0.9, 1.1))),
        texture=float(rng.uniform(0.05, 0.2)),
        sensor_noise=float(rng.uniform(0.005, 0.03)),
    )
    texture_seed = int(rng.integers(0, 2**20))
    state = CarState(
        distance=float(rng.uniform(0.0, 20.0)),
        offset=float(rng.uniform(-0.25, 0.25)),
        heading=float(rng.uniform(-0.3, 0.3)),
        speed=float(rng.uniform(0.3, 1.2)),
    )
    dt = 1.0 / config.fps
    previous: np.ndarray[tuple[int, ...], np.dtype[np.float32]] = np.zeros(2, dtype=np.float32)
    slip = 0.0
    frames: list[dict[str, object]] = []
    for _ in range(config.frames_per_episode):
        image = render_front_camera(
            state,
            road=road,
            lighting=lighting,
            height=config.height,
            width=config.width,
            rng=rng,
            texture_seed=texture_seed,
        )
        steering, throttle = expert_action(state, road)
        steering = float(np.clip(steering + rng.normal(0.0, 0.03), -1.0, 1.0))
        throttle = float(np.clip(throttle + rng.normal(0.0, 0.02), 0.0, 1.0))
        action = np.array([steering, throttle], dtype=np.float32)
        frames.append(
            {CAMERA_KEY: image, "observation.state": previous.copy(), "action": action, "task": TASK}
        )
        # A slowly varying lateral slip (Ornstein-Uhlenbeck) pushes the car off the centre line, so the
        # data shows the expert recovering from offsets and not only cruising down the middle.
        slip += -2.0 * slip * dt + 0.6 * math.sqrt(dt) * float(rng.normal())
        state = step_car(state, steering=steering, throttle=throttle, road=road, dt=dt, slip=slip)
        previous = action
    return frames


def write_demo_dataset(root: Path, config: DemoDataConfig, force: bool = False) -> Path:
    """Write the demo dataset to ``root`` (through a temporary directory renamed at the end).

    Refuses an existing ``root`` unless ``force``; returns ``root``.
    """
    root = Path(root)
    if root.exists() and not force:
        raise QuantizationError(f"output directory already exists: {root} (use --force to replace it)")
    root.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{root.name}.tmp-", dir=root.parent) as tmp:
        staging = Path(tmp) / "dataset"
        dataset = LeRobotDataset.create(
            repo_id=config.repo_id,
            fps=config.fps,
            features=dataset_features(config),
            root=staging,
            robot_type="rc_car",
            use_videos=False,
        )
        try:
            for episode in range(config.episodes):
                for frame in _episode_frames(config, episode):
                    dataset.add_frame(frame)
                dataset.save_episode()
                log.info("demo dataset: episode %d/%d written", episode + 1, config.episodes)
        finally:
            dataset.finalize()
        # The held-out split goes into meta/info.json as plain JSON (lerobot's own helpers for it moved
        # between releases; the file format did not).
        info_path = staging / "meta" / "info.json"
        info = json.loads(info_path.read_text())
        info["splits"] = {
            "train": f"0:{config.train_episodes}",
            "test": f"{config.train_episodes}:{config.episodes}",
        }
        info_path.write_text(json.dumps(info, indent=4) + "\n")
        (staging / "meta" / "demo_config.json").write_text(
            json.dumps({"config": asdict(config), "generator": generator_fingerprint()}, indent=2) + "\n"
        )
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    log.info(
        "demo dataset: %d episodes x %d frames written to %s in %.1f s",
        config.episodes,
        config.frames_per_episode,
        root,
        time.monotonic() - started,
    )
    return root


def ensure_demo_dataset(cache_root: Path, config: DemoDataConfig) -> Path:
    """The demo dataset for ``config``, cached under ``cache_root/datasets/<key>`` and reused when present."""
    root = Path(cache_root) / "datasets" / config.cache_key()
    if (root / "meta" / "info.json").is_file():
        log.info("demo dataset: reusing %s", root)
        return root
    try:
        return write_demo_dataset(root, config)
    except QuantizationError:
        # Another process finished the same dataset first: its copy is as good as ours.
        if (root / "meta" / "info.json").is_file():
            return root
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m quantization demo-data``."""
    defaults = DemoDataConfig()
    parser.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    parser.add_argument("--episodes", type=int, default=defaults.episodes)
    parser.add_argument("--frames-per-episode", type=int, default=defaults.frames_per_episode)
    parser.add_argument("--heldout-episodes", type=int, default=defaults.heldout_episodes)
    parser.add_argument("--height", type=int, default=defaults.height)
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--fps", type=int, default=defaults.fps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")


def run(args: argparse.Namespace) -> int:
    """Run ``demo-data``: write the dataset and log where it went (errors raise QuantizationError)."""
    names = {f.name for f in fields(DemoDataConfig)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    config = DemoDataConfig(**values)
    root = write_demo_dataset(args.out, config, force=args.force)
    log.info(
        "demo dataset ready: %s (splits train 0:%d, test %d:%d)",
        root,
        config.train_episodes,
        config.train_episodes,
        config.episodes,
    )
    return 0
