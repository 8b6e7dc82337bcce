"""PyTorch eager-mode INT8 quantization of the re-expressed ACT.

- dynamic: INT8 weights, float activations, on every `nn.Linear` (the attention q/k/v/out projections,
  the feed-forward layers, the state projection and the action head).
- static: the image encoder (ResNet trunk with batch norm folded, conv+ReLU fused, and ACT's 1x1 input
  projection) gets INT8 weights and activations between a QuantStub and a DeQuantStub, calibrated on
  dataset samples; the transformer's linears get dynamic INT8. Whatever stays float (LayerNorms, the
  attention core, the precomputed position embeddings and constants) is listed by `float_layers`.

The qconfig and the quantized engine must match the machine that runs the model: `qnnpack` for the
Raspberry Pi (the default); `x86`/`fbgemm` are faster on an x86 host.
"""

from __future__ import annotations

import argparse
import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.ao import quantization as _tq

from quantization.act_inference import InferenceACT
from quantization.backends import FLOAT_TOLERANCE, INT8_TOLERANCE, ExportJob, WrittenModel
from quantization.errors import QuantizationError
from quantization.export import export_torchscript

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)
tq: Any = _tq  # torch.ao.quantization is untyped

DEFAULT_ENGINE = "qnnpack"
OBSERVERS = ("histogram", "minmax")
TOLERANCES = {"fp32": FLOAT_TOLERANCE, "dynamic": INT8_TOLERANCE, "static": INT8_TOLERANCE}


@dataclass(frozen=True)
class StaticOptions:
    """Knobs of static quantization (defaults: the engine's own default qconfig)."""

    per_channel: bool = False
    observer: str = "histogram"  # or "minmax"


@dataclass(frozen=True)
class Options:
    """The torch backend's options: the quantized engine (INT8 modes) and static quantization's knobs."""

    engine: str = DEFAULT_ENGINE
    static: StaticOptions = StaticOptions()


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--engine", help=f"torch quantized engine for the INT8 modes ({DEFAULT_ENGINE}, the default, for the "
        "Pi; x86 or fbgemm on an x86 host)",
    )  # fmt: skip
    group.add_argument("--per-channel", action="store_true", default=None,
                       help="static: per-channel INT8 weights")  # fmt: skip
    group.add_argument("--observer", choices=OBSERVERS, help="static: activation observer (histogram)")


def default_options() -> Options:
    return Options()


def options_from_args(args: argparse.Namespace) -> Options:
    return Options(
        engine=args.engine or DEFAULT_ENGINE,
        static=StaticOptions(per_channel=bool(args.per_channel), observer=args.observer or "histogram"),
    )


def set_engine(engine: str) -> None:
    """Select the quantized engine; refuse one this torch build does not have."""
    supported = torch.backends.quantized.supported_engines
    if engine not in supported:
        raise QuantizationError(
            f"quantized engine {engine!r} is not available in this torch build (has: {', '.join(supported)})"
        )
    torch.backends.quantized.engine = engine


def static_qconfig(engine: str, options: StaticOptions) -> Any:
    reduce_range = engine in ("x86", "fbgemm")
    observers: dict[str, Any] = {
        "histogram": tq.HistogramObserver,
        "minmax": tq.MinMaxObserver,
    }
    if options.observer not in observers:
        raise QuantizationError(f"unknown observer {options.observer!r} (histogram or minmax)")
    activation = observers[options.observer].with_args(reduce_range=reduce_range)
    if options.per_channel:
        weight = tq.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
    else:
        weight = tq.MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return tq.QConfig(activation=activation, weight=weight)


def quantize_dynamic(model: InferenceACT, engine: str = DEFAULT_ENGINE) -> nn.Module:
    """INT8 weights / float activations on every nn.Linear."""
    set_engine(engine)
    float_model = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization names torchao
        quantized = tq.quantize_dynamic(float_model, {nn.Linear}, dtype=torch.qint8)
    log.info("dynamic INT8: %d linear layers quantized", _count(quantized, "DynamicQuantizedLinear"))
    result: nn.Module = quantized
    return result


