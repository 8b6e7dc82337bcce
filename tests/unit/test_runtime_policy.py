"""Bundles through rover_runtime.policy: verified before loading, TorchScript and ONNX, mismatches refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from rover_runtime.bundle import BundleError, ImageInput
from rover_runtime.policy import (
    PolicyError,
    StubPolicy,
    action_columns,
    load_policy,
    resolve_engine,
    resolve_threads,
)
from rover_runtime.preprocess import preprocess_image, preprocess_state
from rover_runtime.testing import TINY_IMAGE_SHAPE, ensure_tiny_bundle, write_tiny_bundle

pytest.importorskip("torch")
CACHE = Path(os.environ.get("ROVER_CACHE", "/root/.cache/rover")) / "test-fixtures"


@pytest.fixture(scope="module")
def ts_bundle() -> Path:
    return ensure_tiny_bundle(CACHE, "torchscript")


@pytest.fixture(scope="module")
def onnx_bundle() -> Path:
    pytest.importorskip("onnxruntime")
    return ensure_tiny_bundle(CACHE, "onnx")


def _frame() -> NDArray[np.uint8]:
    return np.random.default_rng(3).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)


def test_torchscript_and_onnx_bundles_load_and_agree(ts_bundle: Path, onnx_bundle: Path) -> None:
    ts = load_policy(ts_bundle, threads=1)
    ox = load_policy(onnx_bundle, threads=1)
    assert (ts.info.backend, ox.info.backend) == ("torch", "onnxruntime")
    assert ts.info.chunk_size == ox.info.chunk_size == 10
    assert ts.info.threads == 1
    a = ts.predict([_frame()], (0.1, 0.2))
    b = ox.predict([_frame()], (0.1, 0.2))
    assert a.shape == (10, 2)
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a, ts.predict([_frame()], (-0.5, 0.4)))  # the state reaches the model


def test_corrupt_model_file_is_refused_before_loading(ts_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(ts_bundle, bundle)
    data = bytearray((bundle / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.pt").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.pt does not match its sha256"):
        load_policy(bundle)


def test_manifest_schema_error_names_the_key(ts_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b"
    shutil.copytree(ts_bundle, bundle)
    raw = json.loads((bundle / "manifest.json").read_text())
    del raw["outputs"]["chunk_size"]
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match="missing key 'chunk_size'"):
        load_policy(bundle)


def test_output_shape_not_matching_the_manifest_is_refused(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "b", chunk_size=8, manifest_chunk_size=10)
    with pytest.raises(PolicyError, match=r"outputs shape \[1, 8, 2\], the manifest says \[1, 10, 2\]"):
        load_policy(bundle)


@pytest.mark.parametrize("model_format", ["torchscript", "onnx"])
def test_two_cameras_and_a_wheel_speed_state_drive_both_backends(tmp_path: Path, model_format: str) -> None:
    """A bundle from a car with a front and a rear camera whose state adds wheel speed loads; every camera
    and every state entry reaches the model."""
    pytest.importorskip("onnxruntime")
    bundle = write_tiny_bundle(
        tmp_path / "b",
        model_format,
        cameras=("front", "rear"),
        state_names=("steer", "throttle", "speed_mps"),
    )
    policy = load_policy(bundle, threads=1)
    assert policy.info.image_keys == ("observation.images.front", "observation.images.rear")
    assert policy.info.state_names == ("steer", "throttle", "speed_mps")
    front, rear = _frame(), np.zeros((48, 64, 3), dtype=np.uint8)
    out = policy.predict([front, rear], (0.1, 0.2, 1.5))
    assert out.shape == (10, 2)
    assert not np.allclose(out, policy.predict([front, front], (0.1, 0.2, 1.5)))  # the rear camera counts
    assert not np.allclose(out, policy.predict([front, rear], (0.1, 0.2, 0.0)))  # so does the speed
    with pytest.raises(ValueError, match="got 1 images, the bundle takes 2"):
        policy.predict([front], (0.1, 0.2, 1.5))


def test_an_onnx_model_with_fewer_inputs_than_the_manifest_lists_is_refused(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    one = write_tiny_bundle(tmp_path / "one", "onnx")
    two = write_tiny_bundle(tmp_path / "two", "onnx", cameras=("front", "rear"))
    shutil.copy(one / "model.onnx", two / "model.onnx")
    raw = json.loads((two / "manifest.json").read_text())
    raw["files"] = json.loads((one / "manifest.json").read_text())["files"]
    (two / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(PolicyError, match=r"has 2 inputs, expected 3 \(the state and 2 camera"):
        load_policy(two)


def test_default_threads_leave_a_core_to_the_loop() -> None:
    assert resolve_threads(0, cpu_count=4) == 3
    assert resolve_threads(0, cpu_count=1) == 1
    assert resolve_threads(2, cpu_count=4) == 2


def test_action_columns_follow_the_names() -> None:
    assert action_columns(("throttle", "steer")) == [1, 0]
    assert action_columns(("steering", "throttle", "brake")) == [0, 1]
    assert action_columns(("a", "b")) == [0, 1]


def test_unavailable_engine_names_the_config_key(ts_bundle: Path) -> None:
    with pytest.raises(PolicyError, match=r"config policy\.engine: 'not-an-engine' is not available"):
        load_policy(ts_bundle, engine="not-an-engine")


def test_engine_resolution() -> None:
    assert resolve_engine("auto", None, machine="aarch64") == "qnnpack"
    assert resolve_engine("auto", "qnnpack", machine="x86_64") == "qnnpack"
    assert resolve_engine("auto", None, machine="x86_64") is None
    assert resolve_engine("x86", "qnnpack", machine="aarch64") == "x86"


def test_preprocess_matches_the_bundle_convention() -> None:
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    image[..., 0] = 255  # blue in OpenCV's BGR
    out = preprocess_image(image, ImageInput(key="cam", shape=TINY_IMAGE_SHAPE))
    assert out.shape == (1, *TINY_IMAGE_SHAPE)
    assert out.dtype == np.float32
    assert out[0, 2].min() == 1.0  # RGB: blue is channel 2
    assert out[0, 0].max() == 0.0
    np.testing.assert_array_equal(preprocess_state((0.25, -0.5)), np.array([[0.25, -0.5]], dtype=np.float32))


def test_preprocess_applies_the_manifests_image_value_range() -> None:
    image = np.full((24, 32, 3), 255, dtype=np.uint8)
    image[0, 0] = 0
    out = preprocess_image(image, ImageInput(key="cam", shape=TINY_IMAGE_SHAPE), (-1.0, 1.0))
    assert out.max() == pytest.approx(1.0)
    assert out[0, :, 0, 0].tolist() == pytest.approx([-1.0, -1.0, -1.0])


def test_stub_policy_stalls_and_fails_on_demand() -> None:
    stub = StubPolicy(chunk_size=5, latency_s=0.0)
    assert stub.predict([_frame()], (0, 0)).shape == (5, 2)
    stub.fail(1)
    with pytest.raises(RuntimeError, match="injected"):
        stub.predict([_frame()], (0, 0))
    assert stub.predict([_frame()], (0, 0))[0, 1] == pytest.approx(0.2)
