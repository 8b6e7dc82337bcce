"""Which episodes of a LeRobotDataset are for training and which are held out for evaluation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from quantization.errors import QuantizationError

log = logging.getLogger(__name__)

HELDOUT_SPLIT_NAMES = ("test", "val", "validation")
# The LeRobotDataset format versions the installed lerobot (0.6.x; 0.4.x wrote the same) reads.
READABLE_CODEBASE_VERSIONS = ("v3.0",)
FALLBACK_HELDOUT_FRACTION = 0.1


def _parse_range(text: object, info_path: Path, name: str) -> list[int]:
    """Parse lerobot's ``"start:stop"`` split notation into episode indices."""
    if not isinstance(text, str) or text.count(":") != 1:
        raise QuantizationError(f"{info_path}: splits.{name} must look like 'start:stop', got {text!r}")
    start_text, stop_text = text.split(":")
    try:
        start, stop = int(start_text), int(stop_text)
    except ValueError:
        raise QuantizationError(
            f"{info_path}: splits.{name} must look like 'start:stop', got {text!r}"
        ) from None
    if not 0 <= start <= stop:
        raise QuantizationError(f"{info_path}: splits.{name} has an invalid range {text!r}")
    return list(range(start, stop))


def read_dataset_info(dataset_root: Path) -> dict[str, object]:
    """Load ``meta/info.json`` of a LeRobotDataset, with a one-line error when it is missing or invalid."""
    dataset_root = Path(dataset_root)
    if not dataset_root.is_dir():
        raise QuantizationError(f"dataset directory not found: {dataset_root}")
    info_path = dataset_root / "meta" / "info.json"
    if not info_path.is_file():
        raise QuantizationError(f"not a LeRobot dataset (missing {info_path})")
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise QuantizationError(f"{info_path}: invalid JSON ({exc})") from None
    if not isinstance(info, dict):
        raise QuantizationError(f"{info_path}: expected a JSON object")
    version = info.get("codebase_version")
    if version not in READABLE_CODEBASE_VERSIONS:
        hint = (
            " (convert it with: python -m lerobot.scripts.convert_dataset_v21_to_v30 --repo-id=...)"
            if version == "v2.1"
            else ""
        )
        raise QuantizationError(
            f"{info_path}: dataset codebase version {version!r} cannot be read by lerobot 0.6.1, which "
            f"reads {', '.join(READABLE_CODEBASE_VERSIONS)}{hint}"
        )
    return info


def train_and_heldout_episodes(dataset_root: Path) -> tuple[list[int], list[int]]:
    """The training and held-out episode indices of a dataset.

    Uses ``meta/info.json``'s ``splits`` (``"train"`` and one of ``"test"``/``"val"``/``"validation"``).
    A dataset without a held-out split (the usual case for a user's recording) holds out its last 10 % of
    episodes (rounded down, at least one), and says so in the log.
    """
    info = read_dataset_info(dataset_root)
    info_path = Path(dataset_root) / "meta" / "info.json"
    total = info.get("total_episodes")
    if not isinstance(total, int) or total < 1:
        raise QuantizationError(f"{info_path}: total_episodes must be a positive integer, got {total!r}")
    splits = info.get("splits") or {}
    if not isinstance(splits, dict):
        raise QuantizationError(f"{info_path}: splits must be an object, got {splits!r}")

    heldout_name = next((name for name in HELDOUT_SPLIT_NAMES if name in splits), None)
    if heldout_name is not None:
        heldout = _parse_range(splits[heldout_name], info_path, heldout_name)
        if "train" in splits:
            train = _parse_range(splits["train"], info_path, "train")
        else:
            train = [e for e in range(total) if e not in set(heldout)]
        for name, episodes in (("train", train), (heldout_name, heldout)):
            if episodes and episodes[-1] >= total:
                raise QuantizationError(
                    f"{info_path}: splits.{name} reaches episode {episodes[-1]} "
                    f"but the dataset has {total} episodes"
                )
        if not heldout:
            raise QuantizationError(f"{info_path}: splits.{heldout_name} is empty")
        if set(train) & set(heldout):
            raise QuantizationError(f"{info_path}: splits.train and splits.{heldout_name} overlap")
        return train, heldout

    if total < 2:
        raise QuantizationError(
            f"{info_path}: dataset has {total} episode and no held-out split; need at least 2 episodes"
        )
    n_heldout = max(1, int(total * FALLBACK_HELDOUT_FRACTION))
    train, heldout = list(range(total - n_heldout)), list(range(total - n_heldout, total))
    log.warning(
        "%s has no held-out split in meta/info.json; holding out its last %d of %d episodes (%d-%d)",
        dataset_root,
        n_heldout,
        total,
        heldout[0],
        heldout[-1],
    )
    return train, heldout


def evenly_spaced(total: int, count: int) -> list[int]:
    """`count` indices of `range(total)`, evenly spaced with the first and the last among them (all of them
    when `count` is not smaller)."""
    if count >= total:
        return list(range(total))
    spacing = (total - 1) / max(1, count - 1)
    return [round(i * spacing) for i in range(count)]
