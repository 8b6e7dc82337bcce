"""Training the demo ACT: saved like a user's checkpoint, reloads offline in a fresh process, cached."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from lerobot.datasets.lerobot_dataset import LeRobotDataset

from quantization import train_demo
from quantization.errors import QuantizationError
from quantization.train_demo import (
    METRICS_FILE,
    TINY_TRAIN_CONFIG,
    TrainConfig,
    ensure_demo_policy,
    policy_cache_key,
    train_demo_policy,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: load the saved policy offline and predict the reference frames' actions.
RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from quantization.train_demo import load_act_policy, predict_first_actions

    policy_dir, dataset_root, indices = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    policy, pre, post = load_act_policy(policy_dir)
    dataset = LeRobotDataset("rover/demo_track", root=dataset_root)
    items = [dataset[i] for i in indices]
    keys = ("observation.images.front", "observation.state")
    batch = {k: torch.stack([it[k] for it in items]) for k in keys}
    batch["task"] = [it["task"] for it in items]
    print(json.dumps(predict_first_actions(policy, pre, post, batch).tolist()))
    """
)


def _offline_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    # Any attempt to reach the network goes to a closed local port and fails at once.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        env[name] = "http://127.0.0.1:9"
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    return env


@pytest.mark.slow
def test_tiny_policy_is_saved_like_a_user_checkpoint(tiny_policy: Path) -> None:
    names = {p.name for p in tiny_policy.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "policy_preprocessor.json",
        "policy_postprocessor.json",
    } <= names
    assert any(n.startswith("policy_preprocessor_step_") and n.endswith(".safetensors") for n in names)
    assert any(n.startswith("policy_postprocessor_step_") and n.endswith(".safetensors") for n in names)
    assert METRICS_FILE not in names, "metrics belong beside the policy directory, not inside it"

    config = json.loads((tiny_policy / "config.json").read_text())
    assert config["type"] == "act"
    assert config["vision_backbone"] == "resnet18"
    assert config["pretrained_backbone_weights"] is None
    assert (config["dim_model"], config["chunk_size"], config["n_action_steps"]) == (64, 10, 10)
    assert set(config["input_features"]) == {"observation.images.front", "observation.state"}

    metrics = json.loads((tiny_policy.parent / METRICS_FILE).read_text())
    assert len(metrics["policy_mae"]) == len(metrics["baseline_mae"]) == 2
    assert metrics["heldout_episodes"] == [5]
    assert metrics["heldout_frames"] == 60
    assert all(v > 0 for v in metrics["baseline_mae"])


@pytest.mark.slow
def test_reloaded_policy_in_a_fresh_offline_process_gives_identical_actions(
    tiny_policy: Path, demo_dataset: Path
) -> None:
    reference = json.loads((tiny_policy.parent / METRICS_FILE).read_text())["reference"]
    assert len(reference["dataset_indices"]) == 8
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD_SCRIPT,
            str(tiny_policy),
            str(demo_dataset),
            json.dumps(reference["dataset_indices"]),
        ],
        env=_offline_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reloaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(reloaded) == len(reference["actions"])
    worst = max(
        abs(a - b)
        for row, ref in zip(reloaded, reference["actions"], strict=True)
        for a, b in zip(row, ref, strict=True)
    )
    assert worst <= 1e-5, f"reloaded policy differs from the trained one by {worst}"


@pytest.mark.slow
def test_cached_policy_is_reused_without_retraining(
    tiny_policy: Path, demo_dataset: Path, fixture_cache_root: Path
) -> None:
    weights = tiny_policy / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    again = ensure_demo_policy(fixture_cache_root, demo_dataset, TINY_TRAIN_CONFIG)
    assert again == tiny_policy
    assert weights.stat().st_mtime_ns == stamp, "the cached policy was retrained"
    # Any change of the training inputs is a different cache entry.
    more_steps = replace(TINY_TRAIN_CONFIG, steps=TINY_TRAIN_CONFIG.steps + 1)
    assert policy_cache_key(demo_dataset, more_steps) != tiny_policy.parent.name


@pytest.mark.slow
def test_policy_short_of_the_margin_fails_loudly_and_writes_nothing(
    demo_dataset: Path, tmp_path: Path
) -> None:
    hopeless = replace(TINY_TRAIN_CONFIG, steps=1, max_steering_mae_ratio=0.01)
    out = tmp_path / "policy-out"
    with pytest.raises(
        QuantizationError, match=r"not good enough: held-out steering MAE .* baseline"
    ) as excinfo:
        train_demo_policy(demo_dataset, out, hopeless)
    assert "throttle" in str(excinfo.value)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "no temporary directory left behind"


def test_existing_output_directory_is_refused(demo_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(QuantizationError, match=r"already exists: .*out \(use --force"):
        train_demo_policy(demo_dataset, out, TINY_TRAIN_CONFIG)


def test_cli_hook_reports_a_missing_dataset(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    train_demo.add_arguments(parser)
    args = parser.parse_args(
        ["--dataset", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--steps", "5"]
    )
    assert args.steps == 5
    assert args.force is False
    with pytest.raises(QuantizationError, match=r"dataset directory not found: .*missing"):
        train_demo.run(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_action_steps": 30}, "must not exceed chunk_size"),
        ({"dim_model": 100}, "divisible"),
        ({"steps": 0}, "positive"),
        ({"eval_max_frames": 0}, "evaluation frames must be positive"),
    ],
)
def test_bad_train_configs_are_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(QuantizationError, match=message):
        TrainConfig(**changes)


@pytest.mark.slow
def test_action_chunks_match_lerobots_delta_timestamps(demo_dataset: Path) -> None:
    """The training chunks equal what lerobot's own delta_timestamps query yields, padding included."""
    episodes = [0, 2, 3]
    reference = LeRobotDataset(
        "rover/demo_track",
        root=demo_dataset,
        episodes=episodes,
        delta_timestamps={"action": [i / 30 for i in range(10)]},
    )
    chunks = train_demo.ActionChunkDataset(
        LeRobotDataset("rover/demo_track", root=demo_dataset, episodes=episodes), 10
    )
    assert len(chunks) == len(reference) == 180
    for index in (0, 1, 52, 59, 60, 119, 120, 179):
        ours, theirs = chunks[index], reference[index]
        assert torch.equal(ours["action"], theirs["action"]), index
        assert torch.equal(ours["action_is_pad"], theirs["action_is_pad"]), index
    assert bool(chunks[59]["action_is_pad"][1:].all())
    assert not bool(chunks[50]["action_is_pad"].any())
