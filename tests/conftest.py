"""Shared fixtures: a small synthetic LeRobot dataset and a tiny trained ACT policy.

Both are expensive to make, so they are built once and cached under
``$ROVER_CACHE/test-fixtures`` keyed by their inputs (a second test run reuses them).
lerobot is imported only inside the fixtures: the ``rover_runtime`` tests run on a car without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep lerobot / datasets / torch caches inside the project cache and never reach for the network.
_ROVER_CACHE_DEFAULT = "/root/.cache/rover"
os.environ.setdefault("ROVER_CACHE", _ROVER_CACHE_DEFAULT)
os.environ.setdefault("HF_HOME", str(Path(os.environ["ROVER_CACHE"]) / "huggingface"))
os.environ.setdefault("TORCH_HOME", str(Path(os.environ["ROVER_CACHE"]) / "torch"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _fixture_cache_root() -> Path:
    return Path(os.environ["ROVER_CACHE"]) / "test-fixtures"


@pytest.fixture(scope="session")
def fixture_cache_root() -> Path:
    """Where expensive test fixtures are cached: ``$ROVER_CACHE/test-fixtures``."""
    return _fixture_cache_root()


@pytest.fixture(scope="session")
def demo_dataset() -> Path:
    """A small demo dataset: 6 episodes x 60 frames at 96x128, splits train 0:5 / test 5:6."""
    from quantization.demo_data import DemoDataConfig, ensure_demo_dataset  # noqa: PLC0415 - needs lerobot

    config = DemoDataConfig(episodes=6, frames_per_episode=60, heldout_episodes=1, seed=7)
    return ensure_demo_dataset(_fixture_cache_root(), config)


@pytest.fixture(scope="session")
def tiny_policy(demo_dataset: Path) -> Path:
    """A small ACT (ResNet18 backbone kept, dim_model 64, 1 encoder layer, chunk 10) trained briefly."""
    from quantization.train_demo import TINY_TRAIN_CONFIG, ensure_demo_policy  # noqa: PLC0415 - needs lerobot

    return ensure_demo_policy(_fixture_cache_root(), demo_dataset, TINY_TRAIN_CONFIG)


# A test that skips because a tool is missing names the package to install ("apt-get install ..."). The
# set-up (scripts/bootstrap.sh) installs them all, so under CI (CI=true) such a skip is a gap in the run,
# not a choice: it fails instead, naming what is missing.
MISSING_TOOL = "apt-get install"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI", "").lower() != "true" or not report.skipped:
        return None
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    if MISSING_TOOL in reason:
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true and a tool the set-up installs is missing, so this test cannot run: {reason}"
        )
    return None
