"""Shared helpers of the quantization integration tests: bundles of the tiny policy, cached by their inputs.

Bundles are built with `quantization.demo.ensure_bundle` under `$ROVER_CACHE/test-fixtures/bundles`, keyed by
the policy weights, the dataset, the settings and the quantization code, so an unchanged second run reuses
them and any code change rebuilds them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from quantization.calibration import frame_indices, open_dataset
from quantization.dataset_split import train_and_heldout_episodes
from quantization.demo import ensure_bundle
from quantization.quantize import QuantizeRequest
from quantization.train_demo import dataset_fingerprint
from rover_runtime.backends import load_model
from rover_runtime.bundle import open_bundle

CALIBRATION_SAMPLES = 32
VARIANTS = {
    "fp32-torch": ("fp32", "torch"),
    "dynamic-torch": ("dynamic", "torch"),
    "static-torch": ("static", "torch"),
    "fp32-onnx": ("fp32", "onnxruntime"),
    "static-onnx": ("static", "onnxruntime"),
    "fp32-executorch": ("fp32", "executorch"),
    "static-executorch": ("static", "executorch"),
}


def fixture_cache_root() -> Path:
    return Path(os.environ["ROVER_CACHE"]) / "test-fixtures"


def tiny_bundle(policy: Path, dataset: Path, name: str) -> Path:
    """The bundle `name` (a key of VARIANTS) of the tiny policy, built once."""
    mode, backend = VARIANTS[name]
    request = QuantizeRequest(
        policy=policy, mode=mode, backend=backend, dataset=dataset, output=Path("unused"),
        samples=CALIBRATION_SAMPLES,
    )  # fmt: skip
    return ensure_bundle(request, fixture_cache_root(), dataset_fingerprint(dataset)).root


def heldout_batch(dataset: Path, count: int = 4) -> dict[str, object]:
    """`count` held-out frames as a lerobot observation batch (real units, images in [0, 1])."""

    _, heldout = train_and_heldout_episodes(dataset)
    ds = open_dataset(dataset)
    indices = frame_indices(ds, heldout)[:: max(1, len(frame_indices(ds, heldout)) // count)][:count]
    items = [ds[i] for i in indices]
    keys = [k for k in items[0] if k.startswith("observation.")]
    return {k: torch.stack([item[k] for item in items]) for k in keys}


def run_bundle(
    bundle_dir: Path, batch: dict[str, torch.Tensor], camera_keys: list[str] | None = None
) -> np.ndarray:
    """Run a bundle's model with the car's own backend on a lerobot observation batch, one frame at a time
    (an ExecuTorch program takes batch 1); `camera_keys` default to the manifest's."""
    bundle = open_bundle(bundle_dir)
    model = load_model(bundle, threads=2, engine=bundle.manifest.engine)
    keys = camera_keys or [img.key for img in bundle.manifest.inputs.images]
    frames = len(batch["observation.state"])
    outputs = [
        model.run(
            [batch["observation.state"][i : i + 1].numpy(), *(batch[k][i : i + 1].numpy() for k in keys)]
        )
        for i in range(frames)
    ]
    return np.concatenate(outputs, axis=0)
