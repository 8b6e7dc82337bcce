"""The onnxruntime backend: an ONNX bundle (FP32, dynamic or static QDQ INT8) on the CPU provider."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rover_runtime.backends import ModelError
from rover_runtime.bundle import Bundle


class OnnxModel:
    engine = None

    def __init__(self, session: Any) -> None:
        self._session = session
        self._names = [i.name for i in session.get_inputs()]

    def run(self, inputs: Sequence[NDArray[Any]]) -> NDArray[Any]:
        return np.asarray(self._session.run(None, dict(zip(self._names, inputs, strict=True)))[0])


def load(bundle: Bundle, threads: int, engine: str | None) -> OnnxModel:
    del engine  # torch's quantized engine: not used by ONNX Runtime
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError as exc:
        raise ModelError("an ONNX bundle needs onnxruntime (pip install 'rover-fleet[onnx]')") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(
            str(bundle.model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ModelError(f"bundle {bundle.root}: ONNX model does not load: {exc}") from exc
    expected = 1 + len(bundle.manifest.inputs.images)
    count = len(session.get_inputs())
    if count != expected:
        raise ModelError(
            f"bundle {bundle.root}: the ONNX model has {count} inputs, expected {expected} "
            f"(the state and {expected - 1} camera(s), as the manifest lists)"
        )
    return OnnxModel(session)
