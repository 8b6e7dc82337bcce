"""Where the simulated fleet keeps its images, per-fleet state and per-host roots."""

from __future__ import annotations

import os
from pathlib import Path


def rover_cache() -> Path:
    """The project cache ($ROVER_CACHE, default ~/.cache/rover): images and fleets, never in git."""
    return Path(os.environ.get("ROVER_CACHE") or Path.home() / ".cache" / "rover")


def images_dir() -> Path:
    return rover_cache() / "images"


def fleet_dir(name: str) -> Path:
    return rover_cache() / "fleets" / name
