"""Helpers for the runtime's tests and benchmarks (not used when driving): tiny real bundles.

`write_tiny_bundle` builds a small torch module that follows the bundle calling convention (state
[B, state_dim], one image [B, 3, H, W] per camera -> action [B, chunk, 2]), saves it as TorchScript or
exports it to ONNX, and writes a manifest through `rover_runtime.bundle` (file hashes included). Needs torch
(and onnx for ONNX).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rover_runtime.bundle import (
    SCHEMA_VERSION,
    Calibration,
    ImageInput,
    InputSpec,
    Manifest,
    OutputSpec,
    SourcePolicy,
    file_entries,
    write_manifest,
)

TINY_IMAGE_SHAPE = (3, 24, 32)


def _tiny_module(chunk_size: int, action_dim: int, state_dim: int, cameras: int) -> Any:
    import torch  # noqa: PLC0415

    class TinyPolicy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
            self.pool = torch.nn.AdaptiveAvgPool2d(1)
            self.head = torch.nn.Linear(4 * cameras + state_dim, chunk_size * action_dim)

        def forward(self, state: torch.Tensor, *images: torch.Tensor) -> torch.Tensor:
            features = [self.pool(torch.relu(self.conv(image))).flatten(1) for image in images]
            out = torch.tanh(self.head(torch.cat([*features, state], dim=1))) * 0.5
            return out.view(-1, chunk_size, action_dim)

    torch.manual_seed(0)
    return TinyPolicy().eval()


def write_tiny_bundle(
    target: Path,
    model_format: str = "torchscript",
    *,
    chunk_size: int = 10,
    n_action_steps: int = 10,
    manifest_chunk_size: int | None = None,
    state_dim: int = 2,
    image_shape: tuple[int, int, int] = TINY_IMAGE_SHAPE,
    cameras: tuple[str, ...] = ("front",),
    state_names: tuple[str, ...] | None = None,
    temporal_ensemble_coeff: float | None = None,
) -> Path:
    """Write a bundle directory at `target` (atomically: built beside it, then renamed).

    `manifest_chunk_size` different from `chunk_size` makes a bundle whose manifest does not match its model.
    `cameras` names its images (`observation.images.<name>`); `state_names` (default steering, throttle,
    extra...) sets the state's names and, when given, its size.
    """
    import torch  # noqa: PLC0415

    if state_names is not None:
        state_dim = len(state_names)
    names = state_names or ("steering", "throttle", *(f"extra{i}" for i in range(max(0, state_dim - 2))))
    image_keys = tuple(f"observation.images.{camera}" for camera in cameras)
    module = _tiny_module(chunk_size, 2, state_dim, len(cameras))
    example = (torch.zeros(1, state_dim), *(torch.zeros(1, *image_shape) for _ in cameras))
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        if model_format == "torchscript":
            model_file = "model.pt"
            traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
            torch.jit.save(traced, str(work / model_file))
        elif model_format == "onnx":
            model_file = "model.onnx"
            with warnings.catch_warnings():  # the legacy exporter is chosen on purpose (dynamo=False)
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    module,
                    example,
                    str(work / model_file),
                    input_names=["observation.state", *image_keys],
                    output_names=["action"],
                    dynamo=False,
                )
        else:
            raise ValueError(f"unknown model format {model_format!r}")
        chunk = manifest_chunk_size or chunk_size
        manifest = Manifest(
            schema_version=SCHEMA_VERSION,
            model_file=model_file,
            model_format=model_format,
            mode="fp32",
            backend="torch" if model_format == "torchscript" else "onnxruntime",
            engine=None,
            source=SourcePolicy(
                path="tiny-test-policy",
                weights_sha256="0" * 64,
                policy_type="act",
                lerobot_version="none",
                torch_version=torch.__version__,
            ),
            inputs=InputSpec(
                state_key="observation.state",
                state_dim=state_dim,
                state_names=tuple(names[:state_dim]),
                images=tuple(ImageInput(key=key, shape=image_shape) for key in image_keys),
            ),
            outputs=OutputSpec(
                action_key="action",
                action_names=("steering", "throttle"),
                action_dim=2,
                chunk_size=chunk,
                n_action_steps=min(n_action_steps, chunk),
                temporal_ensemble_coeff=temporal_ensemble_coeff,
            ),
            normalization="baked",
            calibration=Calibration(),
            files=file_entries(work),
            created_at=datetime.now(UTC).isoformat(),
        )
        write_manifest(work, manifest)
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def ensure_tiny_bundle(cache_root: Path, model_format: str = "torchscript") -> Path:
    """A cached tiny bundle under `cache_root` (rebuilt when missing or no longer verifying)."""
    import torch  # noqa: PLC0415

    from rover_runtime.bundle import BundleError, open_bundle  # noqa: PLC0415

    target = cache_root / f"runtime-tiny-{model_format}-torch{torch.__version__}-v2"
    try:
        open_bundle(target)
    except BundleError:
        write_tiny_bundle(target, model_format)
    return target
