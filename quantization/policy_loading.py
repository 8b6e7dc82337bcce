"""Load and validate a LeRobot ACT checkpoint directory, offline.

A checkpoint directory (what `ACTPolicy.save_pretrained` plus the processors' `save_pretrained` write) holds
`config.json`, `model.safetensors` and the normalization pipelines `policy_preprocessor.json` /
`policy_postprocessor.json` with their `.safetensors` state files. `check_policy_dir` verifies the files
with the standard library only (so bad input is refused before lerobot is imported); `load_policy` then
builds lerobot's `ACTPolicy` and its pre/post-processors without touching the network.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantization.checkpoint_version import require_supported, saved_by
from quantization.errors import QuantizationError
from rover_runtime.bundle import sha256_file

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PREPROCESSOR_FILE = "policy_preprocessor.json"
POSTPROCESSOR_FILE = "policy_postprocessor.json"
_MAX_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


@dataclass(frozen=True)
class PolicyFiles:
    """A checkpoint directory whose files passed the offline checks."""

    root: Path
    config: dict[str, Any]
    weights: Path
    tensor_names: tuple[str, ...]
    lerobot_series: str  # the lerobot release that saved it: "0.4.x" or "0.6.x"

    @property
    def policy_type(self) -> str:
        return str(self.config.get("type"))


@dataclass
class LoadedPolicy:
    """lerobot's ACTPolicy with its processors, plus the facts the bundle manifest records."""

    files: PolicyFiles
    policy: Any  # lerobot ACTPolicy
    preprocessor: Any  # lerobot PolicyProcessorPipeline
    postprocessor: Any
    weights_sha256: str

    @property
    def config(self) -> Any:
        return self.policy.config


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse and check a safetensors header: a truncated or corrupt file raises QuantizationError."""
    size = path.stat().st_size
    with path.open("rb") as stream:
        head = stream.read(8)
        if len(head) < 8:
            raise QuantizationError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER, size - 8):
            raise QuantizationError(
                f"{path}: corrupt or truncated safetensors file (header of {header_len} bytes in a "
                f"{size}-byte file)"
            )
        raw = stream.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizationError(f"{path}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise QuantizationError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - header_len
    end_max = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in info["data_offsets"])
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            expected = count * _DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantizationError(f"{path}: corrupt safetensors entry for tensor {name!r}") from exc
        if end - start != expected or start < 0:
            raise QuantizationError(f"{path}: corrupt safetensors entry for tensor {name!r} (bad offsets)")
        end_max = max(end_max, end)
    if end_max != data_bytes:
        raise QuantizationError(
            f"{path}: truncated or corrupt safetensors file (tensors need {end_max} data bytes, "
            f"the file has {data_bytes})"
        )
    return header


def check_policy_dir(root: Path) -> PolicyFiles:
    """Check a checkpoint directory without lerobot: files present, an ACT config, sound safetensors."""
    if not root.is_dir():
        raise QuantizationError(f"policy directory {root} does not exist")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        raise QuantizationError(f"policy directory {root}: {CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise QuantizationError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise QuantizationError(f"{config_path}: must be a JSON object")
    policy_type = config.get("type")
    if policy_type != "act":
        raise QuantizationError(
            f"{config_path}: policy type is {policy_type!r}, only 'act' (LeRobot ACT) can be quantized"
        )
    weights = root / WEIGHTS_FILE
    if not weights.is_file():
        raise QuantizationError(f"policy directory {root}: {WEIGHTS_FILE} (the weights) is missing")
    header = read_safetensors_header(weights)
    names = tuple(sorted(k for k in header if k != "__metadata__"))
    processors = [root / PREPROCESSOR_FILE, root / POSTPROCESSOR_FILE]
    series = require_supported(root, saved_by(config, names, any(p.is_file() for p in processors)))
    for path in processors:
        _check_processor_files(path)
    return PolicyFiles(root=root, config=config, weights=weights, tensor_names=names, lerobot_series=series)


def _check_processor_files(path: Path) -> None:
    """A processor pipeline JSON and every state file it names (the normalization statistics) exist."""
    if not path.is_file():
        raise QuantizationError(
            f"policy directory {path.parent}: {path.name} (the normalization statistics) is missing"
        )
    try:
        pipeline = json.loads(path.read_text(encoding="utf-8"))
        steps = pipeline["steps"]
        state_files = [step["state_file"] for step in steps if step.get("state_file")]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise QuantizationError(f"{path}: not a lerobot processor pipeline ({exc!r})") from exc
    for name in state_files:
        state = path.parent / str(name)
        if not state.is_file():
            raise QuantizationError(
                f"policy directory {path.parent}: {name} (the normalization statistics named by "
                f"{path.name}) is missing"
            )
        read_safetensors_header(state)


def load_policy(root: Path) -> LoadedPolicy:
    """Load lerobot's ACTPolicy and its pre/post-processors from a checked checkpoint directory, offline."""
    files = check_policy_dir(root)
    from lerobot.configs.policies import PreTrainedConfig  # noqa: PLC0415
    from lerobot.policies.act.modeling_act import ACTPolicy  # noqa: PLC0415
    from lerobot.policies.factory import make_pre_post_processors  # noqa: PLC0415

    try:
        cfg = PreTrainedConfig.from_pretrained(str(root))
    except Exception as exc:
        raise QuantizationError(f"{root / CONFIG_FILE}: lerobot cannot read it: {exc}") from exc
    # The backbone weights come from the checkpoint: never try to download ImageNet weights.
    cfg.pretrained_backbone_weights = None
    cfg.device = "cpu"
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):  # lerobot prints "Loading weights from local directory"
            policy = ACTPolicy.from_pretrained(str(root), config=cfg)
    except Exception as exc:
        raise QuantizationError(f"{files.weights}: lerobot cannot load the weights: {exc}") from exc
    finally:
        if said.getvalue().strip():
            log.debug("lerobot: %s", said.getvalue().strip())
    policy.eval()
    # from_pretrained loads with strict=False: check every parameter and buffer came from the file.
    expected = set(policy.state_dict())
    missing = sorted(expected - set(files.tensor_names))
    if missing:
        raise QuantizationError(
            f"{files.weights}: {len(missing)} tensors of the ACT model are missing, e.g. {missing[0]}"
        )
    try:
        preprocessor, postprocessor = make_pre_post_processors(cfg, pretrained_path=str(root))
    except Exception as exc:
        raise QuantizationError(f"{root}: cannot load the policy pre/post-processors: {exc}") from exc
    log.info("loaded ACT policy from %s", root)
    return LoadedPolicy(
        files=files,
        policy=policy,
        preprocessor=preprocessor,
        postprocessor=postprocessor,
        weights_sha256=sha256_file(files.weights),
    )
