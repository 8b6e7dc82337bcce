"""rover_runtime.bundle.open_bundle refuses a bundle that does not match its manifest, naming the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rover_runtime.bundle import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    BundleError,
    Calibration,
    ImageInput,
    InputSpec,
    Manifest,
    OutputSpec,
    SourcePolicy,
    file_entries,
    open_bundle,
    write_manifest,
)

MODEL = "model.onnx"


def _manifest(root: Path) -> Manifest:
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model_file=MODEL,
        model_format="onnx",
        mode="static",
        backend="onnxruntime",
        engine=None,
        source=SourcePolicy(path="/p", weights_sha256="0" * 64, policy_type="act", lerobot_version="0.4.4",
                            torch_version="2.10.0"),
        inputs=InputSpec(state_key="observation.state", state_dim=2, state_names=("steering", "throttle"),
                         images=(ImageInput(key="observation.images.front", shape=(3, 96, 128)),)),
        outputs=OutputSpec(action_key="action", action_names=("steering", "throttle"), action_dim=2,
                           chunk_size=20, n_action_steps=20),
        normalization="baked",
        calibration=Calibration(requested=8, succeeded=8, dataset="/d", episodes=(0, 1), float_layers=("x",)),
        files=file_entries(root),
        created_at="2025-01-01T00:00:00+00:00",
    )  # fmt: skip


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    root = tmp_path / "bundle"
    root.mkdir()
    (root / MODEL).write_bytes(bytes(range(256)) * 64)
    write_manifest(root, _manifest(root))
    return root


def _edit_manifest(root: Path, edit) -> None:
    path = root / MANIFEST_NAME
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def test_valid_bundle_opens_with_every_field(bundle_dir: Path) -> None:
    bundle = open_bundle(bundle_dir)
    assert bundle.model_path == bundle_dir / MODEL
    assert bundle.manifest.files[0].size == 256 * 64
    assert bundle.manifest.inputs.images[0].shape == (3, 96, 128)
    assert bundle.manifest.calibration.succeeded == 8
    assert len(bundle.manifest.content_hash) == 64


def test_tampered_byte_is_refused_naming_the_file(bundle_dir: Path) -> None:
    model = bundle_dir / MODEL
    data = bytearray(model.read_bytes())
    data[1000] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model\.onnx does not match its sha256"):
        open_bundle(bundle_dir)


def test_truncated_file_is_refused_by_size(bundle_dir: Path) -> None:
    model = bundle_dir / MODEL
    model.write_bytes(model.read_bytes()[:-1])
    with pytest.raises(BundleError, match=r"model\.onnx has 16383 bytes, the manifest says 16384"):
        open_bundle(bundle_dir)


def test_missing_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / MODEL).unlink()
    with pytest.raises(BundleError, match=r"model\.onnx is listed in the manifest but missing"):
        open_bundle(bundle_dir)


def test_extra_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "extra.bin").write_bytes(b"x")
    with pytest.raises(BundleError, match=r"extra\.bin is not listed in the manifest"):
        open_bundle(bundle_dir)


def test_missing_manifest_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        open_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.pop("mode"), "missing key 'mode'"),
        (lambda m: m.update(mode="int4"), "key 'mode' must be one of"),
        (lambda m: m["inputs"].pop("state_dim"), "missing key 'state_dim'"),
        (lambda m: m["outputs"].update(n_action_steps=50), "n_action_steps 50 exceeds chunk_size 20"),
        (lambda m: m.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda m: m["files"][0].update(sha256="XYZ"), "key 'sha256' is not a lowercase hex sha256"),
        (lambda m: m["files"][0].update(path="../model.onnx"), "unsafe file path"),
        (lambda m: m.update(normalization="none"), "key 'normalization' must be one of"),
        (lambda m: m["inputs"]["images"][0].update(shape=[96, 128, 3]), "3 channels first"),
    ],
)
def test_bad_schema_is_refused_naming_the_key(bundle_dir: Path, edit, message: str) -> None:
    _edit_manifest(bundle_dir, edit)
    with pytest.raises(BundleError, match=message):
        open_bundle(bundle_dir)


def test_manifest_that_is_not_json_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(bundle_dir)
