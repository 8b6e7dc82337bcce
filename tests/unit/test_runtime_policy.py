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
from rover_runtime.policy import PolicyError, StubPolicy, load_policy, resolve_engine
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
    a = ts.predict(_frame(), 0.1, 0.2)
    b = ox.predict(_frame(), 0.1, 0.2)
    assert a.shape == (10, 2)
    assert a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(a, ts.predict(_frame(), -0.5, 0.4))  # the state reaches the model


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


def test_state_other_than_steering_throttle_is_refused(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "b", state_dim=3)
    with pytest.raises(PolicyError, match=r"inputs.state_dim is 3"):
        load_policy(bundle)


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
    np.testing.assert_array_equal(preprocess_state(0.25, -0.5), np.array([[0.25, -0.5]], dtype=np.float32))


def test_stub_policy_stalls_and_fails_on_demand() -> None:
    stub = StubPolicy(chunk_size=5, latency_s=0.0)
    assert stub.predict(_frame(), 0, 0).shape == (5, 2)
    stub.fail(1)
    with pytest.raises(RuntimeError, match="injected"):
        stub.predict(_frame(), 0, 0)
    assert stub.predict(_frame(), 0, 0)[0, 1] == pytest.approx(0.2)
