"""Samples from a LeRobotDataset as model inputs: calibration draws from the training episodes.

The dataset's features must match the policy's inputs (same camera keys, image shape and state dimension);
a mismatch is refused naming the key. Calibration draws N frames at random (seeded) from the training
episodes (`quantization.dataset_split`), reports how many of the N requested became usable samples and why
any failed, and refuses to draw more frames than the training episodes hold.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from quantization.act_inference import ACTION_KEY, STATE_KEY, ModelSpec
from quantization.dataset_split import read_dataset_info, train_and_heldout_episodes
from quantization.errors import QuantizationError

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 200
DEFAULT_SEED = 0


@dataclass
class CalibrationSet:
    """Model inputs drawn from a dataset, and the N succeeded / N requested account of them."""

    dataset: Path
    episodes: tuple[int, ...]
    requested: int
    inputs: list[tuple[Any, ...]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> int:
        return len(self.inputs)

    def summary(self) -> str:
        return f"{self.succeeded}/{self.requested} calibration samples succeeded"


def _names(feature: dict[str, Any], dim: int, prefix: str) -> tuple[str, ...]:
    names = feature.get("names")
    if isinstance(names, dict):  # lerobot sometimes nests names: {"motors": [...]}
        names = next(iter(names.values()), None)
    if isinstance(names, list) and len(names) == dim and all(isinstance(n, str) for n in names):
        return tuple(names)
    return tuple(f"{prefix}_{i}" for i in range(dim))


def _chw(feature: dict[str, Any]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in feature.get("shape", ()))
    names = feature.get("names") or []
    if len(shape) == 3 and list(names)[-1:] == ["channels"]:
        return (shape[2], shape[0], shape[1])
    return shape


@dataclass(frozen=True)
class DatasetFeatures:
    """The names the manifest records, read from a dataset whose features match the policy."""

    state_names: tuple[str, ...]
    action_names: tuple[str, ...]


def check_dataset_features(dataset_root: Path, spec: ModelSpec) -> DatasetFeatures:
    """Refuse a dataset whose features do not match the policy's inputs and outputs, naming the key."""
    info = read_dataset_info(dataset_root)
    features = info.get("features")
    where = Path(dataset_root) / "meta" / "info.json"
    if not isinstance(features, dict):
        raise QuantizationError(f"{where}: no 'features' object")
    for key, shape in zip(spec.image_keys, spec.image_shapes, strict=True):
        if key not in features:
            cameras = sorted(k for k in features if k.startswith("observation.image"))
            raise QuantizationError(
                f"dataset {dataset_root} has no feature {key!r} that the policy needs "
                f"(dataset cameras: {', '.join(cameras) or 'none'})"
            )
        got = _chw(features[key])
        if got != shape:
            raise QuantizationError(
                f"dataset feature {key!r} has image shape {list(got)} (C, H, W), "
                f"the policy expects {list(shape)}"
            )
    checks = ((STATE_KEY, spec.state_dim), (ACTION_KEY, spec.action_dim))
    for key, dim in checks:
        if key not in features:
            raise QuantizationError(f"dataset {dataset_root} has no feature {key!r} that the policy needs")
        got_shape = tuple(features[key].get("shape", ()))
        if got_shape != (dim,):
            raise QuantizationError(
                f"dataset feature {key!r} has shape {list(got_shape)}, the policy expects [{dim}]"
            )
    return DatasetFeatures(
        state_names=_names(features[STATE_KEY], spec.state_dim, "state"),
        action_names=_names(features[ACTION_KEY], spec.action_dim, "action"),
    )


def open_dataset(dataset_root: Path, delta_timestamps: dict[str, list[float]] | None = None) -> Any:
    """Open a local LeRobotDataset offline."""

    try:
        return LeRobotDataset(
            f"local/{Path(dataset_root).resolve().name}", root=dataset_root, delta_timestamps=delta_timestamps
        )
    except Exception as exc:
        raise QuantizationError(f"cannot open dataset {dataset_root}: {exc}") from exc


def frame_indices(dataset: Any, episodes: list[int]) -> list[int]:
    """The dataset indices of every frame of `episodes`."""

    # One slice reads the column at once (indexing the column iterates row by row: 2 s per 3600 frames).
    column = dataset.hf_dataset.select_columns(["episode_index"]).with_format("numpy")[:]
    episode_of = np.asarray(column["episode_index"]).reshape(-1)
    wanted = np.isin(episode_of, np.asarray(episodes, dtype=episode_of.dtype))
    return [int(i) for i in np.flatnonzero(wanted)]


def model_inputs(item: dict[str, Any], spec: ModelSpec) -> tuple[Any, ...]:
    """One dataset frame as the model's positional inputs (batch of one), checked for sanity."""

    state = torch.as_tensor(item[STATE_KEY], dtype=torch.float32).reshape(1, spec.state_dim)
    images = []
    for key, shape in zip(spec.image_keys, spec.image_shapes, strict=True):
        image = torch.as_tensor(item[key], dtype=torch.float32)
        if tuple(image.shape) != shape:
            raise ValueError(f"{key} has shape {list(image.shape)}, expected {list(shape)}")
        images.append(image.unsqueeze(0))
    for name, tensor in [(STATE_KEY, state), *zip(spec.image_keys, images, strict=True)]:
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{name} has non-finite values")
    return (state, *images)


def draw_calibration_set(
    dataset_root: Path, spec: ModelSpec, requested: int, seed: int = DEFAULT_SEED
) -> CalibrationSet:
    """Draw `requested` frames (without replacement, seeded) from the training episodes."""
    if requested < 1:
        raise QuantizationError(f"--calibration-samples must be at least 1, got {requested}")
    check_dataset_features(dataset_root, spec)
    train, _ = train_and_heldout_episodes(dataset_root)
    dataset = open_dataset(dataset_root)
    candidates = frame_indices(dataset, train)
    if requested > len(candidates):
        raise QuantizationError(
            f"{requested} calibration samples requested but the training episodes of {dataset_root} "
            f"hold only {len(candidates)} frames"
        )

    rng = np.random.default_rng(seed)
    chosen = sorted(int(i) for i in rng.choice(np.asarray(candidates), size=requested, replace=False))
    result = CalibrationSet(dataset=Path(dataset_root), episodes=tuple(train), requested=requested)
    for index in chosen:
        try:
            result.inputs.append(model_inputs(dataset[index], spec))
        except Exception as exc:  # a bad frame is reported, not fatal, unless none succeed
            result.failures.append(f"frame {index}: {exc}")
    for failure in result.failures:
        log.warning("calibration sample failed: %s", failure)
    log.info("%s (from %d training episodes)", result.summary(), len(train))
    if not result.inputs:
        raise QuantizationError(
            f"no calibration sample could be read from {dataset_root}: {result.failures[0]}"
        )
    return result


def action_range(dataset_root: Path) -> list[float]:
    """Per action dimension, max - min over the dataset (meta/stats.json), for accuracy in % of range."""

    stats_path = Path(dataset_root) / "meta" / "stats.json"
    try:
        stats = json.loads(stats_path.read_text())
        low, high = stats[ACTION_KEY]["min"], stats[ACTION_KEY]["max"]
    except (OSError, ValueError, KeyError) as exc:
        raise QuantizationError(f"{stats_path}: cannot read the action min/max ({exc})") from exc
    ranges = [float(h) - float(lo) for lo, h in zip(low, high, strict=True)]
    return [r if r > 0 and math.isfinite(r) else 1.0 for r in ranges]