def quantize_static(
    model: InferenceACT,
    calibration_inputs: Sequence[tuple[Tensor, ...]],
    engine: str = DEFAULT_ENGINE,
    options: StaticOptions | None = None,
) -> nn.Module:
    """Static INT8 image encoder + dynamic INT8 linears."""
    if not calibration_inputs:
        raise QuantizationError("static quantization needs at least one calibration sample")
    options = options or StaticOptions()
    set_engine(engine)
    qmodel = copy.deepcopy(model).eval()
    encoder = qmodel.image_encoder
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=__name__)
    tq.fuse_modules(encoder, encoder.fusion_groups(), inplace=True)
    encoder.qconfig = static_qconfig(engine, options)
    tq.prepare(qmodel, inplace=True)
    log.info("calibrating on %d samples", len(calibration_inputs))
    with torch.no_grad():
        for i, inputs in enumerate(calibration_inputs):
            qmodel(*inputs)
            if (i + 1) % 50 == 0:
                log.info("calibration %d/%d", i + 1, len(calibration_inputs))
    tq.convert(qmodel, inplace=True)
    qmodel = tq.quantize_dynamic(qmodel, {nn.Linear}, dtype=torch.qint8)
    log.info(
        "static INT8: %d convolutions static, %d linears dynamic",
        _count(qmodel, "Conv"),
        _count(qmodel, "DynamicQuantizedLinear"),
    )
    result: nn.Module = qmodel
    return result


def _count(model: nn.Module, kind: str) -> int:
    return sum(1 for m in model.modules() if kind in _kind(m))


def _kind(module: nn.Module) -> str:
    """A readable type name: quantized classes share names with float ones, so add the package."""
    cls = type(module)
    if ".quantized.dynamic" in cls.__module__:
        return f"DynamicQuantized{cls.__name__}"
    if ".quantized" in cls.__module__ and "intrinsic" in cls.__module__:
        return f"Quantized{cls.__name__}(Conv)" if "Conv" in cls.__name__ else f"Quantized{cls.__name__}"
    if ".quantized" in cls.__module__:
        return f"Quantized{cls.__name__}"
    return cls.__name__


def float_layers(model: nn.Module) -> list[str]:
    """Every leaf layer of a (partly) quantized model that still computes in float, with why.

    Weight-holding float modules (e.g. LayerNorm) are named as they are; dynamic INT8 linears are named with
    a note (their activations are float); the functional parts that always run in float are listed last.
    """
    names = []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind.startswith("DynamicQuantized"):
            names.append(f"{name} ({kind}: INT8 weights, float activations)")
        elif kind in ("LayerNorm", "Linear", "Conv2d", "Embedding"):
            names.append(f"{name} ({kind}: float)")
    names.append("attention scores, softmax and weighted sums (functional: float)")
    names.append("state/image normalization and action un-normalization (float constants)")
    return names


def quantized_layers(model: nn.Module) -> list[str]:
    """Leaf layers with INT8 weights (static or weight-only), for the report."""
    return [
        f"{name} ({_kind(m)})"
        for name, m in model.named_modules()
        if _kind(m).startswith(("Quantized", "DynamicQuantized"))
        and "PackedParams" not in _kind(m)
        and "Stub" not in _kind(m)
        and "FloatFunctional" not in _kind(m)
        and "DeQuantize" not in _kind(m)
        and _kind(m).removeprefix("Quantized") != "Quantize"
    ]


def write_model(job: ExportJob, path: Path) -> WrittenModel:
    """The torch backend: TorchScript FP32, or eager-mode dynamic/static INT8 for `options.engine`."""
    options: Options = job.options
    example = job.spec.example_inputs(1)
    if job.mode == "fp32":
        export_torchscript(job.model, example, path)
        return WrittenModel()
    assert isinstance(job.model, InferenceACT)
    if job.mode == "dynamic":
        qmodel = quantize_dynamic(job.model, options.engine)
    else:
        assert job.calibration is not None
        qmodel = quantize_static(job.model, job.calibration.inputs, options.engine, options.static)
    export_torchscript(qmodel, example, path)
    return WrittenModel(float_layers=tuple(float_layers(qmodel)), engine=options.engine)
