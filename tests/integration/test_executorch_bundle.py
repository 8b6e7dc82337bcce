"""ExecuTorch bundles of the tiny trained policy: XNNPACK delegation recorded and enforced, the car's runtime
(rover_executorch, no torch) runs them, and a damaged program or a missing delegate is one clear error."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from quantize_helpers import CALIBRATION_SAMPLES, tiny_bundle

from quantization.backends.executorch import MIN_DELEGATED_FRACTION, check_delegation
from quantization.errors import QuantizationError
from rover_runtime.bundle import Delegation, file_entries, open_bundle, write_manifest
from rover_runtime.policy import PolicyError, load_policy


def _copy_with_model(bundle_dir: Path, tmp_path: Path, data: bytes) -> Path:
    """A copy of the bundle whose `.pte` is replaced by `data`, with a manifest that matches it (so only the
    runtime, not the sha256 check, can notice)."""
    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    bundle = open_bundle(copy)
    bundle.model_path.write_bytes(data)
    write_manifest(copy, replace(bundle.manifest, files=file_entries(copy)))
    return copy


@pytest.mark.slow
def test_static_executorch_records_its_xnnpack_partition(tiny_policy: Path, demo_dataset: Path) -> None:
    bundle = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "static-executorch"))
    m = bundle.manifest
    assert (m.backend, m.model_format, m.model_file, m.mode) == ("executorch", "pte", "model.pte", "static")
    assert (m.calibration.requested, m.calibration.succeeded) == (CALIBRATION_SAMPLES, CALIBRATION_SAMPLES)
    assert m.delegation is not None
    assert m.delegation.delegate == "XnnpackBackend"
    assert m.delegation.fraction >= MIN_DELEGATED_FRACTION
    assert m.delegation.nodes_delegated > 50  # the convolutions, linears, matmuls and their quantize nodes
    # Nothing but the layer norms (XNNPACK has none) outside the delegate; what is outside is counted.
    assert [e.split(":")[0] for e in m.delegation.not_delegated] == ["aten_native_layer_norm_default"]
    assert m.delegation.nodes_not_delegated == int(m.delegation.not_delegated[0].split(":")[1])
    assert m.tool_versions["executorch"] == "1.5.1"
    fp32 = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "fp32-executorch")).manifest
    assert fp32.delegation is not None
    assert m.model_bytes < fp32.model_bytes / 3  # INT8 weights


@pytest.mark.slow
def test_the_car_runtime_drives_an_executorch_bundle(tiny_policy: Path, demo_dataset: Path) -> None:
    policy = load_policy(tiny_bundle(tiny_policy, demo_dataset, "static-executorch"), threads=1)
    assert (policy.info.backend, policy.info.mode, policy.info.engine) == ("executorch", "static", None)
    frame = np.full((96, 128, 3), 120, np.uint8)
    chunk = policy.predict([frame], [0.1, 0.3])
    assert chunk.shape == (10, 2)
    assert np.isfinite(chunk).all()
    # Deterministic: the same inputs give the same actions.
    np.testing.assert_array_equal(chunk, policy.predict([frame], [0.1, 0.3]))


@pytest.mark.slow
def test_a_truncated_program_is_one_clear_error(
    tiny_policy: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    source = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "static-executorch"))
    data = source.model_path.read_bytes()
    copy = _copy_with_model(source.root, tmp_path, data[: len(data) // 2])
    with pytest.raises(PolicyError, match=r"ExecuTorch program model.pte does not load: .*"):
        load_policy(copy)


@pytest.mark.slow
def test_a_program_for_a_missing_delegate_is_refused(
    tiny_policy: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    source = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "static-executorch"))
    data = source.model_path.read_bytes()
    assert b"XnnpackBackend" in data
    # Same length: a well-formed program that asks for a delegate this runtime does not have.
    copy = _copy_with_model(source.root, tmp_path, data.replace(b"XnnpackBackend", b"VulkanBackendX"))
    with pytest.raises(PolicyError, match=r"forward method does not load \(a delegate or an operator"):
        load_policy(copy)


def test_a_mostly_undelegated_export_is_refused() -> None:
    outside = ("aten_native_layer_norm_default: 40", "aten_bmm_default: 12")
    stock = Delegation("XnnpackBackend", nodes_delegated=591, nodes_not_delegated=363, not_delegated=outside)
    with pytest.raises(QuantizationError, match=r"591 of 954 compute nodes delegated \(62%\), 12 conv"):
        check_delegation(stock)
    one_linear = Delegation("XnnpackBackend", 500, 1, ("aten_linear_default: 1",))
    with pytest.raises(QuantizationError, match=r"\(100%\), 1 convolution/linear/matmul nodes outside"):
        check_delegation(one_linear)
    check_delegation(Delegation("XnnpackBackend", 500, 10, ("aten_native_layer_norm_default: 10",)))


class _StockACT(torch.nn.Module):
    """lerobot's own ACT modules (not our re-expression), called as the car would call a bundle."""

    def __init__(self, policy: Any, image_key: str) -> None:
        super().__init__()
        self.model = policy.model
        self.image_key = image_key

    def forward(self, state: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        batch = {"observation.state": state, "observation.images": [image]}
        return self.model(batch)[0]


@pytest.mark.slow
def test_exporting_lerobots_stock_modules_is_refused_and_writes_nothing(
    tiny_policy: Path, tmp_path: Path
) -> None:
    """lerobot's stock ACT leaves much of its graph outside XNNPACK (nn.MultiheadAttention, per-token
    stacking): the export says how much and writes no program."""
    from quantization.backends.executorch import lower_to_pte  # noqa: PLC0415
    from quantization.policy_loading import load_policy as load_lerobot_policy  # noqa: PLC0415

    loaded = load_lerobot_policy(tiny_policy)
    image_key = next(iter(loaded.config.image_features))
    model = _StockACT(loaded.policy, image_key).eval()
    example = (torch.zeros(1, 2), torch.rand(1, 3, 96, 128))
    target = tmp_path / "model.pte"
    with pytest.raises(QuantizationError, match=r"leaves too much outside XNNPACK: \d+ of \d+ compute nodes"):
        lower_to_pte(model, example, target)
    assert not target.exists()
