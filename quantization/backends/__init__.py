"""The model backends `quantize` can write: one module per backend, behind one small interface.

`quantize` picks a `Backend` by name and mode and calls its module; it never branches on the backend. Each
module (`torch`, `onnxruntime`, `executorch` beside this file) owns its options, export and calibration, and
its verification tolerance:

- `Options`: a frozen dataclass of the backend's knobs, with defaults;
- `add_arguments(group)`: its command-line options (every one defaulting to None, "not given");
- `options_from_args(args) -> Options`: the options from a parsed command line;
- `write_model(job, path) -> WrittenModel`: write the model file for `job.mode`;
- `TOLERANCES`: per mode, how far the written model's actions may be from the FP32 reference before
  `quantize` refuses it (`quantization.verify`).

The car's side is `rover_runtime.backends`, one module per backend too. A backend module is imported only
when used (torch's quantization, onnxruntime and executorch are heavy).
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from quantization.errors import QuantizationError
from rover_runtime.bundle import BACKEND_FORMATS, MODES, Delegation

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from quantization.act_inference import ModelSpec
    from quantization.calibration import CalibrationSet


@dataclass(frozen=True)
class Tolerance:
    """How far a written model's actions may be from the FP32 reference, in % of the action range."""

    mae_pct: float  # mean absolute error over every action of every verified frame
    max_pct: float  # the largest single error


# The usual limits, which a backend's TOLERANCES may use. FP32: the same float arithmetic, fused and
# reordered. INT8: the documented accuracy target is 1 % of the action range (MAE, on a trained policy); a
# model several times off that is broken, not imprecise, and is refused.
FLOAT_TOLERANCE = Tolerance(mae_pct=0.01, max_pct=0.1)
INT8_TOLERANCE = Tolerance(mae_pct=3.0, max_pct=30.0)


@dataclass(frozen=True)
class ExportJob:
    """What a backend writes a model file from."""

    model: nn.Module  # the re-expressed ACT (quantization.act_inference.InferenceACT), float, eval mode
    spec: ModelSpec
    mode: str
    calibration: CalibrationSet | None  # static mode only
    options: Any  # the backend module's Options


@dataclass(frozen=True)
class WrittenModel:
    """What a backend reports about the model file it wrote (recorded in the manifest)."""

    float_layers: tuple[str, ...] = ()
    delegation: Delegation | None = None
    engine: str | None = None  # torch's quantized engine the model needs, else None


class BackendModule(Protocol):
    TOLERANCES: dict[str, Tolerance]

    def add_arguments(self, group: argparse._ArgumentGroup) -> None: ...

    def options_from_args(self, args: argparse.Namespace) -> Any: ...

    def default_options(self) -> Any: ...

    def write_model(self, job: ExportJob, path: Path) -> WrittenModel: ...


@dataclass(frozen=True)
class Backend:
    name: str
    model_file: str
    modes: tuple[str, ...]
    module_name: str

    @property
    def model_format(self) -> str:
        return BACKEND_FORMATS[self.name]

    def module(self) -> BackendModule:
        module: BackendModule = importlib.import_module(self.module_name)
        return module


BACKENDS = {
    backend.name: backend
    for backend in (
        Backend("torch", "model.pt", ("fp32", "dynamic", "static"), "quantization.backends.torch"),
        Backend(
            "onnxruntime", "model.onnx", ("fp32", "dynamic", "static"), "quantization.backends.onnxruntime"
        ),
        # PT2E dynamic INT8 does not lower in executorch 1.5.1 ("dependency cycles"): fp32 and static only.
        Backend("executorch", "model.pte", ("fp32", "static"), "quantization.backends.executorch"),
    )
}
assert set(BACKENDS) == set(BACKEND_FORMATS)


def backend_for(name: str, mode: str) -> Backend:
    """The backend called `name`, if it offers `mode`; else a QuantizationError naming both."""
    if mode not in MODES:
        raise QuantizationError(f"unknown mode {mode!r} ({', '.join(MODES)})")
    backend = BACKENDS.get(name)
    if backend is None:
        raise QuantizationError(f"unknown backend {name!r} ({', '.join(BACKENDS)})")
    if mode not in backend.modes:
        others = [b.name for b in BACKENDS.values() if mode in b.modes]
        raise QuantizationError(
            f"the {name} backend has no {mode!r} mode ({', '.join(backend.modes)}); "
            f"{mode} is offered by {', '.join(others)}"
        )
    return backend


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """Every backend's own options, one argument group per backend (the CLI's `quantize`)."""
    for backend in BACKENDS.values():
        group = parser.add_argument_group(f"{backend.name} backend options")
        backend.module().add_arguments(group)


def options_from_args(backend: Backend, args: argparse.Namespace) -> Any:
    """The chosen backend's options; an option of another backend given on the command line is refused."""
    own = set(_option_flags(backend))
    for other in BACKENDS.values():
        if other.name == backend.name:
            continue
        for dest, flag in _option_flags(other).items():
            if dest not in own and getattr(args, dest, None) is not None:
                raise QuantizationError(
                    f"{flag} is an option of the {other.name} backend, not of {backend.name}"
                )
    return backend.module().options_from_args(args)


def _option_flags(backend: Backend) -> dict[str, str]:
    parser = argparse.ArgumentParser(add_help=False)
    backend.module().add_arguments(parser.add_argument_group())
    return {action.dest: action.option_strings[0] for action in parser._actions}
