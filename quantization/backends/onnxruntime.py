"""ONNX Runtime INT8 quantization of the exported ACT.

- static: QDQ format, per-channel INT8 weights, calibrated on the same dataset samples as the torch backend
  (MinMax by default; Percentile / Entropy selectable). Activations are uint8 (U8S8) or int8 (S8S8), and the
  attention's activation x activation MatMuls (scores and weighted sum) are quantized or left in float: the
  `QdqVariant`s, compared in docs/quantization.md; `DEFAULT_VARIANT` is the one chosen there. The output's
  de-normalization to real units stays float (`act_inference.FLOAT_OUTPUT_MODULE`).
- dynamic: INT8 weights on MatMul/Gemm only (quantizing the convolutions dynamically is slower here).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from quantization.act_inference import FLOAT_OUTPUT_MODULE
from quantization.backends import FLOAT_TOLERANCE, INT8_TOLERANCE, ExportJob, WrittenModel
from quantization.errors import QuantizationError
from quantization.export import export_onnx, input_names

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
_COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class QdqVariant:
    name: str
    activations: str  # "u8" or "s8"
    attention_matmuls: str  # "int8" (quantized) or "float" (activation x activation MatMuls left in float)


ONNX_VARIANTS = (
    QdqVariant("u8s8", "u8", "int8"),
    QdqVariant("s8s8", "s8", "int8"),
    QdqVariant("u8s8_float_attention", "u8", "float"),
    QdqVariant("s8s8_float_attention", "s8", "float"),
)
VARIANTS_BY_NAME = {v.name: v for v in ONNX_VARIANTS}
DEFAULT_VARIANT = VARIANTS_BY_NAME["u8s8"]
TOLERANCES = {"fp32": FLOAT_TOLERANCE, "dynamic": INT8_TOLERANCE, "static": INT8_TOLERANCE}


@dataclass(frozen=True)
class Options:
    """The onnxruntime backend's options (static mode): calibration method and QDQ variant."""

    calibration: str = "minmax"
    variant: str = DEFAULT_VARIANT.name


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--onnx-calibration", choices=CALIBRATION_METHODS,
                       help="static: activation calibration (minmax)")  # fmt: skip
    group.add_argument("--onnx-int8", choices=tuple(VARIANTS_BY_NAME),
                       help="static: activation type, and whether the attention's activation x activation "
                       f"MatMuls are quantized ({DEFAULT_VARIANT.name}; docs/quantization.md)")  # fmt: skip


def default_options() -> Options:
    return Options()


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        calibration=args.onnx_calibration or "minmax", variant=args.onnx_int8 or DEFAULT_VARIANT.name
    )


def variant_named(name: str) -> QdqVariant:
    if name not in VARIANTS_BY_NAME:
        raise QuantizationError(f"unknown ONNX INT8 variant {name!r} ({', '.join(VARIANTS_BY_NAME)})")
    return VARIANTS_BY_NAME[name]


def activation_matmuls(model_path: Path) -> list[str]:
    """The MatMul nodes whose two inputs are both activations (no initializer): attention's QK^T and AV."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    return [
        node.name
        for node in graph.node
        if node.op_type == "MatMul" and not any(i in constants for i in node.input[:2])
    ]


def module_nodes(model_path: Path, module: str) -> list[str]:
    """The nodes the exporter made from the submodule `module` (named `/<module>/...`); at least one."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    nodes = [node.name for node in graph.node if node.name.startswith(f"/{module}/")]
    if not nodes:
        raise QuantizationError(f"the exported ONNX graph has no node of the module {module!r}")
    return nodes


class _SampleReader:
    """onnxruntime's CalibrationDataReader protocol over prepared model inputs."""

    def __init__(self, names: Sequence[str], samples: Sequence[tuple[Any, ...]]) -> None:
        self._names = list(names)
        self._samples = samples
        self._iter: Iterator[tuple[Any, ...]] = iter(samples)
        self.count = 0

    def get_next(self) -> dict[str, Any] | None:
        sample = next(self._iter, None)
        if sample is None:
            return None
        self.count += 1
        if self.count % 50 == 0:
            log.info("ONNX calibration %d/%d", self.count, len(self._samples))
        return {name: tensor.numpy() for name, tensor in zip(self._names, sample, strict=True)}

    def rewind(self) -> None:
        self._iter = iter(self._samples)


