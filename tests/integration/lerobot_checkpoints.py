"""Test helpers: ACT checkpoints as lerobot 0.4.4 and 0.6.1 save them, and small datasets that match them.

- `checkpoint_from_044_fixture` rebuilds a lerobot 0.4.4 checkpoint from `tests/fixtures/lerobot-0.4.4-act/`:
  the JSON files are those a real 0.4.4 wrote; the weights and the processors' statistics are generated with
  exactly the tensor names, dtypes and shapes 0.4.4 wrote (`tensors.json`).
- `save_act_061` builds and saves an ACT with the installed lerobot (0.6.1), as `lerobot-train` leaves it.
- `write_dataset` writes a tiny LeRobotDataset (codebase v3.0) with the given cameras.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FIXTURE_044 = Path(__file__).resolve().parents[1] / "fixtures" / "lerobot-0.4.4-act"
JSON_FILES = ("config.json", "policy_preprocessor.json", "policy_postprocessor.json")


def _stat_tensor(name: str, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """Plausible statistics: images in [0, 1], state and action in about [-1, 1]; std and max-min > 0."""
    image = ".images." in name
    stat = name.rsplit(".", 1)[-1]
    noise = torch.rand(shape, generator=generator)
    values = {
        "mean": (0.4 + 0.2 * noise) if image else (noise - 0.5) * 0.2,
        "std": (0.2 + 0.1 * noise) if image else (0.3 + 0.4 * noise),
        "min": torch.zeros(shape) if image else -1.0 - noise,
        "max": torch.ones(shape) if image else 1.0 + noise,
    }
    return values[stat].float()


def checkpoint_from_044_fixture(target: Path, seed: int = 0) -> Path:
    """A lerobot 0.4.4 ACT checkpoint in `target`: the fixture's JSON files plus generated tensors."""
    from lerobot.configs.policies import PreTrainedConfig  # noqa: PLC0415
    from lerobot.policies.act.modeling_act import ACTPolicy  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    target.mkdir(parents=True)
    for name in JSON_FILES:
        shutil.copy2(FIXTURE_044 / name, target / name)
    described: dict[str, Any] = json.loads((FIXTURE_044 / "tensors.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    # The weights: a freshly initialized ACT of this config (as lerobot initializes it), written under the
    # names 0.4.4 used, which must be exactly the names and shapes the installed lerobot expects.
    cfg = PreTrainedConfig.from_pretrained(str(target))
    torch.manual_seed(seed)
    state = {k: v.detach().clone().contiguous() for k, v in ACTPolicy(cfg).state_dict().items()}
    expected = {k: v["shape"] for k, v in described["model.safetensors"].items()}
    assert {k: list(v.shape) for k, v in state.items()} == expected, "0.4.4 and 0.6.1 ACT tensors differ"
    save_file(state, str(target / "model.safetensors"))
    for file_name, tensors in described.items():
        if not file_name.endswith(".safetensors") or file_name == "model.safetensors":
            continue
        stats = {name: _stat_tensor(name, info["shape"], generator) for name, info in tensors.items()}
        save_file(stats, str(target / file_name))
    return target


@dataclass(frozen=True)
class ActVariant:
    """The settings of an ACT where the re-expression could go wrong."""

    name: str
    backbone: str = "resnet18"
    pre_norm: bool = False
    normalization: str = "MEAN_STD"
    cameras: tuple[str, ...] = ("front",)


def camera_key(camera: str) -> str:
    return f"observation.images.{camera}"


def _stats(features: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, shape in features.items():
        stat_shape = [3, 1, 1] if key.startswith("observation.images.") else list(shape)
        out[key] = {
            s: _stat_tensor(f"{key}.{s}", stat_shape, generator) for s in ("mean", "std", "min", "max")
        }
    return out


def save_act_061(target: Path, variant: ActVariant, image_hw: tuple[int, int], seed: int = 0) -> Path:
    """An ACT saved by the installed lerobot (config, weights, both processors), random weights."""
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature  # noqa: PLC0415
    from lerobot.policies.act.configuration_act import ACTConfig  # noqa: PLC0415

    height, width = image_hw
    inputs = {"observation.state": PolicyFeature(type=FeatureType.STATE, shape=(2,))}
    for camera in variant.cameras:
        inputs[camera_key(camera)] = PolicyFeature(type=FeatureType.VISUAL, shape=(3, height, width))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(2,))}
    mode = NormalizationMode(variant.normalization)
    cfg = ACTConfig(
        input_features=inputs, output_features=outputs, device="cpu", pretrained_backbone_weights=None,
        vision_backbone=variant.backbone, pre_norm=variant.pre_norm,
        normalization_mapping={"VISUAL": mode, "STATE": mode, "ACTION": mode},
        dim_model=64, n_heads=4, dim_feedforward=128, n_encoder_layers=2, n_decoder_layers=1,
        chunk_size=8, n_action_steps=8,
    )  # fmt: skip
    return _save_act(target, cfg, seed)


def _save_act(target: Path, cfg: Any, seed: int) -> Path:
    """Build lerobot's ACTPolicy of `cfg` (seeded random weights) and save it with both processors, whose
    statistics are generated to fit its features."""
    from lerobot.policies.act.modeling_act import ACTPolicy  # noqa: PLC0415
    from lerobot.policies.factory import make_pre_post_processors  # noqa: PLC0415

    torch.manual_seed(seed)
    policy = ACTPolicy(cfg)
    generator = torch.Generator().manual_seed(seed)
    features = {**cfg.input_features, **cfg.output_features}
    shapes = {k: tuple(f.shape) for k, f in features.items()}
    preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=_stats(shapes, generator))
    target.mkdir(parents=True)
    policy.save_pretrained(target)
    preprocessor.save_pretrained(target)
    postprocessor.save_pretrained(target)
    return target


