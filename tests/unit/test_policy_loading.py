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
    (root / PREPROCESSOR_FILE).write_text("{}")
    (root / POSTPROCESSOR_FILE).write_text("{}")
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
