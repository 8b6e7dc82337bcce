"""Train the demo policy: lerobot's ACTPolicy on a LeRobotDataset, on CPU, saved like a user's checkpoint.

The output directory holds ``policy/`` (exactly what lerobot writes: ``config.json``, ``model.safetensors``,
``policy_preprocessor*``, ``policy_postprocessor*``) and ``metrics.json`` beside it: the held-out first-action
MAE of the policy and of a constant mean-action baseline, plus reference actions of the in-memory policy on a
few held-out frames (so a reload can be checked against them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lerobot.configs.types import FeatureType
from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.act.configuration_act import ACTConfig
from lerobot.policies.act.modeling_act import ACTPolicy
from lerobot.policies.factory import make_pre_post_processors
from lerobot.utils.feature_utils import dataset_to_policy_features

from quantization.code_fingerprint import code_fingerprint, package_files
from quantization.dataset_split import evenly_spaced, read_dataset_info, train_and_heldout_episodes
from quantization.errors import QuantizationError
from quantization.policy_loading import load_policy

log = logging.getLogger(__name__)

# The code whose output a cached policy is: any change to it (or to the lock) makes a new cache entry.
TRAIN_FILES = (
    "quantization/train_demo.py",
    "quantization/policy_loading.py",
    "quantization/dataset_split.py",
)
POLICY_SUBDIR = "policy"
METRICS_FILE = "metrics.json"
REFERENCE_FRAMES = 8


@dataclass(frozen=True)
class TrainConfig:
    """How the demo ACT is built and trained (defaults: about 3 min on 2 free cores at ~0.3 s per step)."""

    steps: int = 500
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    dim_model: int = 256
    n_heads: int = 8
    dim_feedforward: int = 1024
    n_encoder_layers: int = 2
    n_decoder_layers: int = 1
    chunk_size: int = 20
    n_action_steps: int = 20
    seed: int = 0
    log_every: int = 50
    eval_batch_size: int = 32
    # The held-out MAE is measured on at most this many frames, evenly spaced over the held-out episodes
    # (a fine-tune on an hour of drives need not run the policy on every held-out frame).
    eval_max_frames: int = 256
    # The trained policy's held-out steering MAE must be at most this fraction of the baseline's;
    # None skips the check (tiny test policies).
    max_steering_mae_ratio: float | None = 0.5
    # Fine-tune this saved ACT policy (its architecture and normalization) instead of training a new one.
    init_policy: str | None = None

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_max_frames < 1:
            raise QuantizationError(
                "steps, batch size and evaluation frames must be positive, got "
                f"{self.steps}, {self.batch_size}, {self.eval_max_frames}"
            )
        if self.n_action_steps > self.chunk_size:
            raise QuantizationError(
                f"n_action_steps ({self.n_action_steps}) must not exceed chunk_size ({self.chunk_size})"
            )
        if self.dim_model % self.n_heads:
            raise QuantizationError(
                f"dim_model ({self.dim_model}) must be divisible by n_heads ({self.n_heads})"
            )


# The small config the test fixtures use: a real ACT with the ResNet18 backbone, light transformer.
TINY_TRAIN_CONFIG = TrainConfig(
    steps=300,
    dim_model=64,
    n_heads=4,
    dim_feedforward=256,
    n_encoder_layers=1,
    n_decoder_layers=1,
    chunk_size=10,
    n_action_steps=10,
    log_every=10,
    max_steering_mae_ratio=None,
)


@dataclass(frozen=True)
class TrainResult:
    """Where the trained policy went and how it did on the held-out episodes."""

    policy_dir: Path
    metrics_path: Path
    policy_mae: tuple[float, float]
    baseline_mae: tuple[float, float]
    wall_time_s: float


def dataset_fingerprint(dataset_root: Path) -> str:
    """A hash of the dataset's identity: its info.json and stats.json (written once by lerobot)."""
    digest = hashlib.sha256()
    for name in ("info.json", "stats.json"):
        path = Path(dataset_root) / "meta" / name
        if not path.is_file():
            raise QuantizationError(f"not a LeRobot dataset (missing {path})")
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _repo_id(dataset_root: Path) -> str:
    """The repo id to open a local dataset with (the demo records its own; any label works offline)."""
    demo_config = Path(dataset_root) / "meta" / "demo_config.json"
    if demo_config.is_file():
        return str(json.loads(demo_config.read_text())["config"]["repo_id"])
    return f"local/{Path(dataset_root).resolve().name}"


