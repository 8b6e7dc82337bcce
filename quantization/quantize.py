"""The `quantize` command: a LeRobot ACT checkpoint in, a verified FP32 or INT8 model bundle out."""

from __future__ import annotations

import logging
import platform
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from quantization import __version__
from quantization.bundle_writer import check_output, write_bundle
from quantization.calibration import (
    DEFAULT_SAMPLES,
    CalibrationSet,
    check_dataset_features,
    draw_calibration_set,
)
from quantization.errors import QuantizationError
from quantization.policy_loading import check_policy_dir
from rover_runtime.bundle import (
    SCHEMA_VERSION,
    Bundle,
    Calibration,
    ImageInput,
    InputSpec,
    Manifest,
    OutputSpec,
    SourcePolicy,
)

log = logging.getLogger(__name__)

MODEL_FILES = {"torch": ("model.pt", "torchscript"), "onnxruntime": ("model.onnx", "onnx")}


@dataclass(frozen=True)
class QuantizeRequest:
    policy: Path
    mode: str  # fp32, dynamic, static
    backend: str  # torch, onnxruntime
    dataset: Path
    output: Path
    samples: int = DEFAULT_SAMPLES
    engine: str = "qnnpack"
    force: bool = False
    per_channel: bool = False  # torch static: per-channel weights (ONNX static is always per-channel)
    observer: str = "histogram"  # torch static activation observer
    onnx_calibration: str = "minmax"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("fp32", "dynamic", "static"):
            raise QuantizationError(f"unknown mode {self.mode!r} (fp32, dynamic or static)")
        if self.backend not in MODEL_FILES:
            raise QuantizationError(f"unknown backend {self.backend!r} (torch or onnxruntime)")

    def settings(self) -> dict[str, Any]:
        """Everything that changes the produced model (part of the demo's cache key)."""
        return {
            "mode": self.mode,
            "backend": self.backend,
            "samples": self.samples if self.mode == "static" else 0,
            "engine": self.engine if self.backend == "torch" and self.mode != "fp32" else None,
            "per_channel": self.per_channel,
            "observer": self.observer,
            "onnx_calibration": self.onnx_calibration,
            "seed": self.seed,
        }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def quantize_policy(request: QuantizeRequest) -> Bundle:
    """Run the whole quantize command; leaves either a complete verified bundle or nothing."""
    output = request.output.absolute()
    check_output(output, request.force)
    check_policy_dir(request.policy)

    import torch  # noqa: PLC0415

    from quantization.act_inference import build_inference_model, inference_parameter_count, model_spec  # noqa: PLC0415
    from quantization.policy_loading import load_policy  # noqa: PLC0415
    from quantization.quantize_torch import set_engine  # noqa: PLC0415

    if request.backend == "torch" and request.mode != "fp32":
        set_engine(request.engine)
    loaded = load_policy(request.policy)
    spec = model_spec(loaded.config)
    names = check_dataset_features(request.dataset, spec)
    calibration: CalibrationSet | None = None
    if request.mode == "static":
        calibration = draw_calibration_set(request.dataset, spec, request.samples, seed=request.seed)
    model = build_inference_model(loaded.policy, loaded.preprocessor, loaded.postprocessor)
    model_file, model_format = MODEL_FILES[request.backend]

    def write_model(path: Path) -> Manifest:
        floats = _write_model(request, model, spec, calibration, path)
        return Manifest(
            schema_version=SCHEMA_VERSION,
            model_file=model_file,
            model_format=model_format,
            mode=request.mode,
            backend=request.backend,
            engine=request.settings()["engine"],
            source=SourcePolicy(
                path=str(request.policy.absolute()),
                weights_sha256=loaded.weights_sha256,
                policy_type="act",
                lerobot_version=_version("lerobot"),
                torch_version=str(torch.__version__),
                parameters_total=sum(p.numel() for p in loaded.policy.parameters()),
                parameters_inference=inference_parameter_count(model),
                checkpoint_bytes=loaded.files.weights.stat().st_size,
            ),
            inputs=InputSpec(
                state_key="observation.state",
                state_dim=spec.state_dim,
                state_names=names.state_names,
                images=tuple(
                    ImageInput(key=k, shape=s)
                    for k, s in zip(spec.image_keys, spec.image_shapes, strict=True)
                ),
            ),
            outputs=OutputSpec(
                action_key="action",
                action_names=names.action_names,
                action_dim=spec.action_dim,
                chunk_size=spec.chunk_size,
                n_action_steps=spec.n_action_steps,
                temporal_ensemble_coeff=spec.temporal_ensemble_coeff,
            ),
            normalization="baked",
            calibration=Calibration(
                requested=calibration.requested if calibration else 0,
                succeeded=calibration.succeeded if calibration else 0,
                failures=tuple(calibration.failures) if calibration else (),
                dataset=str(request.dataset.absolute()),
                episodes=calibration.episodes if calibration else (),
                float_layers=tuple(floats),
            ),
            files=(),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            tool_versions={
                "quantization": __version__,
                "checkpoint_saved_by_lerobot": loaded.files.lerobot_series,
                "python": platform.python_version(),
                "torch": str(torch.__version__),
                "onnx": _version("onnx"),
                "onnxruntime": _version("onnxruntime"),
                "settings": ", ".join(f"{k}={v}" for k, v in request.settings().items()),
            },
        )

    bundle = write_bundle(output, model_file, write_model, force=request.force)
    if calibration is not None:
        log.info(calibration.summary())
    return bundle


def _write_model(
    request: QuantizeRequest, model: Any, spec: Any, calibration: CalibrationSet | None, path: Path
) -> list[str]:
    """Write the model file; return the names of the layers left in float."""
    from quantization.export import export_onnx, export_torchscript, input_names  # noqa: PLC0415
    from quantization.quantize_onnx import float_nodes, quantize_dynamic_matmul, quantize_static_qdq  # noqa: PLC0415
    from quantization.quantize_torch import StaticOptions, float_layers, quantize_dynamic, quantize_static  # noqa: PLC0415

    example = spec.example_inputs(1)
    if request.backend == "torch":
        if request.mode == "fp32":
            export_torchscript(model, example, path)
            return []
        if request.mode == "dynamic":
            qmodel = quantize_dynamic(model, request.engine)
        else:
            assert calibration is not None
            options = StaticOptions(per_channel=request.per_channel, observer=request.observer)
            qmodel = quantize_static(model, calibration.inputs, request.engine, options)
        export_torchscript(qmodel, example, path)
        return float_layers(qmodel)
    if request.mode == "fp32":
        export_onnx(model, spec, example, path)
        return []
    work = path.parent / ".work"
    work.mkdir()
    try:
        fp32_path = export_onnx(model, spec, example, work / "fp32.onnx")
        if request.mode == "dynamic":
            quantize_dynamic_matmul(fp32_path, path)
        else:
            assert calibration is not None
            quantize_static_qdq(
                fp32_path, path, input_names(spec), calibration.inputs, method=request.onnx_calibration
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return float_nodes(path)
