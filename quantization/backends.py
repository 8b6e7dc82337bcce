"""The model backends `quantize` can write: one module per backend, each with the same `write_model`.

`quantize` picks a `Backend` by name and calls its module's
`write_model(request, model, spec, calibration, path) -> WrittenModel`; it never branches on the backend.
A backend module is imported only when used (torch's quantization, onnxruntime and executorch are heavy).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantization.errors import QuantizationError
from rover_runtime.bundle import BACKEND_FORMATS, Delegation

if TYPE_CHECKING:
    from quantization.calibration import CalibrationSet
    from quantization.quantize import QuantizeRequest


@dataclass(frozen=True)
class WrittenModel:
    """What a backend reports about the model file it wrote (recorded in the manifest)."""

    float_layers: tuple[str, ...] = ()
    delegation: Delegation | None = None


ModelWriter = Callable[["QuantizeRequest", Any, Any, "CalibrationSet | None", Path], WrittenModel]


@dataclass(frozen=True)
class Backend:
    name: str
    model_file: str
    modes: tuple[str, ...]
    module: str  # defines write_model
    uses_engine: bool = False  # QuantizeRequest.engine (torch's quantized engine) applies to INT8 modes

    @property
    def model_format(self) -> str:
        return BACKEND_FORMATS[self.name]

    def writer(self) -> ModelWriter:
        write: ModelWriter = importlib.import_module(self.module).write_model
        return write


BACKENDS = {
    backend.name: backend
    for backend in (
        Backend(
            "torch",
            "model.pt",
            ("fp32", "dynamic", "static"),
            "quantization.quantize_torch",
            uses_engine=True,
        ),
        Backend("onnxruntime", "model.onnx", ("fp32", "dynamic", "static"), "quantization.quantize_onnx"),
        # PT2E dynamic INT8 does not lower in executorch 1.5.1 ("dependency cycles"): fp32 and static only.
        Backend("executorch", "model.pte", ("fp32", "static"), "quantization.quantize_executorch"),
    )
}


def backend_for(name: str, mode: str) -> Backend:
    """The backend called `name`, if it offers `mode`; else a QuantizationError naming both."""
    backend = BACKENDS.get(name)
    if backend is None:
        raise QuantizationError(f"unknown backend {name!r} ({', '.join(BACKENDS)})")
    if mode not in backend.modes:
        raise QuantizationError(f"the {name} backend has no {mode!r} mode ({', '.join(backend.modes)})")
    return backend
