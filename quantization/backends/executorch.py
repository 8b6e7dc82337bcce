"""ExecuTorch export of the re-expressed ACT, lowered to the XNNPACK delegate (`.pte`).

- fp32: `torch.export` -> `to_edge_transform_and_lower` with `XnnpackPartitioner` -> `.pte`: the reference
  for the INT8 program, run by the same runtime.
- static: torchao's PT2E flow with executorch's `XNNPACKQuantizer` (symmetric INT8, per-channel weights,
  per-tensor activations), calibrated on the same dataset samples as the other backends, then lowered the
  same way. The output's de-normalization to real units stays float (`act_inference.FLOAT_OUTPUT_MODULE`).
  Each camera gets its own copy of the image encoder first (`act_inference.unshare_image_encoder`): the
  quantizer annotates a shared weight only at its first use, so with one shared backbone every camera after
  the first stayed float and XNNPACK refused the program.
  (The PT2E *dynamic* configuration does not lower in executorch 1.5.1, "dependency cycles", so there is no
  dynamic mode here.)

What XNNPACK does not take stays in ExecuTorch's portable/optimized kernels, far slower: the partition is
recorded in the manifest (`Delegation`), and an export whose heavy operators (convolutions, linears, matrix
products) are not all delegated, or of which less than `MIN_DELEGATED_FRACTION` of the compute nodes are,
is refused (see `check_delegation`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quantization.act_inference import FLOAT_OUTPUT_MODULE, InferenceACT, unshare_image_encoder
from quantization.backends import FLOAT_TOLERANCE, INT8_TOLERANCE, ExportJob, WrittenModel
from quantization.errors import QuantizationError, one_line
from rover_runtime.bundle import Delegation

log = logging.getLogger(__name__)

DELEGATE = "XnnpackBackend"
# The operators that carry nearly all of ACT's arithmetic: any of them outside XNNPACK runs in ExecuTorch's
# reference kernels (the stock lerobot modules left 363 of 954 nodes outside and took about 590 ms instead of
# 15 ms; findings.md).
HEAVY_OPERATORS = ("convolution", "linear", "addmm", "mm", "bmm", "matmul")
# Below this share of compute nodes in the delegate an export is refused. The re-expressed ACT delegates
# every heavy operator and most of the rest; the stock lerobot modules delegated 62 %.
MIN_DELEGATED_FRACTION = 0.80
# Nodes that only move data between the delegate calls and the program's inputs and outputs.
_BOOKKEEPING = ("getitem", "executorch_call_delegate", "lowered_module", "output", "placeholder")
TOLERANCES = {"fp32": FLOAT_TOLERANCE, "static": INT8_TOLERANCE}


@dataclass(frozen=True)
class Options:
    """The executorch backend has no options of its own (XNNPACK, symmetric per-channel INT8 weights)."""


def add_arguments(group: argparse._ArgumentGroup) -> None:
    del group  # none


def default_options() -> Options:
    return Options()


def options_from_args(args: argparse.Namespace) -> Options:
    del args
    return Options()


def _export(model: nn.Module, example: tuple[Tensor, ...]) -> Any:
    try:
        return torch.export.export(model, example, strict=False)
    except Exception as exc:
        raise QuantizationError(f"torch.export of the ACT failed: {one_line(exc)}") from exc


def quantize_static_pt2e(
    model: nn.Module, example: tuple[Tensor, ...], samples: Sequence[tuple[Any, ...]]
) -> Any:
    """PT2E static INT8 for XNNPACK, calibrated on `samples`; returns the converted (Q/DQ) module."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (  # noqa: PLC0415
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: PLC0415

    model.eval()
    captured = _export(model, example).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    quantizer.set_filter_function(_outside_module(FLOAT_OUTPUT_MODULE))
    prepared = prepare_pt2e(captured, quantizer)
    log.info(
        "ExecuTorch PT2E static INT8 (XNNPACK, per-channel weights): calibrating on %d samples", len(samples)
    )
    with torch.no_grad():
        for i, sample in enumerate(samples, 1):
            prepared(*sample)
            if i % 50 == 0:
                log.info("PT2E calibration %d/%d", i, len(samples))
    return convert_pt2e(prepared)


def _outside_module(name: str) -> Callable[[Any], bool]:
    """A quantizer filter: true for the graph nodes that do not run inside the submodule `name`."""

    def outside(node: Any) -> bool:
        stack = node.meta.get("nn_module_stack", {})
        return not any(path == name or path.startswith(f"{name}.") for path, _ in stack.values())

    return outside


