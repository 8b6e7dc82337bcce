"""Export the re-expressed ACT as TorchScript (`.pt`) or ONNX (`.onnx`): loadable without lerobot."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantization.act_inference import ACTION_KEY, STATE_KEY, ModelSpec
from quantization.errors import QuantizationError, one_line

log = logging.getLogger(__name__)

ONNX_OPSET = 17


def input_names(spec: ModelSpec) -> list[str]:
    return [STATE_KEY, *spec.image_keys]


def export_torchscript(model: nn.Module, example_inputs: tuple[Tensor, ...], path: Path) -> Path:
    """Trace `model` (already quantized, if it is) and save it with torch.jit.save."""
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes read as Python ints
        trace: Any = torch.jit.trace
        traced = trace(model, example_inputs, check_trace=False)
        frozen = torch.jit.freeze(traced)
    torch.jit.save(frozen, str(path))
    log.info("wrote TorchScript model %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def export_onnx(model: nn.Module, spec: ModelSpec, example_inputs: tuple[Tensor, ...], path: Path) -> Path:
    """Export the float model to ONNX with a dynamic batch dimension (TorchScript-based exporter)."""
    model.eval()
    names = input_names(spec)
    dynamic_axes = {name: {0: "batch"} for name in [*names, ACTION_KEY]}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                example_inputs,
                str(path),
                input_names=names,
                output_names=[ACTION_KEY],
                dynamic_axes=dynamic_axes,
                opset_version=ONNX_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
    except Exception as exc:
        raise QuantizationError(f"ONNX export failed: {one_line(exc)}") from exc
    log.info("wrote ONNX model %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path
