"""Train / held-out episodes from a LeRobotDataset's meta/info.json."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from quantization.dataset_split import evenly_spaced, train_and_heldout_episodes
from quantization.errors import QuantizationError


def _dataset(tmp_path: Path, info: object) -> Path:
    """A dataset whose meta/info.json is `info` (a dict gets lerobot 0.6's codebase_version unless given)."""
    if isinstance(info, dict):
        info = {"codebase_version": "v3.0", **info}
    root = tmp_path / "dataset"
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root


def test_demo_dataset_split(demo_dataset: Path) -> None:
    assert train_and_heldout_episodes(demo_dataset) == ([0, 1, 2, 3, 4], [5])


@pytest.mark.parametrize("name", ["test", "val", "validation"])
def test_heldout_split_names(tmp_path: Path, name: str) -> None:
    root = _dataset(tmp_path, {"total_episodes": 10, "splits": {"train": "0:7", name: "7:10"}})
    assert train_and_heldout_episodes(root) == (list(range(7)), [7, 8, 9])


def test_train_defaults_to_the_episodes_not_held_out(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"total_episodes": 5, "splits": {"test": "0:2"}})
    assert train_and_heldout_episodes(root) == ([2, 3, 4], [0, 1])


@pytest.mark.parametrize(("total", "heldout"), [(25, [23, 24]), (10, [9]), (3, [2]), (2, [1])])
def test_user_dataset_without_heldout_split_holds_out_the_last_tenth(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, total: int, heldout: list[int]
) -> None:
    # This is what lerobot writes for a recorded dataset: only a train split covering everything.
    root = _dataset(tmp_path, {"total_episodes": total, "splits": {"train": f"0:{total}"}})
    with caplog.at_level(logging.WARNING, logger="quantization.dataset_split"):
        train, held = train_and_heldout_episodes(root)
    assert held == heldout
    assert train == list(range(total - len(heldout)))
    assert "no held-out split" in caplog.text


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"total_episodes": 0, "splits": {}}, "total_episodes must be a positive integer"),
        ({"splits": {"test": "0:1"}}, "total_episodes"),
        ({"total_episodes": 1, "splits": {"train": "0:1"}}, "need at least 2 episodes"),
        ({"total_episodes": 4, "splits": {"train": "0:3", "test": "3-4"}}, r"splits.test must look like"),
        ({"total_episodes": 4, "splits": {"train": "0:3", "test": "3:x"}}, r"splits.test must look like"),
        (
            {"total_episodes": 4, "splits": {"train": "0:3", "test": "3:9"}},
            "reaches episode 8 but the dataset has 4",
        ),
        ({"total_episodes": 4, "splits": {"train": "0:3", "test": "2:4"}}, "overlap"),
        ({"total_episodes": 4, "splits": {"train": "0:4", "test": "4:4"}}, "is empty"),
        ({"total_episodes": 4, "splits": ["0:3"]}, "splits must be an object"),
        (["not", "an", "object"], "expected a JSON object"),
        (
            {"codebase_version": "v2.1", "total_episodes": 4},
            r"codebase version 'v2.1' cannot be read by lerobot 0.6.1, which reads v3.0 \(convert it with",
        ),
        ({"codebase_version": None, "total_episodes": 4}, "codebase version None cannot be read"),
    ],
)
def test_invalid_info_is_refused_naming_the_file(tmp_path: Path, info: object, message: str) -> None:
    root = _dataset(tmp_path, info)
    with pytest.raises(QuantizationError, match=message) as excinfo:
        train_and_heldout_episodes(root)
    assert "info.json" in str(excinfo.value)


def test_missing_dataset_directory(tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match=r"dataset directory not found: .*nowhere"):
        train_and_heldout_episodes(tmp_path / "nowhere")


def test_directory_without_info_json(tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match=r"not a LeRobot dataset \(missing .*meta/info.json\)"):
        train_and_heldout_episodes(tmp_path)


def test_corrupt_info_json(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text('{"total_episodes": 3,')
    with pytest.raises(QuantizationError, match=r"info.json: invalid JSON"):
        train_and_heldout_episodes(tmp_path)


def test_evenly_spaced_picks_distinct_sorted_indices_from_first_to_last() -> None:
    for total in range(1, 300):
        for count in range(1, total + 3):
            picks = evenly_spaced(total, count)
            assert len(picks) == min(total, count)
            assert picks == sorted(set(picks))
            assert picks[0] == 0
            assert picks[-1] == total - 1 or count == 1
            assert all(0 <= i < total for i in picks)
