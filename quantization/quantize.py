"""The `quantize` command: a LeRobot ACT checkpoint in, a verified FP32 or INT8 model bundle out.

`quantize_policy` picks the backend (`quantization.backends`) and never branches on it: the backend writes
the model file, `quantization.verify` runs it with the car's own runtime against the float model, and
`build_manifest` describes it. Either a complete, verified bundle is published, or nothing is.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantization import __version__
from quantization.backends import Backend, ExportJob, WrittenModel, backend_for
from quantization.bundle_writer import check_output, write_bundle
from quantization.calibration import (
    DEFAULT_SAMPLES,
    CalibrationSet,
    DatasetFeatures,
    check_dataset_features,
    draw_calibration_set,
)
from quantization.policy_loading import check_policy_dir
from quantization.verify import DEFAULT_FRAMES
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

if TYPE_CHECKING:
    from quantization.act_inference import ModelSpec
    from quantization.policy_loading import LoadedPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantizeRequest:
    policy: Path
    mode: str  # fp32, dynamic, static
    backend: str  # torch, onnxruntime, executorch (quantization.backends)
    dataset: Path
    output: Path
    samples: int = DEFAULT_SAMPLES
    force: bool = False
    options: Any = field(default=None)  # the backend's Options; None: its defaults
    seed: int = 0
    verify_frames: int = DEFAULT_FRAMES

    def __post_init__(self) -> None:
        backend = backend_for(self.backend, self.mode)
        if self.options is None:
            object.__setattr__(self, "options", backend.module().default_options())

    def settings(self) -> dict[str, Any]:
        """Everything that changes the produced model (part of the demo's cache key)."""
        return {
            "mode": self.mode,
            "backend": self.backend,
            "samples": self.samples if self.mode == "static" else 0,
            "options": asdict(self.options),
            "seed": self.seed,
            "verify_frames": self.verify_frames,
        }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def build_manifest(
    request: QuantizeRequest,
    *,
    backend: Backend,
    loaded: LoadedPolicy,
    spec: ModelSpec,
    names: DatasetFeatures,
    calibration: CalibrationSet | None,
    written: WrittenModel,
    parameters_inference: int,
) -> Manifest:
    """The manifest of a freshly written model file (its `files` are filled in by `write_bundle`)."""
    import torch  # noqa: PLC0415

    return Manifest(
        schema_version=SCHEMA_VERSION,
        model_file=backend.model_file,
        model_format=backend.model_format,
        mode=request.mode,
        backend=request.backend,
        engine=written.engine,
        source=SourcePolicy(
            path=str(request.policy.absolute()),
            weights_sha256=loaded.weights_sha256,
            policy_type="act",
            lerobot_version=_version("lerobot"),
            torch_version=str(torch.__version__),
            parameters_total=sum(p.numel() for p in loaded.policy.parameters()),
            parameters_inference=parameters_inference,
            checkpoint_bytes=loaded.files.weights.stat().st_size,
        ),
        inputs=InputSpec(
            state_key="observation.state",
            state_dim=spec.state_dim,
            state_names=names.state_names,
            images=tuple(
                ImageInput(key=k, shape=s) for k, s in zip(spec.image_keys, spec.image_shapes, strict=True)
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


def quantize_policy(request: QuantizeRequest) -> Bundle:
    """Run the whole quantize command; leaves either a complete verified bundle or nothing."""
    output = request.output.absolute()
    check_output(output, request.force)
    check_policy_dir(request.policy)

    from quantization.act_inference import build_inference_model, inference_parameter_count, model_spec  # noqa: PLC0415
    from quantization.policy_loading import load_policy  # noqa: PLC0415
    from quantization.verify import float_weight_bytes, verification_frames, verify_bundle  # noqa: PLC0415

    backend = backend_for(request.backend, request.mode)
    module = backend.module()
    loaded = load_policy(request.policy)
    spec = model_spec(loaded.config)
    names = check_dataset_features(request.dataset, spec)
    calibration: CalibrationSet | None = None
    if request.mode == "static":
        calibration = draw_calibration_set(request.dataset, spec, request.samples, seed=request.seed)
    model = build_inference_model(loaded.policy, loaded.preprocessor, loaded.postprocessor)
    frames = verification_frames(model, spec, request.dataset, request.verify_frames)
    job = ExportJob(
        model=model, spec=spec, mode=request.mode, calibration=calibration, options=request.options
    )

    def write_model(path: Path) -> Manifest:
        written = module.write_model(job, path)
        return build_manifest(
            request, backend=backend, loaded=loaded, spec=spec, names=names, calibration=calibration,
            written=written, parameters_inference=inference_parameter_count(model),
        )  # fmt: skip

    def verify(bundle: Bundle) -> Any:
        return verify_bundle(bundle, frames, module.TOLERANCES[request.mode], float_weight_bytes(model))

    bundle = write_bundle(output, backend.model_file, write_model, force=request.force, verify=verify)
    if calibration is not None:
        log.info(calibration.summary())
    return bundle
