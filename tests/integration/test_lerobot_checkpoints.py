"""Checkpoints from lerobot 0.4.x and 0.6.x quantize; other lerobot releases are refused naming theirs.

- lerobot 0.4.4: the JSON files a real 0.4.4 save wrote (tests/fixtures/lerobot-0.4.4-act), tensors generated.
- lerobot 0.6.1 (installed): ACTs that differ where the re-expression could go wrong (pre_norm, MEAN_STD and
  MIN_MAX normalization, one and two cameras, ResNet18 and ResNet34); each FP32 bundle (TorchScript and
  ONNX) computes what lerobot's `predict_action_chunk` computes within 1e-4 in action units.
- Bad input: a checkpoint from lerobot 0.3 or from a lerobot newer than 0.6.1, missing normalization
  statistics: one `error:` line, exit 2, no bundle.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lerobot_checkpoints import (
    ActVariant,
    camera_key,
    checkpoint_from_044_fixture,
    lerobot_chunk,
    save_act_061,
    write_dataset,
)
from quantize_helpers import heldout_batch, run_bundle

from quantization.cli import main
from quantization.quantize import QuantizeRequest, quantize_policy
from rover_runtime.bundle import open_bundle

pytestmark = pytest.mark.slow
TOLERANCE = 1e-4
IMAGE_HW = (64, 80)
VARIANTS = [
    ActVariant("resnet18-postnorm-meanstd-1cam"),
    ActVariant("resnet18-prenorm-minmax-2cam", pre_norm=True, normalization="MIN_MAX",
               cameras=("front", "rear")),
    ActVariant("resnet34-prenorm-meanstd-1cam", backbone="resnet34", pre_norm=True),
    ActVariant("resnet34-postnorm-minmax-2cam", backbone="resnet34", normalization="MIN_MAX",
               cameras=("front", "rear")),
]  # fmt: skip


def _quantize_cli(capsys, policy: Path, dataset: Path, output: Path) -> str:
    """Run `quantize --mode fp32` in-process; assert one `error:` line and exit 2; return the line."""
    status = main(["quantize", "--policy", str(policy), "--mode", "fp32", "--calibration-dataset",
                   str(dataset), "--output", str(output)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert status == 2
    assert len(errors) == 1, err
    assert not output.exists()
    return errors[0]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, ...], Path]:
    root = tmp_path_factory.mktemp("datasets")
    cameras = {v.cameras for v in VARIANTS}
    return {c: write_dataset(root / "-".join(c), c, IMAGE_HW) for c in cameras}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_lerobot_061_checkpoint_fp32_bundles_match(
    variant: ActVariant, datasets: dict[tuple[str, ...], Path], tmp_path: Path
) -> None:
    dataset = datasets[variant.cameras]
    policy = save_act_061(tmp_path / "policy", variant, IMAGE_HW)
    batch = heldout_batch(dataset, 3)
    reference = lerobot_chunk(policy, batch)
    assert np.abs(reference[0] - reference[-1]).max() > 1e-4  # the frames give different actions
    for backend in ("torch", "onnxruntime"):
        output = tmp_path / f"fp32-{backend}"
        quantize_policy(QuantizeRequest(policy=policy, mode="fp32", backend=backend, dataset=dataset,
                                        output=output))  # fmt: skip
        manifest = open_bundle(output).manifest
        assert manifest.tool_versions["checkpoint_saved_by_lerobot"] == "0.6.x"
        assert [i.key for i in manifest.inputs.images] == [camera_key(c) for c in variant.cameras]
        out = run_bundle(output, batch, [camera_key(c) for c in variant.cameras])
        assert out.shape == reference.shape
        assert np.abs(out - reference).max() <= TOLERANCE, backend


def test_lerobot_044_checkpoint_quantizes_and_matches(demo_dataset: Path, tmp_path: Path) -> None:
    policy = checkpoint_from_044_fixture(tmp_path / "policy-044")
    assert "pretrained_revision" not in json.loads((policy / "config.json").read_text())
    batch = heldout_batch(demo_dataset, 3)
    reference = lerobot_chunk(policy, batch)
    for backend in ("torch", "onnxruntime"):
        output = tmp_path / f"fp32-{backend}"
        status = main(["quantize", "--policy", str(policy), "--mode", "fp32", "--backend", backend,
                       "--calibration-dataset", str(demo_dataset), "--output", str(output)])  # fmt: skip
        assert status == 0
        manifest = open_bundle(output).manifest
        assert manifest.tool_versions["checkpoint_saved_by_lerobot"] == "0.4.x"
        out = run_bundle(output, batch, ["observation.images.front"])
        assert np.abs(out - reference).max() <= TOLERANCE, backend
    # And INT8: a static ONNX bundle of the 0.4.4 checkpoint is written and verified.
    static = tmp_path / "static-onnx"
    assert main(["quantize", "--policy", str(policy), "--mode", "static", "--backend", "onnxruntime",
                 "--calibration-dataset", str(demo_dataset), "--calibration-samples", "8",
                 "--output", str(static)]) == 0  # fmt: skip
    assert open_bundle(static).manifest.mode == "static"


@pytest.fixture
def policy_044(tmp_path: Path) -> Path:
    return checkpoint_from_044_fixture(tmp_path / "policy")


def test_checkpoint_from_a_newer_lerobot_is_refused(
    capsys, policy_044: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    config = json.loads((policy_044 / "config.json").read_text())
    config["use_flash_attention"] = True  # a field lerobot 0.6.1 does not know
    (policy_044 / "config.json").write_text(json.dumps(config))
    line = _quantize_cli(capsys, policy_044, demo_dataset, tmp_path / "out")
    assert "was saved by lerobot newer than 0.6.1 (config.json fields unknown to lerobot 0.6.1: " in line
    assert "use_flash_attention" in line
    assert "supported: checkpoints of lerobot 0.4.x and 0.6.x" in line


def test_checkpoint_from_lerobot_03_is_refused(
    capsys, policy_044: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    """lerobot 0.3 kept the statistics as buffers in model.safetensors and wrote no processor files."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    weights = load_file(str(policy_044 / "model.safetensors"))
    weights["normalize_inputs.buffer_observation_state.mean"] = torch.zeros(2)
    save_file(weights, str(policy_044 / "model.safetensors"))
    for path in policy_044.glob("policy_*processor*"):
        path.unlink()
    line = _quantize_cli(capsys, policy_044, demo_dataset, tmp_path / "out")
    assert "was saved by lerobot 0.3.x or older, which cannot be read here" in line
    assert "migrate_policy_normalization" in line


