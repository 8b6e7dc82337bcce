"""rover_runtime.bundle.open_bundle refuses a bundle that does not match its manifest, naming the problem.

The last tests run `rover-runtime check`, `rover-runtime benchmark` and the car-side verifier
(roles/rover_release/files/verify_bundle.py) as processes on bad bundles: an error line, never a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from rover_runtime.bundle import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SCHEMA_VERSION,
    SIGNATURE_NAME,
    BundleError,
    Calibration,
    Delegation,
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
REPO = Path(__file__).resolve().parents[2]
VERIFIER = REPO / "roles" / "rover_release" / "files" / "verify_bundle.py"


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


def _edit_manifest_text(root: Path, old: str, new: str) -> None:
    """Edit the manifest as text (for JSON that json.dumps cannot produce); `old` must occur."""
    path = root / MANIFEST_NAME
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _relist(root: Path) -> None:
    """Rewrite the manifest so that it lists exactly the regular files now in `root`."""
    write_manifest(root, _manifest(root))


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


def test_signature_beside_the_manifest_is_allowed_unlisted(bundle_dir: Path) -> None:
    """manifest.json.sig (the deploy's SSH signature of the manifest) is the one unlisted file allowed; it
    changes neither the file list nor the content hash (the release id)."""
    before = open_bundle(bundle_dir).manifest.content_hash
    (bundle_dir / SIGNATURE_NAME).write_text(
        "-----BEGIN SSH SIGNATURE-----\n...\n-----END SSH SIGNATURE-----\n"
    )
    bundle = open_bundle(bundle_dir)
    assert bundle.manifest.content_hash == before
    assert [entry.path for entry in bundle.manifest.files] == [MODEL]
    assert [entry.path for entry in file_entries(bundle_dir)] == [MODEL]  # a writer never lists it
    result = subprocess.run(
        [sys.executable, str(VERIFIER), str(bundle_dir)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["content_hash"] == before


def test_signature_elsewhere_or_not_a_file_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    (bundle_dir / "sub").mkdir()
    (bundle_dir / "sub" / SIGNATURE_NAME).write_text("x")  # only beside the manifest
    with pytest.raises(BundleError, match=r"sub/manifest\.json\.sig is not listed in the manifest"):
        open_bundle(bundle_dir)
    (bundle_dir / "sub" / SIGNATURE_NAME).unlink()
    (bundle_dir / "sub").rmdir()
    (tmp_path / "sig").write_text("x")
    (bundle_dir / SIGNATURE_NAME).symlink_to(tmp_path / "sig")
    with pytest.raises(BundleError, match=r"manifest\.json\.sig is a symlink"):
        open_bundle(bundle_dir)


def test_manifest_may_not_list_its_signature(bundle_dir: Path) -> None:
    _edit_manifest(
        bundle_dir, lambda m: m["files"].append({"path": SIGNATURE_NAME, "sha256": "0" * 64, "size": 1})
    )
    with pytest.raises(BundleError, match=r"unsafe file path 'manifest\.json\.sig'"):
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
        (lambda m: m["files"][0].update(path="/tmp/model.onnx"), "unsafe file path"),
        (lambda m: m["files"][0].update(path="./model.onnx"), "unsafe file path"),
        (lambda m: m["files"][0].update(path="sub//model.onnx"), "unsafe file path"),
        (lambda m: m["files"][0].update(path="model.onnx\x00"), "unsafe file path"),
        (lambda m: m.update(model_file="/tmp/model.onnx"), "key 'model_file' has an unsafe file path"),
        (lambda m: m["files"].append(dict(m["files"][0])), r"files\[1\]: model\.onnx is listed twice"),
        (lambda m: m.update(normalization="none"), "key 'normalization' must be one of"),
        (lambda m: m["inputs"]["images"][0].update(shape=[96, 128, 3]), "3 channels first"),
        (
            lambda m: m.update(backend="executorch"),
            "backend 'executorch' runs model_format 'pte', not 'onnx'",
        ),
        (
            lambda m: m.update(
                delegation={
                    "delegate": "XnnpackBackend",
                    "nodes_delegated": -1,
                    "nodes_not_delegated": 0,
                    "not_delegated": [],
                }
            ),
            "delegation: node counts must not be negative",
        ),
        (lambda m: m.update(delegation={"delegate": "XnnpackBackend"}), "missing key 'nodes_delegated'"),
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


def test_manifest_that_is_not_utf8_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_NAME).write_bytes(b'{"mode": "\xff"}')
    with pytest.raises(BundleError, match=r"manifest\.json is not valid JSON: not UTF-8"):
        open_bundle(bundle_dir)


# --- symlinks, paths that leave the bundle, files that are not regular ------------------------------------


def test_listed_file_symlinked_outside_is_refused_even_with_matching_bytes(
    bundle_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes((bundle_dir / MODEL).read_bytes())  # same size and sha256 as the manifest says
    (bundle_dir / MODEL).unlink()
    (bundle_dir / MODEL).symlink_to(outside)
    with pytest.raises(BundleError, match=r"model\.onnx resolves to .*outside\.onnx, outside the bundle"):
        open_bundle(bundle_dir)


def test_listed_file_symlinked_inside_the_bundle_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / MODEL).rename(bundle_dir / "real.onnx")
    (bundle_dir / MODEL).symlink_to("real.onnx")
    with pytest.raises(BundleError, match=r"model\.onnx is a symlink \(to real\.onnx\)"):
        open_bundle(bundle_dir)


def test_dangling_symlink_is_refused_as_a_symlink_not_as_missing(bundle_dir: Path) -> None:
    (bundle_dir / MODEL).unlink()
    (bundle_dir / MODEL).symlink_to("nowhere.onnx")
    with pytest.raises(BundleError, match=r"model\.onnx is a symlink \(to nowhere\.onnx\)"):
        open_bundle(bundle_dir)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("outside", r"sub/extra\.bin resolves to .*, outside the bundle"),
        ("inside", r"sub is a symlink \(to real\)"),
    ],
)
def test_symlinked_directory_in_a_listed_path_is_refused(
    bundle_dir: Path, tmp_path: Path, target: str, message: str
) -> None:
    (bundle_dir / "sub").mkdir()
    (bundle_dir / "sub" / "extra.bin").write_bytes(b"extra")
    _relist(bundle_dir)
    real = tmp_path / "elsewhere" if target == "outside" else bundle_dir / "real"
    (bundle_dir / "sub").rename(real)
    (bundle_dir / "sub").symlink_to(real if target == "outside" else "real")
    with pytest.raises(BundleError, match=message):
        open_bundle(bundle_dir)


def test_unlisted_symlink_is_refused_and_not_followed(bundle_dir: Path, tmp_path: Path) -> None:
    (bundle_dir / "link").symlink_to(tmp_path)  # a directory outside, holding the bundle itself
    with pytest.raises(BundleError, match=r"link is a symlink \(to .*, outside the bundle\)"):
        open_bundle(bundle_dir)


def test_symlinked_manifest_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    (bundle_dir / MANIFEST_NAME).rename(tmp_path / "manifest.json")
    (bundle_dir / MANIFEST_NAME).symlink_to(tmp_path / "manifest.json")
    with pytest.raises(BundleError, match=r"manifest\.json is a symlink \(to .*, outside the bundle\)"):
        open_bundle(bundle_dir)


def test_fifo_in_the_bundle_is_refused_without_reading_it(bundle_dir: Path) -> None:
    os.mkfifo(bundle_dir / "pipe")
    with pytest.raises(BundleError, match=r"pipe is not a regular file"):
        open_bundle(bundle_dir)


def test_bundle_directory_itself_may_be_a_symlink(bundle_dir: Path, tmp_path: Path) -> None:
    current = tmp_path / "current"  # how a deploy points at the active release
    current.symlink_to(bundle_dir)
    assert open_bundle(current).model_path == current / MODEL


# --- manifests Python's JSON parser would choke on or accept too loosely ---------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("{", '{"mode": "static", ', "mode"),  # the same value twice is still refused
        ('"inputs": {', '"inputs": {"state_dim": 3, ', "state_dim"),
    ],
    ids=["top-level", "nested"],
)
def test_duplicate_json_key_is_refused(bundle_dir: Path, old: str, new: str, key: str) -> None:
    _edit_manifest_text(bundle_dir, old, new)
    with pytest.raises(BundleError, match=rf"manifest\.json has the key '{key}' twice in one object"):
        open_bundle(bundle_dir)


def test_manifest_over_the_size_limit_is_refused(bundle_dir: Path) -> None:
    path = bundle_dir / MANIFEST_NAME
    path.write_text(path.read_text() + " " * MAX_MANIFEST_BYTES)
    size = path.stat().st_size
    with pytest.raises(BundleError, match=rf"manifest\.json is {size} bytes, more than the 1048576 allowed"):
        open_bundle(bundle_dir)


def test_manifest_at_the_size_limit_opens(bundle_dir: Path) -> None:
    path = bundle_dir / MANIFEST_NAME
    text = path.read_text()
    path.write_text(text + " " * (MAX_MANIFEST_BYTES - len(text.encode())))
    assert path.stat().st_size == MAX_MANIFEST_BYTES
    open_bundle(bundle_dir)


def _skip_unless_int_digits_are_limited() -> None:
    if not 0 < sys.get_int_max_str_digits() < 5000:
        pytest.skip("this interpreter parses 5000-digit integers (PYTHONINTMAXSTRDIGITS)")


def test_integer_too_long_to_parse_is_refused(bundle_dir: Path) -> None:
    _skip_unless_int_digits_are_limited()
    _edit_manifest_text(bundle_dir, '"schema_version": 1', '"schema_version": 1' + "0" * 4999)
    with pytest.raises(BundleError, match=r"manifest\.json has a number too long to parse"):
        open_bundle(bundle_dir)


def test_deeply_nested_manifest_is_refused(bundle_dir: Path) -> None:
    depth = 100_000
    _edit_manifest_text(bundle_dir, "{", '{"deep": ' + "[" * depth + "]" * depth + ", ")
    with pytest.raises(BundleError, match=r"manifest\.json is nested too deeply to parse"):
        open_bundle(bundle_dir)


# --- the commands print one error line, never a traceback -----------------------------------------------


def _symlinked_model(root: Path) -> str:
    outside = root.parent / "outside.onnx"
    outside.write_bytes((root / MODEL).read_bytes())
    (root / MODEL).unlink()
    (root / MODEL).symlink_to(outside)
    return "model.onnx resolves to"


def _duplicate_key(root: Path) -> str:
    _edit_manifest_text(root, "{", '{"mode": "static", ')
    return "has the key 'mode' twice"


def _huge_integer(root: Path) -> str:
    _skip_unless_int_digits_are_limited()
    _edit_manifest_text(root, '"schema_version": 1', '"schema_version": 1' + "0" * 4999)
    return "has a number too long to parse"


# (argv after the python executable, expected exit status, whether stdout is check's JSON report).
# Documented statuses: `check` reports a failed bundle check in its JSON and exits 1 (docs/runtime.md);
# `benchmark` exits 2 for bad input; verify_bundle.py exits 1 with one line on stderr.
COMMANDS: dict[str, tuple[list[str], int, bool]] = {
    "check": (["-m", "rover_runtime.cli", "check", "--skip-serial", "--bundle"], 1, True),
    "benchmark": (["-m", "rover_runtime.cli", "benchmark", "--iterations", "1", "--bundle"], 2, False),
    "verify_bundle": ([str(VERIFIER)], 1, False),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("spoil", [_symlinked_model, _duplicate_key, _huge_integer], ids=lambda f: f.__name__)
def test_commands_refuse_a_bad_bundle_without_a_traceback(
    bundle_dir: Path, command: str, spoil: Callable[[Path], str]
) -> None:
    message = spoil(bundle_dir)
    argv, status, json_report = COMMANDS[command]
    proc = subprocess.run(
        [sys.executable, *argv, str(bundle_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        check=False,
    )
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == status, proc.stdout + proc.stderr
    if json_report:
        report = json.loads(proc.stdout)
        assert report["ok"] is False
        assert report["checks"]["bundle"]["ok"] is False
        assert message in report["checks"]["bundle"]["error"]
    else:
        assert proc.stdout == ""
        assert proc.stderr.count("\n") == 1
        assert message in proc.stderr


def test_delegation_is_optional_and_round_trips(bundle_dir: Path) -> None:
    before = open_bundle(bundle_dir).manifest
    assert before.delegation is None
    assert "delegation" not in json.loads(
        before.to_json()
    )  # absent, so older bundles keep their content hash
    delegation = Delegation("XnnpackBackend", 90, 10, ("aten_native_layer_norm_default: 10",))
    write_manifest(bundle_dir, replace(before, delegation=delegation))
    after = open_bundle(bundle_dir).manifest
    assert after.delegation == delegation
    assert after.delegation.fraction == 0.9
    assert after.content_hash != before.content_hash
