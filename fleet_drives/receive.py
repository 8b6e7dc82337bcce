"""Publish the episodes one collect run brought from a car, each only once its files match its episode.json.

collect.yml pulls a car's new episodes with one rsync into `<store>/<car>/.incoming/<episode>/` (a staging
area neither the next run's listing nor the merge looks into). For each episode named, `receive_episodes`
moves it to `<store>/<car>/<episode>.partial/`, checks every file's size and sha256, and renames a good one
to `<store>/<car>/<episode>/`. A corrupt one stays `<episode>.partial` (for a look; never merged) and is
reported; the next run fetches it again.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rover_runtime.recording import PARTIAL, EpisodeError, open_episode


@dataclass
class ReceiveResult:
    published: list[str] = field(default_factory=list)
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"published": self.published, "bytes": self.bytes, "errors": self.errors}


def receive_episodes(incoming: Path, car_store: Path, names: list[str]) -> ReceiveResult:
    """Verify and publish the episodes `names` from `incoming` into `car_store` (see the module's text)."""
    result = ReceiveResult()
    for name in names:
        if not name or "/" in name or name.startswith(".") or name.endswith(PARTIAL):
            result.errors.append(f"episode {name!r}: not an episode name")
            continue
        source, partial, final = incoming / name, car_store / f"{name}{PARTIAL}", car_store / name
        if final.exists():
            result.errors.append(f"episode {name}: already in the store ({final})")
            continue
        if not source.is_dir():
            result.errors.append(f"episode {name}: not received")
            continue
        if partial.exists():  # a corrupt copy from an earlier run: this one replaces it
            shutil.rmtree(partial)
        source.rename(partial)
        try:
            episode = open_episode(partial)
        except EpisodeError as exc:
            result.errors.append(str(exc))
            continue
        partial.rename(final)
        result.published.append(name)
        result.bytes += sum(int(entry["bytes"]) for entry in episode.meta["files"].values())
    return result
