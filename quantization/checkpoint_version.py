"""Which lerobot release saved an ACT checkpoint, told from its files (lerobot writes no version number).

The formats differ in ways that can be seen without importing lerobot:

- lerobot 0.3 and older keep the normalization statistics inside ``model.safetensors``
  (``normalize_inputs.*`` / ``unnormalize_outputs.*`` buffers) and write no ``policy_preprocessor.json``;
- lerobot 0.4.x writes the processors beside the weights, and a ``config.json`` without
  ``pretrained_revision``;
- lerobot 0.6.x adds ``pretrained_revision`` to ``config.json``;
- a newer lerobot writes fields that the installed lerobot (0.6.1) does not know.

Checkpoints of 0.4.x and 0.6.x are read; the others are refused naming the release they came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from quantization.errors import QuantizationError

SUPPORTED = ("0.4.x", "0.6.x")
# Every field of ACT's config.json as lerobot 0.6.1 writes it (0.4.4 writes the same but pretrained_revision).
ACT_CONFIG_FIELDS_06 = frozenset(
    {
        "type", "n_obs_steps", "input_features", "output_features", "device", "use_amp", "use_peft",
        "push_to_hub", "repo_id", "private", "tags", "license", "pretrained_path", "pretrained_revision",
        "chunk_size", "n_action_steps", "normalization_mapping", "vision_backbone",
        "pretrained_backbone_weights", "replace_final_stride_with_dilation", "pre_norm", "dim_model",
        "n_heads", "dim_feedforward", "feedforward_activation", "n_encoder_layers", "n_decoder_layers",
        "use_vae", "latent_dim", "n_vae_encoder_layers", "temporal_ensemble_coeff", "dropout", "kl_weight",
        "optimizer_lr", "optimizer_weight_decay", "optimizer_lr_backbone",
    }
)  # fmt: skip
ONLY_FROM_06 = frozenset({"pretrained_revision"})
LEGACY_NORMALIZATION_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
READER = "lerobot 0.6.1"


def saved_by(config: Mapping[str, Any], tensor_names: Iterable[str], has_processors: bool) -> str:
    """The lerobot release series that wrote this checkpoint: "0.4.x", "0.6.x", or an unsupported one."""
    if not has_processors and any(n.startswith(LEGACY_NORMALIZATION_PREFIXES) for n in tensor_names):
        return "0.3.x or older"
    unknown = sorted(set(config) - ACT_CONFIG_FIELDS_06)
    if unknown:
        return f"newer than 0.6.1 (config.json fields unknown to {READER}: {', '.join(unknown)})"
    return "0.6.x" if set(config) >= ONLY_FROM_06 else "0.4.x"


def require_supported(root: Path, series: str) -> str:
    """Refuse a checkpoint of an unsupported lerobot release with one line naming it."""
    if series in SUPPORTED:
        return series
    hint = ""
    if series.startswith("0.3"):
        hint = " (convert it with lerobot's lerobot/processor/migrate_policy_normalization.py)"
    raise QuantizationError(
        f"policy directory {root} was saved by lerobot {series}, which cannot be read here; "
        f"supported: checkpoints of lerobot {' and '.join(SUPPORTED)}{hint}"
    )
