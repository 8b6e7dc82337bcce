"""ONNX Runtime INT8 quantization of the exported ACT.

- static: QDQ format, U8S8 (uint8 activations, int8 weights), per-channel weights, calibrated on the same
  dataset samples as the torch backend (MinMax by default; Percentile / Entropy selectable).
- dynamic: INT8 weights on MatMul/Gemm only (quantizing the convolutions dynamically is slower here).
"""

from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
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

from quantization.errors import QuantizationError

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
_COMPUTE_OPS = ("Conv", "MatMul", "Gemm")


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
        log.info("ONNX static QDQ U8S8 per-channel, %s calibration on %d samples", method, len(samples))
        quantize_static(
            str(prepared),
            str(out_path),
            Reader(input_names, samples),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate,
            nodes_to_exclude=list(exclude_nodes),
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