def quantize_static_qdq(
    fp32_path: Path,
    out_path: Path,
    input_names: Sequence[str],
    samples: Sequence[tuple[Any, ...]],
    *,
    method: str = "minmax",
    exclude_nodes: Sequence[str] = (),
    variant: QdqVariant = DEFAULT_VARIANT,
) -> None:

    if method not in CALIBRATION_METHODS:
        raise QuantizationError(
            f"unknown ONNX calibration method {method!r} ({', '.join(CALIBRATION_METHODS)})"
        )
    calibrate = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[method]

    class Reader(_SampleReader, CalibrationDataReader):  # type: ignore[misc]
        pass

    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".onnx-prep-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        exclude = [*exclude_nodes, *module_nodes(prepared, FLOAT_OUTPUT_MODULE)]
        if variant.attention_matmuls == "float":
            exclude += activation_matmuls(prepared)
        log.info(
            "ONNX static QDQ %s per-channel, %s calibration on %d samples (%d nodes left in float)",
            variant.name, method, len(samples), len(exclude),
        )  # fmt: skip
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(input_names, samples),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8 if variant.activations == "u8" else QuantType.QInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            nodes_to_exclude=exclude,
            # S8S8 with symmetric activations is what ORT's Arm kernels prefer.
            extra_options={"ActivationSymmetric": variant.activations == "s8"},
        )


def quantize_dynamic_matmul(fp32_path: Path, out_path: Path) -> None:

    quantize_dynamic(
        str(fp32_path), str(out_path), op_types_to_quantize=["MatMul", "Gemm"], weight_type=QuantType.QInt8
    )


def float_nodes(model_path: Path) -> list[str]:
    """Compute nodes (Conv/MatMul/Gemm) of a quantized ONNX model that run in float, then other float ops.

    A QDQ node is quantized when its inputs come from DequantizeLinear; a dynamic one is a MatMulInteger /
    DynamicQuantizeMatMul. Everything else (LayerNorm, Softmax, Add, ...) computes in float.
    """

    graph = onnx.load(str(model_path), load_external_data=False).graph
    produced_by = {out: node for node in graph.node for out in node.output}
    initializers = {init.name for init in graph.initializer}
    names: list[str] = []
    others: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"):
            continue
        if node.op_type in _COMPUTE_OPS:
            sources = [produced_by.get(i) for i in node.input[:2] if i and i not in initializers]
            weight_quantized = any(
                (src := produced_by.get(i)) is not None and src.op_type == "DequantizeLinear"
                for i in node.input[1:2]
            )
            acts_quantized = all(s is not None and s.op_type == "DequantizeLinear" for s in sources)
            if not (weight_quantized and acts_quantized):
                names.append(f"{node.name or node.output[0]} ({node.op_type}: float)")
        elif "Integer" not in node.op_type and node.op_type not in ("DynamicQuantizeMatMul",):
            others[node.op_type] += 1
    names.extend(f"{count} {op} node(s) (float)" for op, count in sorted(others.items()))
    return names


def write_model(job: ExportJob, path: Path) -> WrittenModel:
    """The onnxruntime backend: FP32 ONNX, then dynamic MatMul INT8 or static QDQ INT8 from it."""
    options: Options = job.options
    example = job.spec.example_inputs(1)
    if job.mode == "fp32":
        export_onnx(job.model, job.spec, example, path)
        return WrittenModel()
    work = path.parent / ".work"
    work.mkdir()
    try:
        fp32_path = export_onnx(job.model, job.spec, example, work / "fp32.onnx")
        if job.mode == "dynamic":
            quantize_dynamic_matmul(fp32_path, path)
        else:
            assert job.calibration is not None
            quantize_static_qdq(
                fp32_path, path, input_names(job.spec), job.calibration.inputs, method=options.calibration,
                variant=variant_named(options.variant),
            )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return WrittenModel(float_layers=tuple(float_nodes(path)))