def test_missing_normalization_state_file_is_refused(
    capsys, policy_044: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    (policy_044 / "policy_preprocessor_step_3_normalizer_processor.safetensors").unlink()
    line = _quantize_cli(capsys, policy_044, demo_dataset, tmp_path / "out")
    assert "policy_preprocessor_step_3_normalizer_processor.safetensors (the normalization statistics" in line


def test_missing_statistics_are_refused_not_taken_as_identity(
    capsys, policy_044: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    path = policy_044 / "policy_preprocessor_step_3_normalizer_processor.safetensors"
    stats = {k: v for k, v in load_file(str(path)).items() if not k.startswith("observation.state.")}
    save_file(stats, str(path))
    line = _quantize_cli(capsys, policy_044, demo_dataset, tmp_path / "out")
    assert "normalization statistics for 'observation.state' (MEAN_STD) are missing" in line
    assert "refusing to bake in an identity normalization" in line


def test_dataset_of_an_unreadable_codebase_version_is_refused(
    capsys, policy_044: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    dataset = tmp_path / "dataset-v21"
    shutil.copytree(demo_dataset, dataset)
    info = json.loads((dataset / "meta" / "info.json").read_text())
    info["codebase_version"] = "v2.1"
    (dataset / "meta" / "info.json").write_text(json.dumps(info))
    line = _quantize_cli(capsys, policy_044, dataset, tmp_path / "out")
    assert "dataset codebase version 'v2.1' cannot be read by lerobot 0.6.1, which reads v3.0" in line