def _act_config(features: dict[str, Any], config: TrainConfig) -> Any:

    policy_features = dataset_to_policy_features(features)
    outputs = {k: f for k, f in policy_features.items() if f.type is FeatureType.ACTION}
    inputs = {k: f for k, f in policy_features.items() if k not in outputs}
    if not any(f.type is FeatureType.VISUAL for f in inputs.values()):
        raise QuantizationError("dataset has no image feature (observation.images.*) to train ACT on")
    if "observation.state" not in inputs:
        raise QuantizationError("dataset has no observation.state feature")
    return ACTConfig(
        input_features=inputs,
        output_features=outputs,
        device="cpu",
        chunk_size=config.chunk_size,
        n_action_steps=config.n_action_steps,
        dim_model=config.dim_model,
        n_heads=config.n_heads,
        dim_feedforward=config.dim_feedforward,
        n_encoder_layers=config.n_encoder_layers,
        n_decoder_layers=config.n_decoder_layers,
        pretrained_backbone_weights=None,
        optimizer_lr=config.lr,
        optimizer_lr_backbone=config.lr,
        optimizer_weight_decay=config.weight_decay,
    )


def _check_fits(policy_cfg: Any, dataset_cfg: Any, policy_dir: str, dataset_root: Path) -> None:
    """A policy can be fine-tuned on a dataset only with the same inputs and outputs (keys and shapes)."""

    def layout(cfg: Any) -> dict[str, tuple[int, ...]]:
        features = {**cfg.input_features, **cfg.output_features}
        return {key: tuple(feature.shape) for key, feature in sorted(features.items())}

    if layout(policy_cfg) != layout(dataset_cfg):
        raise QuantizationError(
            f"cannot fine-tune {policy_dir} on {dataset_root}: the policy takes {layout(policy_cfg)}, "
            f"the dataset has {layout(dataset_cfg)}"
        )


def load_act_policy(policy_dir: Path) -> tuple[Any, Any, Any]:
    """Load a saved ACT policy and its processors offline: ``(policy, preprocessor, postprocessor)``.

    Uses the project's checked loader (``policy_loading.load_policy``): the backbone's ImageNet weights are
    never fetched and every tensor must come from ``model.safetensors``.
    """
    loaded = load_policy(Path(policy_dir))
    return loaded.policy, loaded.preprocessor, loaded.postprocessor


def predict_first_actions(policy: Any, preprocessor: Any, postprocessor: Any, batch: dict[str, Any]) -> Any:
    """The first action of the predicted chunk for each sample of ``batch``, in real units (B, action_dim)."""
    with torch.no_grad():
        chunk = policy.predict_action_chunk(preprocessor(batch))
        return postprocessor(chunk[:, 0])


def _observation_batch(items: list[dict[str, Any]], camera_keys: list[str]) -> dict[str, Any]:

    batch: dict[str, Any] = {
        k: torch.stack([item[k] for item in items]) for k in [*camera_keys, "observation.state"]
    }
    batch["task"] = [item.get("task", "") for item in items]
    return batch


def evaluate_heldout(
    policy: Any,
    preprocessor: Any,
    postprocessor: Any,
    dataset_root: Path,
    *,
    batch_size: int = 32,
    max_frames: int = 256,
) -> dict[str, Any]:
    """First-action MAE [per action dim] on the held-out episodes, of the policy and of the mean action.

    The baseline predicts the mean action of the training episodes for every frame. At most `max_frames`
    frames are used, evenly spaced over the held-out episodes (all of them when there are fewer).
    """

    train_eps, heldout_eps = train_and_heldout_episodes(dataset_root)
    repo_id = _repo_id(dataset_root)
    train_ds = LeRobotDataset(repo_id, root=dataset_root, episodes=train_eps)
    heldout_ds = LeRobotDataset(repo_id, root=dataset_root, episodes=heldout_eps)
    # One slice gives the whole column as one tensor; indexing the column iterates row by row (5 s per 30k).
    train_actions = train_ds.hf_dataset.select_columns(["action"]).with_format("torch")[:]["action"]
    mean_action = train_actions.float().mean(dim=0)
    camera_keys = list(heldout_ds.meta.camera_keys)

    policy.eval()
    total = len(heldout_ds)
    frames = evenly_spaced(total, max_frames)
    predictions, targets = [], []
    reference: dict[str, Any] = {}
    for start in range(0, len(frames), batch_size):
        items = [heldout_ds[i] for i in frames[start : start + batch_size]]
        predicted = predict_first_actions(
            policy, preprocessor, postprocessor, _observation_batch(items, camera_keys)
        )
        predictions.append(predicted)
        targets.append(torch.stack([item["action"] for item in items]))
        if not reference:
            n = min(REFERENCE_FRAMES, len(items))
            reference = {
                "dataset_indices": [int(items[i]["index"]) for i in range(n)],
                "actions": predicted[:n].tolist(),
            }
    predicted_all, target_all = torch.cat(predictions), torch.cat(targets).float()
    policy_mae = (predicted_all - target_all).abs().mean(dim=0)
    baseline_mae = (mean_action - target_all).abs().mean(dim=0)
    return {
        "heldout_episodes": heldout_eps,
        "heldout_frames": len(target_all),
        "heldout_frames_total": total,
        "action_names": list(heldout_ds.meta.features["action"].get("names") or []),
        "policy_mae": [round(float(v), 6) for v in policy_mae],
        "baseline_mae": [round(float(v), 6) for v in baseline_mae],
        "baseline_action": [float(v) for v in mean_action],
        "reference": reference,
    }


class ActionChunkDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Frames of a LeRobotDataset plus the chunk of the next ``chunk_size`` actions and its padding mask.

    Equivalent to lerobot's ``delta_timestamps={"action": [i / fps ...]}`` (the chunk stops at the episode's
    end; the rest repeats the last action and is marked in ``action_is_pad``), but reads the small action
    column once instead of decoding every frame of the chunk for each sample, which made training ~2x slower.
    """

    def __init__(self, dataset: LeRobotDataset, chunk_size: int) -> None:
        columns = dataset.hf_dataset.select_columns(["action", "episode_index"]).with_format("numpy")[:]
        self._dataset = dataset
        self._actions = torch.from_numpy(columns["action"]).float()
        episodes = torch.from_numpy(columns["episode_index"])
        n = len(episodes)
        offsets = torch.arange(chunk_size)
        rows = torch.arange(n)[:, None] + offsets[None, :]
        clamped = rows.clamp(max=n - 1)
        self._is_pad = (rows >= n) | (episodes[clamped] != episodes[:, None])
        # Padded steps repeat the episode's last action (what lerobot's own query does).
        last_row = torch.zeros(n, dtype=torch.long)
        for row in range(n - 1, -1, -1):
            same = row + 1 < n and episodes[row + 1] == episodes[row]
            last_row[row] = last_row[row + 1] if same else row
        self._chunk_rows = torch.minimum(clamped, last_row[:, None])

    def __len__(self) -> int:
        return len(self._actions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self._dataset[index])
        item["action"] = self._actions[self._chunk_rows[index]]
        item["action_is_pad"] = self._is_pad[index]
        return item


def _train(dataset_root: Path, policy_dir: Path, config: TrainConfig) -> tuple[dict[str, Any], float]:
    """Train and save into ``policy_dir``; returns (evaluation, training seconds)."""

    torch.manual_seed(config.seed)
    repo_id = _repo_id(dataset_root)
    train_eps, _ = train_and_heldout_episodes(dataset_root)
    meta = LeRobotDatasetMetadata(repo_id, root=dataset_root)
    if config.init_policy:
        policy, preprocessor, postprocessor = load_act_policy(Path(config.init_policy))
        cfg = policy.config
        _check_fits(cfg, _act_config(meta.features, config), config.init_policy, dataset_root)
        log.info("fine-tuning %s (its normalization kept)", config.init_policy)
    else:
        cfg = _act_config(meta.features, config)
        policy = ACTPolicy(cfg)
        preprocessor, postprocessor = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    frames = LeRobotDataset(repo_id, root=dataset_root, episodes=train_eps)
    dataset = ActionChunkDataset(frames, cfg.chunk_size)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=True,
        generator=generator,
        num_workers=0,
    )
    n_params = sum(p.numel() for p in policy.parameters())
    log.info(
        "training ACT (%.1f M parameters) on %d frames of %d episodes for %d steps, batch %d",
        n_params / 1e6,
        len(dataset),
        len(train_eps),
        config.steps,
        config.batch_size,
    )

    started = time.monotonic()
    step, window_loss, window_start = 0, 0.0, started
    while step < config.steps:
        for batch in loader:
            loss, _ = policy.forward(preprocessor(batch))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 10.0)
            optimizer.step()
            step += 1
            window_loss += loss.item()
            if step % config.log_every == 0 or step == config.steps:
                now = time.monotonic()
                n = config.log_every if step % config.log_every == 0 else step % config.log_every
                rate = n / max(now - window_start, 1e-9)
                log.info(
                    "step %d/%d  loss %.4f  %.2f steps/s  ETA %.0f s",
                    step,
                    config.steps,
                    window_loss / n,
                    rate,
                    (config.steps - step) / rate,
                )
                window_loss, window_start = 0.0, now
            if step >= config.steps:
                break
    train_seconds = time.monotonic() - started

    evaluation = evaluate_heldout(
        policy,
        preprocessor,
        postprocessor,
        dataset_root,
        batch_size=config.eval_batch_size,
        max_frames=config.eval_max_frames,
    )
    policy.save_pretrained(policy_dir)
    preprocessor.save_pretrained(policy_dir)
    postprocessor.save_pretrained(policy_dir)
    evaluation["parameters"] = n_params
    return evaluation, train_seconds


def train_demo_policy(
    dataset_root: Path, output_dir: Path, config: TrainConfig, force: bool = False
) -> TrainResult:
    """Train ACT on ``dataset_root`` and write ``output_dir/policy`` and ``output_dir/metrics.json``.

    Everything is built in a temporary directory and renamed into place at the end. If the policy does not
    beat the mean-action baseline by the configured margin, nothing is written and QuantizationError says
    both errors.
    """
    dataset_root, output_dir = Path(dataset_root), Path(output_dir)
    read_dataset_info(dataset_root)  # one-line error for a missing or broken dataset
    if output_dir.exists() and not force:
        raise QuantizationError(f"output directory already exists: {output_dir} (use --force to replace it)")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent) as tmp:
        staging = Path(tmp) / "out"
        staging.mkdir()
        evaluation, train_seconds = _train(dataset_root, staging / POLICY_SUBDIR, config)
        wall = time.monotonic() - started
        policy_mae, baseline_mae = evaluation["policy_mae"], evaluation["baseline_mae"]
        log.info(
            "held-out first-action MAE [steering, throttle]: policy %s, mean-action baseline %s",
            policy_mae,
            baseline_mae,
        )
        metrics = {
            "dataset": str(dataset_root),
            "dataset_fingerprint": dataset_fingerprint(dataset_root),
            "train_config": asdict(config),
            "train_code": train_fingerprint(),
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(wall, 1),
            **evaluation,
        }
        ratio = config.max_steering_mae_ratio
        if ratio is not None and policy_mae[0] > ratio * baseline_mae[0]:
            raise QuantizationError(
                f"trained policy is not good enough: held-out steering MAE {policy_mae[0]:.4f} > "
                f"{ratio} x baseline {baseline_mae[0]:.4f} "
                f"(throttle {policy_mae[1]:.4f} vs baseline {baseline_mae[1]:.4f})"
            )
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    return TrainResult(
        policy_dir=output_dir / POLICY_SUBDIR,
        metrics_path=output_dir / METRICS_FILE,
        policy_mae=(policy_mae[0], policy_mae[1]),
        baseline_mae=(baseline_mae[0], baseline_mae[1]),
        wall_time_s=wall,
    )


def train_fingerprint() -> str:
    return code_fingerprint(package_files(*TRAIN_FILES))


def policy_cache_key(dataset_root: Path, config: TrainConfig) -> str:
    """Hash of the training config, the dataset's identity, the training code and the locked libraries."""
    payload = json.dumps(
        {"config": asdict(config), "dataset": dataset_fingerprint(dataset_root), "code": train_fingerprint()},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def ensure_demo_policy(cache_root: Path, dataset_root: Path, config: TrainConfig) -> Path:
    """The trained policy directory for (dataset, config), cached under ``cache_root/policies/<key>``."""
    output_dir = Path(cache_root) / "policies" / policy_cache_key(dataset_root, config)
    policy_dir = output_dir / POLICY_SUBDIR
    if (output_dir / METRICS_FILE).is_file() and (policy_dir / "model.safetensors").is_file():
        log.info("demo policy: reusing %s", policy_dir)
        return policy_dir
    try:
        return train_demo_policy(dataset_root, output_dir, config).policy_dir
    except (QuantizationError, OSError):
        # Another process finished the same policy first (the rename found the directory taken).
        if (output_dir / METRICS_FILE).is_file():
            return policy_dir
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m quantization train-demo``."""
    defaults = TrainConfig()
    parser.add_argument("--dataset", type=Path, required=True, help="LeRobotDataset directory")
    parser.add_argument(
        "--out", type=Path, required=True, help="output directory (gets policy/ and metrics.json)"
    )
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--eval-frames",
        type=int,
        default=defaults.eval_max_frames,
        help="measure the held-out MAE on at most this many frames, evenly spaced (default %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.add_argument(
        "--init-policy",
        type=Path,
        help="fine-tune this saved ACT policy (e.g. on the fleet's drives from playbooks/collect.yml)",
    )
    parser.add_argument(
        "--no-quality-check",
        action="store_true",
        help="keep the policy even if it does not beat the mean-action baseline on the held-out episodes",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``train-demo``: train, print both held-out errors, return 0 (errors raise QuantizationError)."""
    config = replace(
        TrainConfig(),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        eval_max_frames=args.eval_frames,
        init_policy=str(args.init_policy) if args.init_policy else None,
        max_steering_mae_ratio=None if args.no_quality_check else TrainConfig.max_steering_mae_ratio,
    )
    result = train_demo_policy(args.dataset, args.out, config, force=args.force)
    print(  # noqa: T201
        f"held-out first-action MAE [steering, throttle]: policy {list(result.policy_mae)}, "
        f"mean-action baseline {list(result.baseline_mae)}"
    )
    print(f"policy: {result.policy_dir}\nmetrics: {result.metrics_path}")  # noqa: T201
    return 0