def write_dataset(root: Path, cameras: tuple[str, ...], image_hw: tuple[int, int], seed: int = 0) -> Path:
    """A LeRobotDataset of 3 episodes x 6 frames (splits train 0:2, test 2:3) with these cameras."""
    names = ("steering", "throttle")
    return _write_dataset(root, dict.fromkeys(cameras, image_hw), names, names, seed)


def _write_dataset(
    root: Path,
    cameras: dict[str, tuple[int, int]],
    state_names: tuple[str, ...],
    action_names: tuple[str, ...],
    seed: int,
) -> Path:
    """3 episodes x 6 frames of random images, state and actions (no state feature when `state_names` is
    empty), splits train 0:2, test 2:3."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415

    features: dict[str, dict[str, Any]] = {
        camera_key(c): {"dtype": "image", "shape": (h, w, 3), "names": ["height", "width", "channels"]}
        for c, (h, w) in cameras.items()
    }
    if state_names:
        features["observation.state"] = {
            "dtype": "float32",
            "shape": (len(state_names),),
            "names": list(state_names),
        }
    features["action"] = {"dtype": "float32", "shape": (len(action_names),), "names": list(action_names)}
    rng = np.random.default_rng(seed)
    dataset = LeRobotDataset.create(
        repo_id="test/cameras", fps=30, features=features, root=root, use_videos=False
    )
    for _ in range(3):
        for _ in range(6):
            frame: dict[str, Any] = {
                camera_key(c): rng.integers(0, 256, (h, w, 3), np.uint8) for c, (h, w) in cameras.items()
            }
            if state_names:
                frame["observation.state"] = rng.uniform(-1, 1, len(state_names)).astype(np.float32)
            frame["action"] = rng.uniform(-1, 1, len(action_names)).astype(np.float32)
            frame["task"] = "drive"
            dataset.add_frame(frame)
        dataset.save_episode()
    dataset.finalize()
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["splits"] = {"train": "0:2", "test": "2:3"}
    info_path.write_text(json.dumps(info, indent=4))
    return root


def lerobot_chunk(policy_dir: Path, batch: dict[str, torch.Tensor]) -> np.ndarray:
    """What lerobot computes: pre-processor -> ACTPolicy.predict_action_chunk -> post-processor."""
    from quantization.policy_loading import load_policy  # noqa: PLC0415

    loaded = load_policy(policy_dir)
    with torch.no_grad():
        chunk = loaded.postprocessor(loaded.policy.predict_action_chunk(loaded.preprocessor(dict(batch))))
    return np.asarray(chunk.numpy())


@dataclass(frozen=True)
class ActShape:
    """An ACT's shape: the settings of the shape matrix (tests/integration/test_shape_matrix.py)."""

    dim_model: int
    n_heads: int
    dim_feedforward: int
    n_encoder_layers: int
    n_decoder_layers: int
    cameras: tuple[tuple[int, int], ...]  # (height, width) per camera
    state_dim: int
    action_dim: int
    chunk_size: int
    n_action_steps: int
    temporal_ensemble_coeff: float | None = None

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(f"cam{i}" for i in range(len(self.cameras)))

    def label(self) -> str:
        cams = "+".join(f"{h}x{w}" for h, w in self.cameras)
        ensemble = f"-te{self.temporal_ensemble_coeff}" if self.temporal_ensemble_coeff is not None else ""
        return (
            f"d{self.dim_model}h{self.n_heads}ff{self.dim_feedforward}-enc{self.n_encoder_layers}"
            f"dec{self.n_decoder_layers}-{cams}-s{self.state_dim}a{self.action_dim}"
            f"-c{self.chunk_size}n{self.n_action_steps}{ensemble}"
        )


def save_act_shape(target: Path, shape: ActShape, seed: int = 0) -> Path:
    """An ACT of `shape` saved by the installed lerobot (config, weights, both processors), random weights;
    with `state_dim` 0 it has no state input (which lerobot's ACT cannot run)."""
    from lerobot.configs.types import FeatureType, PolicyFeature  # noqa: PLC0415
    from lerobot.policies.act.configuration_act import ACTConfig  # noqa: PLC0415

    inputs: dict[str, Any] = {}
    if shape.state_dim:
        inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(shape.state_dim,))
    for name, (height, width) in zip(shape.camera_names, shape.cameras, strict=True):
        inputs[camera_key(name)] = PolicyFeature(type=FeatureType.VISUAL, shape=(3, height, width))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(shape.action_dim,))}
    cfg = ACTConfig(
        input_features=inputs, output_features=outputs, device="cpu", pretrained_backbone_weights=None,
        dim_model=shape.dim_model, n_heads=shape.n_heads, dim_feedforward=shape.dim_feedforward,
        n_encoder_layers=shape.n_encoder_layers, n_decoder_layers=shape.n_decoder_layers,
        chunk_size=shape.chunk_size, n_action_steps=shape.n_action_steps,
        temporal_ensemble_coeff=shape.temporal_ensemble_coeff,
    )  # fmt: skip
    return _save_act(target, cfg, seed)


def write_shape_dataset(root: Path, shape: ActShape, seed: int = 0) -> Path:
    """A LeRobotDataset matching `shape` (3 episodes x 6 frames, splits train 0:2, test 2:3)."""
    return _write_dataset(
        root,
        dict(zip(shape.camera_names, shape.cameras, strict=True)),
        tuple(f"s{i}" for i in range(shape.state_dim)),
        tuple(f"a{i}" for i in range(shape.action_dim)),
        seed,
    )
