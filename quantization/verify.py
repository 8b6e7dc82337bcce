"""`quantize` proves what it writes: the car's own backend loads the bundle and runs it on held-out frames.

Before a bundle is published, its model file is loaded by `rover_runtime.backends` (ONNX Runtime, the
rover-executorch runtime without torch, or TorchScript: what the car runs), run on frames of the dataset's
held-out episodes, and its action chunks are compared with the float model it was made from. A model that
does not load, does not run, or is further off than its backend's tolerance for the mode is refused with one
line saying what to try instead; so is a static INT8 model file larger than `MAX_INT8_WEIGHTS_RATIO` of the
float weights (its weights were not quantized). What was verified goes into the manifest (`Verification`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from quantization.act_inference import ModelSpec
from quantization.backends import BACKENDS, Tolerance
from quantization.calibration import action_range
from quantization.compare import action_errors, load_eval_set
from quantization.errors import QuantizationError, one_line
from rover_runtime.backends import ModelError, load_model, runtime_version
from rover_runtime.bundle import Bundle, Verification

log = logging.getLogger(__name__)

DEFAULT_FRAMES = 16
VERIFY_THREADS = 2
# A static INT8 model holds INT8 weights: about a quarter of the float weights' bytes (plus scales, biases,
# the float layer norms and the program). Above this share the weights were not quantized.
MAX_INT8_WEIGHTS_RATIO = 0.40
REFERENCE = "the float re-expressed ACT (torch, eager) the file was made from"


@dataclass(frozen=True)
class VerificationFrames:
    """Held-out frames as model inputs, the float model's action chunks on them, and the action range."""

    inputs: list[tuple[Any, ...]]
    reference: NDArray[np.float32]  # [N, chunk_size, action_dim]
    ranges: NDArray[np.float64]  # [action_dim], max - min over the dataset
    episodes: tuple[int, ...]


def verification_frames(
    model: nn.Module, spec: ModelSpec, dataset_root: Path, count: int = DEFAULT_FRAMES
) -> VerificationFrames:
    """`count` frames spread over the held-out episodes, and what the float `model` predicts on them."""
    if count < 1:
        raise QuantizationError(f"--verify-frames must be at least 1, got {count}")
    frames = load_eval_set(dataset_root, spec, count)
    with torch.no_grad():
        reference = np.concatenate([model(*x).numpy() for x in frames.inputs], axis=0).astype(np.float32)
    ranges = np.asarray(action_range(dataset_root), dtype=np.float64)
    return VerificationFrames(frames.inputs, reference, ranges, tuple(frames.episodes))


def float_weight_bytes(model: nn.Module) -> int:
    """The bytes of the float model's parameters and buffers: what an FP32 model file mostly holds."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _next_step(backend: str, mode: str) -> str:
    others = [b.name for b in BACKENDS.values() if b.name != backend and mode in b.modes]
    tries = [f"--backend {name} --mode {mode}" for name in others]
    if mode != "fp32":
        tries.append(f"--backend {backend} --mode fp32")
    return f"try {' or '.join(tries)}" if tries else "no other backend offers this mode"


def verify_bundle(
    bundle: Bundle, frames: VerificationFrames, tolerance: Tolerance, float_bytes: int
) -> Verification:
    """Load `bundle` with the car's backend, run it on `frames` and check it against the float reference."""
    m = bundle.manifest
    what = f"{m.mode} {m.backend} model"
    next_step = _next_step(m.backend, m.mode)
    ratio = None
    if m.mode != "fp32":
        ratio = m.model_bytes / float_bytes
        if m.mode == "static" and ratio > MAX_INT8_WEIGHTS_RATIO:
            raise QuantizationError(
                f"the {what} is {ratio:.2f}x the float weights' size ({m.model_bytes / 1e6:.1f} MB against "
                f"{float_bytes / 1e6:.1f} MB; at most {MAX_INT8_WEIGHTS_RATIO:.2f}x): weights not quantized; "
                f"{next_step}"
            )
    try:
        model = load_model(bundle, VERIFY_THREADS, m.engine)
    except ModelError as exc:
        raise QuantizationError(
            f"the car's {m.backend} runtime cannot load the {what}: {one_line(exc)}; {next_step}"
        ) from exc
    try:
        outputs = [np.asarray(model.run([np.asarray(t) for t in x]), dtype=np.float32) for x in frames.inputs]
    except Exception as exc:
        raise QuantizationError(
            f"the car's {m.backend} runtime cannot run the {what}: {one_line(exc)}; {next_step}"
        ) from exc
    expected = frames.reference.shape[1:]
    bad_shape = next((o.shape for o in outputs if o.shape[1:] != expected or o.shape[0] != 1), None)
    if bad_shape is not None:
        raise QuantizationError(
            f"the {what} returns actions of shape {list(bad_shape)}, expected {[1, *expected]}; {next_step}"
        )
    predicted = np.concatenate(outputs, axis=0)
    if not np.isfinite(predicted).all():
        raise QuantizationError(f"the {what} returns non-finite actions on held-out frames; {next_step}")
    errors = action_errors(
        predicted, frames.reference, np.ones(predicted.shape[:2], dtype=bool), frames.ranges
    )
    mae_pct, max_pct = errors["mae_pct_range"], errors["max_pct_range"]
    if mae_pct > tolerance.mae_pct or max_pct > tolerance.max_pct:
        raise QuantizationError(
            f"the {what} is off: on {len(outputs)} held-out frames its actions differ from the float model's "
            f"by {mae_pct:.3f} % of the action range on average and {max_pct:.2f} % at most (allowed "
            f"{tolerance.mae_pct} % and {tolerance.max_pct} %); {next_step}"
        )
    log.info(
        "verified with the car's %s runtime on %d held-out frames: %.4f %% of the action range on average, "
        "%.3f %% at most",
        m.backend, len(outputs), mae_pct, max_pct,
    )  # fmt: skip
    return Verification(
        frames=len(outputs),
        reference=REFERENCE,
        runtime=f"rover_runtime.backends ({m.backend})",
        runtime_version=runtime_version(m.backend),
        threads=VERIFY_THREADS,
        mae=errors["mae"],
        max_abs=errors["max_abs"],
        mae_pct_range=mae_pct,
        max_pct_range=max_pct,
        tolerance_mae_pct=tolerance.mae_pct,
        tolerance_max_pct=tolerance.max_pct,
        weights_ratio=ratio,
    )
