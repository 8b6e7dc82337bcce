"""quantize's proof (quantization/verify.py): the car's runtime loads and runs the staged bundle on held-out
frames, and a model that does not load, returns the wrong shape, is off, or kept float weights is refused in
one line that names the backend and what to try."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from lerobot_checkpoints import ActVariant, save_act_061, write_dataset
from quantize_helpers import tiny_bundle

from quantization.act_inference import build_inference_model, model_spec
from quantization.backends import INT8_TOLERANCE, Tolerance
from quantization.cli import main
from quantization.errors import QuantizationError, one_line
from quantization.policy_loading import load_policy
from quantization.verify import VerificationFrames, float_weight_bytes, verification_frames, verify_bundle
from rover_runtime.bundle import file_entries, open_bundle, write_manifest


@pytest.fixture(scope="module")
def tiny_frames(tiny_policy: Path, demo_dataset: Path) -> tuple[VerificationFrames, int]:
    loaded = load_policy(tiny_policy)
    model = build_inference_model(loaded.policy, loaded.preprocessor, loaded.postprocessor)
    return verification_frames(model, model_spec(loaded.config), demo_dataset, 6), float_weight_bytes(model)


def _with_model_of(bundle_dir: Path, model_source: Path, target: Path) -> Path:
    """A copy of `bundle_dir` whose model file is `model_source`'s, with a manifest that lists it (so only the
    proof, not the sha256 check, can tell)."""
    shutil.copytree(bundle_dir, target)
    bundle = open_bundle(target)
    shutil.copyfile(model_source, bundle.model_path)
    write_manifest(target, replace(bundle.manifest, files=file_entries(target)))
    return target


@pytest.mark.slow
def test_a_bundle_within_tolerance_is_proven_and_recorded(
    tiny_policy: Path, demo_dataset: Path, tiny_frames: tuple[VerificationFrames, int]
) -> None:
    frames, weights = tiny_frames
    bundle = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "static-onnx"))
    proof = verify_bundle(bundle, frames, INT8_TOLERANCE, weights)
    assert proof.frames == 6
    assert proof.runtime == "rover_runtime.backends (onnxruntime)"
    assert proof.runtime_version != "absent"
    assert 0 < proof.mae_pct_range <= proof.max_pct_range
    assert proof.weights_ratio is not None
    assert 0.2 < proof.weights_ratio < 0.3


@pytest.mark.slow
def test_a_model_further_off_than_its_tolerance_is_refused(
    tiny_policy: Path, demo_dataset: Path, tiny_frames: tuple[VerificationFrames, int]
) -> None:
    frames, weights = tiny_frames
    bundle = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "static-executorch"))
    strict = Tolerance(mae_pct=0.001, max_pct=0.01)  # an INT8 model is never this close
    with pytest.raises(QuantizationError) as refused:
        verify_bundle(bundle, frames, strict, weights)
    message = str(refused.value)
    assert message.startswith("the static executorch model is off: on 6 held-out frames its actions differ")
    assert (
        "(allowed 0.001 % and 0.01 %); try --backend torch --mode static or --backend onnxruntime" in message
    )


@pytest.mark.slow
def test_float_weights_in_a_static_bundle_are_refused_with_the_ratio(
    tiny_policy: Path, demo_dataset: Path, tiny_frames: tuple[VerificationFrames, int], tmp_path: Path
) -> None:
    frames, weights = tiny_frames
    fp32 = open_bundle(tiny_bundle(tiny_policy, demo_dataset, "fp32-onnx"))
    static = tiny_bundle(tiny_policy, demo_dataset, "static-onnx")
    impostor = open_bundle(_with_model_of(static, fp32.model_path, tmp_path / "bundle"))
    with pytest.raises(
        QuantizationError, match=r"is 1\.0\dx the float weights' size .*: weights not quantized"
    ):
        verify_bundle(impostor, frames, INT8_TOLERANCE, weights)


@pytest.mark.slow
def test_a_model_the_runtime_cannot_load_is_refused(
    tiny_policy: Path, demo_dataset: Path, tiny_frames: tuple[VerificationFrames, int], tmp_path: Path
) -> None:
    frames, weights = tiny_frames
    fp32 = tiny_bundle(tiny_policy, demo_dataset, "fp32-executorch")
    cut = tmp_path / "cut.pte"
    cut.write_bytes(open_bundle(fp32).model_path.read_bytes()[:2048])
    broken = open_bundle(_with_model_of(fp32, cut, tmp_path / "bundle"))
    with pytest.raises(
        QuantizationError, match=r"^the car's executorch runtime cannot load the fp32 executorch "
    ):
        verify_bundle(broken, frames, INT8_TOLERANCE, weights)


@pytest.mark.slow
def test_another_policys_model_is_refused_by_its_shape(
    tiny_frames: tuple[VerificationFrames, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bundle of another ACT (chunk 8 where the policy's is 10) returns the wrong shape."""
    frames, weights = tiny_frames
    variant = ActVariant("other")
    policy = save_act_061(tmp_path / "policy", variant, (96, 128))
    dataset = write_dataset(tmp_path / "dataset", variant.cameras, (96, 128))
    out = tmp_path / "bundle"
    assert main(["quantize", "--policy", str(policy), "--mode", "fp32", "--backend", "onnxruntime",
                 "--calibration-dataset", str(dataset), "--output", str(out)]) == 0  # fmt: skip
    with pytest.raises(
        QuantizationError, match=r"returns actions of shape \[1, 8, 2\], expected \[1, 10, 2\]"
    ):
        verify_bundle(open_bundle(out), frames, INT8_TOLERANCE, weights)


def test_a_librarys_error_becomes_one_readable_line() -> None:
    assert (
        one_line(RuntimeError("XNNCompiler failed\n  node 12: conv2d\n  ..."))
        == "RuntimeError: XNNCompiler failed"
    )
    assert one_line(ValueError("")) == "ValueError"
    long = one_line(KeyError("x" * 1000))
    assert len(long) == 400
    assert long.endswith("...")
