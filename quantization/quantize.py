"""The `quantize` command: a LeRobot ACT checkpoint in, a verified FP32 or INT8 model bundle out."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from quantization import __version__
from quantization.backends import backend_for
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


@dataclass(frozen=True)
class QuantizeRequest:
    policy: Path
    mode: str  # fp32, dynamic, static
    backend: str  # torch, onnxruntime, executorch (quantization.backends)
    dataset: Path
    output: Path
    samples: int = DEFAULT_SAMPLES
    engine: str = "qnnpack"
    force: bool = False
    per_channel: bool = False  # torch static: per-channel weights (ONNX static is always per-channel)
    observer: str = "histogram"  # torch static activation observer
    onnx_calibration: str = "minmax"
    onnx_variant: str = "u8s8"  # ONNX static: quantization.quantize_onnx.ONNX_VARIANTS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("fp32", "dynamic", "static"):
            raise QuantizationError(f"unknown mode {self.mode!r} (fp32, dynamic or static)")
        backend_for(self.backend, self.mode)

    def settings(self) -> dict[str, Any]:
        """Everything that changes the produced model (part of the demo's cache key)."""
        return {
            "mode": self.mode,
            "backend": self.backend,
            "samples": self.samples if self.mode == "static" else 0,
            "engine": self.engine
            if backend_for(self.backend, self.mode).uses_engine and self.mode != "fp32"
            else None,
            "per_channel": self.per_channel,
            "observer": self.observer,
            "onnx_calibration": self.onnx_calibration,
            "onnx_variant": self.onnx_variant,
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

    backend = backend_for(request.backend, request.mode)
    write = backend.writer()
    loaded = load_policy(request.policy)
    spec = model_spec(loaded.config)
    names = check_dataset_features(request.dataset, spec)
    calibration: CalibrationSet | None = None
    if request.mode == "static":
        calibration = draw_calibration_set(request.dataset, spec, request.samples, seed=request.seed)
    model = build_inference_model(loaded.policy, loaded.preprocessor, loaded.postprocessor)

    def write_model(path: Path) -> Manifest:
        written = write(request, model, spec, calibration, path)
        return Manifest(
            schema_version=SCHEMA_VERSION,
            model_file=backend.model_file,
            model_format=backend.model_format,
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
                float_layers=written.float_layers,
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
                "executorch": _version("executorch"),
                "torchao": _version("torchao"),
                "settings": ", ".join(f"{k}={v}" for k, v in request.settings().items()),
            },
            delegation=written.delegation,
        )

    bundle = write_bundle(output, backend.model_file, write_model, force=request.force)
    if calibration is not None:
        log.info(calibration.summary())
    return bundle
