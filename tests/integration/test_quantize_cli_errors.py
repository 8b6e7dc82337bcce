"""Bad input to `python -m quantization quantize`: one line `error: ...`, exit status 2, no partial bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from quantization.cli import main

REPO_ROOT = Path(__file__).resolve().parents[2]


def _quantize(capsys, policy: Path, dataset: Path, output: Path, *extra: str) -> str:
    """Run the CLI in-process; assert exit 2 and a single `error:` line; return that line."""
    argv = ["quantize", "--policy", str(policy), "--mode", "static", "--calibration-dataset", str(dataset),
            "--calibration-samples", "4", "--output", str(output), *extra]  # fmt: skip
    status = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert status == 2
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    return errors[0]


def _assert_no_output(output: Path) -> None:
    assert not output.exists()
    leftovers = [p.name for p in output.parent.iterdir() if p.name.startswith(f".{output.name}.")]
    assert leftovers == []


@pytest.fixture
def policy_copy(tiny_policy: Path, tmp_path: Path) -> Path:
    target = tmp_path / "policy"
    shutil.copytree(tiny_policy, target)
    return target


def test_missing_config(capsys, policy_copy: Path, demo_dataset: Path, tmp_path: Path) -> None:
    (policy_copy / "config.json").unlink()
    line = _quantize(capsys, policy_copy, demo_dataset, tmp_path / "out")
    assert "config.json is missing" in line
    _assert_no_output(tmp_path / "out")


def test_missing_weights(capsys, policy_copy: Path, demo_dataset: Path, tmp_path: Path) -> None:
    (policy_copy / "model.safetensors").unlink()
    line = _quantize(capsys, policy_copy, demo_dataset, tmp_path / "out")
    assert "model.safetensors (the weights) is missing" in line
    _assert_no_output(tmp_path / "out")


def test_not_act(capsys, policy_copy: Path, demo_dataset: Path, tmp_path: Path) -> None:
    config = json.loads((policy_copy / "config.json").read_text())
    config["type"] = "diffusion"
    (policy_copy / "config.json").write_text(json.dumps(config))
    line = _quantize(capsys, policy_copy, demo_dataset, tmp_path / "out")
    assert "policy type is 'diffusion'" in line
    _assert_no_output(tmp_path / "out")


def test_truncated_safetensors(capsys, policy_copy: Path, demo_dataset: Path, tmp_path: Path) -> None:
    weights = policy_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = _quantize(capsys, policy_copy, demo_dataset, tmp_path / "out")
    assert "model.safetensors: truncated or corrupt safetensors file" in line
    _assert_no_output(tmp_path / "out")


def test_corrupt_safetensors_header(capsys, policy_copy: Path, demo_dataset: Path, tmp_path: Path) -> None:
    weights = policy_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"garbage!"
    weights.write_bytes(bytes(data))
    line = _quantize(capsys, policy_copy, demo_dataset, tmp_path / "out")
    assert "model.safetensors: corrupt safetensors header" in line
    _assert_no_output(tmp_path / "out")


def test_existing_output_without_force(capsys, tiny_policy: Path, demo_dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    line = _quantize(capsys, tiny_policy, demo_dataset, output)
    assert f"output {output} already exists (use --force" in line
    assert (output / "keep.txt").read_text() == "mine"  # untouched


@pytest.mark.slow
def test_more_calibration_samples_than_frames(
    capsys, tiny_policy: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    # The demo fixture's training split holds 5 episodes x 60 frames.
    line = _quantize(capsys, tiny_policy, demo_dataset, tmp_path / "out", "--calibration-samples", "301")
    assert "301 calibration samples requested but the training episodes" in line
    assert "hold only 300 frames" in line
    _assert_no_output(tmp_path / "out")


@pytest.fixture(scope="module")
def mismatched_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LeRobotDataset with a different camera key and a 3-dim state (written with lerobot)."""
    import numpy as np  # noqa: PLC0415
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415

    root = tmp_path_factory.mktemp("mismatch") / "dataset"
    features = {
        "observation.images.rear": {
            "dtype": "image", "shape": (96, 128, 3), "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (3,), "names": ["a", "b", "c"]},
        "action": {"dtype": "float32", "shape": (2,), "names": ["steering", "throttle"]},
    }  # fmt: skip
    ds = LeRobotDataset.create(
        repo_id="test/mismatch", fps=30, features=features, root=root, use_videos=False
    )
    for _ in range(2):
        for _ in range(3):
            ds.add_frame({"observation.images.rear": np.zeros((96, 128, 3), np.uint8),
                          "observation.state": np.zeros(3, np.float32), "action": np.zeros(2, np.float32),
                          "task": "drive"})  # fmt: skip
        ds.save_episode()
    ds.finalize()
    return root


@pytest.mark.slow
def test_dataset_features_do_not_match(
    capsys, tiny_policy: Path, mismatched_dataset: Path, tmp_path: Path
) -> None:
    line = _quantize(capsys, tiny_policy, mismatched_dataset, tmp_path / "out")
    assert "has no feature 'observation.images.front' that the policy needs" in line
    assert "dataset cameras: observation.images.rear" in line
    _assert_no_output(tmp_path / "out")


def test_real_entry_point_exits_2_without_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "quantization", "quantize", "--policy", str(tmp_path / "none"),
         "--mode", "fp32",
         "--calibration-dataset", str(tmp_path), "--output", str(tmp_path / "out")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: policy directory {tmp_path / 'none'} does not exist"]


def test_bad_arguments_exit_2_in_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--mode", "int4"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: argument --mode: invalid choice")


def test_a_mode_the_backend_lacks_is_one_line(
    capsys, tiny_policy: Path, demo_dataset: Path, tmp_path: Path
) -> None:
    line = _quantize(
        capsys, tiny_policy, demo_dataset, tmp_path / "out", "--backend", "executorch", "--mode", "dynamic"
    )
    assert line == (
        "error: the executorch backend has no 'dynamic' mode (fp32, static); "
        "dynamic is offered by torch, onnxruntime"
    )
    _assert_no_output(tmp_path / "out")


def test_onnx_int8_choices_are_the_variants(capsys) -> None:
    from quantization.backends.onnxruntime import VARIANTS_BY_NAME  # noqa: PLC0415

    with pytest.raises(SystemExit):
        main(["quantize", "--onnx-int8", "int3"])
    err = capsys.readouterr().err
    assert all(f"'{name}'" in err for name in VARIANTS_BY_NAME), err