def lower_to_pte(model: nn.Module, example: tuple[Tensor, ...], path: Path) -> Delegation:
    """Export `model`, lower it to XNNPACK, refuse a poorly delegated program, write the `.pte`."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: PLC0415
    from executorch.exir import to_edge_transform_and_lower  # noqa: PLC0415

    program = _export(model, example)
    try:
        edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    except Exception as exc:
        raise QuantizationError(f"lowering to ExecuTorch/XNNPACK failed: {one_line(exc)}") from exc
    delegation = delegation_of(edge.exported_program().graph_module)
    check_delegation(delegation)
    try:
        executorch_program = edge.to_executorch()
    except Exception as exc:
        raise QuantizationError(f"writing the ExecuTorch program failed: {one_line(exc)}") from exc
    path.write_bytes(executorch_program.buffer)
    log.info(
        "wrote ExecuTorch program %s (%.1f MB): %d of %d compute nodes in %s",
        path,
        path.stat().st_size / 1e6,
        delegation.nodes_delegated,
        delegation.nodes_delegated + delegation.nodes_not_delegated,
        DELEGATE,
    )
    return delegation


def delegation_of(graph_module: Any) -> Delegation:
    """Count the lowered graph's compute nodes inside and outside the delegate, per operator."""
    from executorch.devtools.backend_debug import get_delegation_info  # noqa: PLC0415

    info = get_delegation_info(graph_module)
    outside: dict[str, int] = {}
    inside = 0
    for name, row in info.delegation_by_operator.items():
        if any(b in name for b in _BOOKKEEPING):
            continue
        inside += int(row.delegated)
        if row.non_delegated:
            outside[name] = int(row.non_delegated)
    return Delegation(
        delegate=DELEGATE,
        nodes_delegated=inside,
        nodes_not_delegated=sum(outside.values()),
        not_delegated=tuple(f"{name}: {count}" for name, count in sorted(outside.items())),
    )


def check_delegation(delegation: Delegation) -> None:
    """Refuse a program whose heavy operators are not all in XNNPACK or whose delegated share is too low."""
    heavy = [entry for entry in delegation.not_delegated if _is_heavy(entry)]
    fraction = delegation.fraction
    if heavy or fraction < MIN_DELEGATED_FRACTION:
        heavy_count = sum(int(entry.rsplit(":", 1)[1]) for entry in heavy)
        raise QuantizationError(
            f"the ExecuTorch export leaves too much outside XNNPACK: {delegation.nodes_delegated} of "
            f"{delegation.nodes_delegated + delegation.nodes_not_delegated} compute nodes delegated "
            f"({fraction:.0%}), {heavy_count} convolution/linear/matmul nodes outside; refused below "
            f"{MIN_DELEGATED_FRACTION:.0%} or with any of those outside. Outside: "
            f"{', '.join(delegation.not_delegated[:12]) or 'none'}"
        )


def write_model(job: ExportJob, path: Path) -> WrittenModel:
    """The executorch backend: an XNNPACK-lowered `.pte`, FP32 or PT2E static INT8."""
    samples = None
    model = job.model
    if job.mode == "static":
        assert job.calibration is not None
        assert isinstance(model, InferenceACT)
        samples = job.calibration.inputs
        model = unshare_image_encoder(model)
    delegation = export_program(model, job.spec.example_inputs(1), path, samples)
    return WrittenModel(float_layers=delegation.not_delegated, delegation=delegation)


def export_program(
    model: nn.Module,
    example: tuple[Tensor, ...],
    path: Path,
    calibration_samples: Sequence[tuple[Any, ...]] | None = None,
) -> Delegation:
    """The `.pte` of `model` at `path`: FP32, or PT2E static INT8 when `calibration_samples` are given."""
    model.eval()
    if calibration_samples is not None:
        model = quantize_static_pt2e(model, example, calibration_samples)
    return lower_to_pte(model, example, path)


def _is_heavy(entry: str) -> bool:
    """Whether a `not_delegated` entry ("aten_linear_default: 2") is one of HEAVY_OPERATORS."""
    operator = entry.split(":", maxsplit=1)[0]
    return any(operator.startswith(f"aten_{op}_") for op in HEAVY_OPERATORS)
