"""Publish the episodes one collect run brought from a car, each only once its files match its episode.json.

collect.yml pulls a car's new episodes with one rsync into `<store>/<car>/.incoming/<episode>/` (a staging
area neither the next run's listing nor the merge looks into). For each episode named, `receive_episodes`
moves it to `<store>/<car>/<episode>.partial/`, checks every file's size and sha256, and renames a good one
to `<store>/<car>/<episode>/`. A corrupt one stays `<episode>.partial` (for a look; never merged) and is
reported; the next run fetches it again.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from rover_runtime.episode_format import PARTIAL, EpisodeError, open_episode
from rover_runtime.safe_files import tree_bytes


@dataclass
class ReceiveResult:
    published: list[str] = field(default_factory=list)
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"published": self.published, "bytes": self.bytes, "errors": self.errors}


def receive_episodes(
    incoming: Path, car_store: Path, names: list[str], *, quota_bytes: int | None = None
) -> ReceiveResult:
    """Verify and publish the episodes `names` from `incoming` into `car_store` (see the module's text).

    Nothing a car sent is trusted. A name that is not a plain episode name is refused. An episode that is a
    symlink or not a directory is removed from `incoming` unread. One that `open_episode` refuses (a symlink
    or a path leaving it, a bad or oversized episode.json, a file that does not match) is quarantined as
    `<episode>.partial`. One that would take the car's store past `quota_bytes` is removed. Each is an
    error naming the episode and why.
    """
    result = ReceiveResult()
    # The car's published and quarantined episodes (not the staging area, where this run's episodes are).
    stored = car_store.iterdir() if car_store.is_dir() else iter(())
    used = sum(tree_bytes(p) for p in stored if not p.name.startswith(".") and p.is_dir())
    for name in names:
        if not _EPISODE_NAME.fullmatch(name) or name.endswith(PARTIAL):
            result.errors.append(f"episode {name!r}: not an episode name")
            continue
        source, partial, final = incoming / name, car_store / f"{name}{PARTIAL}", car_store / name
        if final.exists() or final.is_symlink():
            result.errors.append(f"episode {name}: already in the store ({final})")
            continue
        if source.is_symlink():
            source.unlink()  # the link only, never what it points to
            result.errors.append(f"episode {name}: a symlink, removed unread")
            continue
        if not source.is_dir():
            _remove(source)
            result.errors.append(f"episode {name}: not received")
            continue
        size = tree_bytes(source)
        if quota_bytes is not None and used + size > quota_bytes:
            shutil.rmtree(source)
            result.errors.append(
                f"episode {name}: {size} bytes would pass the car's quota of {quota_bytes} bytes "
                f"({used} in its store): not taken"
            )
            continue
        _remove(partial)  # a corrupt copy from an earlier run: this one replaces it
        source.rename(partial)
        try:
            episode = open_episode(partial)
        except EpisodeError as exc:
            result.errors.append(f"{exc} (quarantined as {partial.name})")
            used += size
            continue
        partial.rename(final)
        used += size
        result.published.append(name)
        result.bytes += sum(int(entry["bytes"]) for entry in episode.meta["files"].values())
    return result


# What the recorder names an episode: <UTC time>-<car>-<number>, letters, digits, '_', '.', '-' only.
_EPISODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _remove(path: Path) -> None:
    """Remove `path` whatever it is (a symlink itself, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
