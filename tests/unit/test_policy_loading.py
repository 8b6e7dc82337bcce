"""Offline checks of a LeRobot checkpoint directory, before lerobot is imported."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from quantization.errors import QuantizationError
from quantization.policy_loading import (
    CONFIG_FILE,
    POSTPROCESSOR_FILE,
    PREPROCESSOR_FILE,
    WEIGHTS_FILE,
    check_policy_dir,
    read_safetensors_header,
)


def _safetensors(path: Path, tensors: dict[str, list[int]]) -> None:
    """A valid little safetensors file of float32 tensors with the given shapes (zeros)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for dim in shape:
            size *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    root = tmp_path / "policy"
    root.mkdir()
    (root / CONFIG_FILE).write_text(json.dumps({"type": "act", "chunk_size": 10}))
    _safetensors(root / WEIGHTS_FILE, {"model.action_head.weight": [2, 8], "model.action_head.bias": [2]})
    for name, step in (
        (PREPROCESSOR_FILE, "normalizer_processor"),
        (POSTPROCESSOR_FILE, "unnormalizer_processor"),
    ):
        state = f"{name.removesuffix('.json')}_step_0_{step}.safetensors"
        steps = [{"registry_name": step, "config": {}, "state_file": state}]
        (root / name).write_text(json.dumps({"name": name.removesuffix(".json"), "steps": steps}))
        _safetensors(root / state, {"action.mean": [2], "action.std": [2]})
    return root


def test_a_sound_directory_passes(policy_dir: Path) -> None:
    files = check_policy_dir(policy_dir)
    assert files.policy_type == "act"
    assert files.tensor_names == ("model.action_head.bias", "model.action_head.weight")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="does not exist"):
        check_policy_dir(tmp_path / "nope")


def test_missing_config(policy_dir: Path) -> None:
    (policy_dir / CONFIG_FILE).unlink()
    with pytest.raises(QuantizationError, match=r"config\.json is missing"):
        check_policy_dir(policy_dir)


def test_missing_weights(policy_dir: Path) -> None:
    (policy_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(QuantizationError, match=r"model\.safetensors \(the weights\) is missing"):
        check_policy_dir(policy_dir)


def test_not_act(policy_dir: Path) -> None:
    (policy_dir / CONFIG_FILE).write_text(json.dumps({"type": "diffusion"}))
    with pytest.raises(QuantizationError, match="policy type is 'diffusion', only 'act'"):
        check_policy_dir(policy_dir)


def test_config_not_json(policy_dir: Path) -> None:
    (policy_dir / CONFIG_FILE).write_text("{")
    with pytest.raises(QuantizationError, match=r"config\.json: not valid JSON"):
        check_policy_dir(policy_dir)


def test_missing_normalization_stats(policy_dir: Path) -> None:
    (policy_dir / PREPROCESSOR_FILE).unlink()
    with pytest.raises(QuantizationError, match=r"policy_preprocessor\.json .* is missing"):
        check_policy_dir(policy_dir)


def test_processor_file_that_is_no_pipeline(policy_dir: Path) -> None:
    (policy_dir / PREPROCESSOR_FILE).write_text("{}")
    with pytest.raises(
        QuantizationError, match=r"policy_preprocessor\.json: not a lerobot processor pipeline"
    ):
        check_policy_dir(policy_dir)


def test_missing_statistics_state_file(policy_dir: Path) -> None:
    (policy_dir / "policy_postprocessor_step_0_unnormalizer_processor.safetensors").unlink()
    with pytest.raises(
        QuantizationError,
        match=r"policy_postprocessor_step_0_unnormalizer_processor\.safetensors "
        r"\(the normalization statistics named by policy_postprocessor\.json\) is missing",
    ):
        check_policy_dir(policy_dir)


def test_saving_release_is_told_from_the_files(policy_dir: Path) -> None:
    assert check_policy_dir(policy_dir).lerobot_series == "0.4.x"
    (policy_dir / CONFIG_FILE).write_text(json.dumps({"type": "act", "pretrained_revision": None}))
    assert check_policy_dir(policy_dir).lerobot_series == "0.6.x"


def test_config_from_a_newer_lerobot_is_refused(policy_dir: Path) -> None:
    (policy_dir / CONFIG_FILE).write_text(json.dumps({"type": "act", "pretrained_revision": None, "rope": 1}))
    with pytest.raises(
        QuantizationError,
        match=r"saved by lerobot newer than 0\.6\.1 "
        r"\(config\.json fields unknown to lerobot 0\.6\.1: rope\), which cannot be read here; "
        r"supported: checkpoints of lerobot 0\.4\.x and 0\.6\.x$",
    ):
        check_policy_dir(policy_dir)


def test_lerobot_03_layout_is_refused(policy_dir: Path) -> None:
    for path in policy_dir.glob("policy_*"):
        path.unlink()
    _safetensors(
        policy_dir / WEIGHTS_FILE, {"model.action_head.bias": [2], "normalize_inputs.buffer_x.mean": [2]}
    )
    with pytest.raises(
        QuantizationError, match=r"saved by lerobot 0\.3\.x or older, which cannot be read here"
    ):
        check_policy_dir(policy_dir)


def test_truncated_safetensors(policy_dir: Path) -> None:
    weights = policy_dir / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(QuantizationError, match=r"model\.safetensors: truncated or corrupt"):
        check_policy_dir(policy_dir)


def test_file_shorter_than_a_header(policy_dir: Path) -> None:
    (policy_dir / WEIGHTS_FILE).write_bytes(b"\x01\x02")
    with pytest.raises(QuantizationError, match="truncated safetensors file"):
        check_policy_dir(policy_dir)


def test_corrupt_header(policy_dir: Path) -> None:
    weights = policy_dir / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[8] = ord("#")  # the header's opening brace
    weights.write_bytes(bytes(data))
    with pytest.raises(QuantizationError, match="corrupt safetensors header"):
        read_safetensors_header(weights)


def test_header_length_beyond_the_file(policy_dir: Path) -> None:
    (policy_dir / WEIGHTS_FILE).write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(QuantizationError, match="corrupt or truncated safetensors file"):
        check_policy_dir(policy_dir)
