"""The fleet's recorded episodes (collected from the cars' black boxes) -> one LeRobotDataset, written with
lerobot's own writer, for the next training run.

Per frame: `observation.images.<camera>` (the recorded frame, RGB, at the bundle's resolution),
`observation.state`, `action` (what the car applied: the Pi's command in autopilot, the driver's sticks in
manual), `driver` (1.0 while the driver drove) and `takeover` (1.0 during a takeover: the driver took the car
from the Pi; training can weight these frames). A step without a frame from every camera, or without a state
or an applied action (before the firmware answered), is left out and counted.

Per episode, `meta/rover_episodes.jsonl` (next to lerobot's own metadata): the source episode, the car, the
release and bundle that drove, the modes with their step counts, the takeovers ([start, end) frame indices
in the merged episode) and why the episode ended.

An episode that fails its checksums, cannot be read, or does not match the others (fps, cameras, image
shapes, state) is skipped with a named error; the merge goes on. The dataset is written to a temporary
directory and renamed into place, so a failed merge leaves no half dataset.

`meta/rover_merge.json` records what the dataset was merged from (a hash of every source episode's
`episode.json`, which lists its files' sha256, the repo id, the task and this module) and the merge's
result. Merging the same sources again returns that result (`unchanged`) without rewriting the dataset: a
collect that brought nothing new costs a hash of the store, not a re-merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rover_runtime.recording import Episode, EpisodeError, open_episode

log = logging.getLogger(__name__)

SIDECAR = "rover_episodes.jsonl"
MERGE_RECORD = "rover_merge.json"
DEFAULT_TASK = "Drive the RC car along the track."


class MergeError(ValueError):
    """Nothing can be merged (no usable episode, an existing output); the message says why."""


@dataclass
class MergeResult:
    output: Path
    episodes: int = 0
    frames: int = 0
    steps_left_out: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"episode", "error"}
    unchanged: bool = False  # the dataset was already merged from exactly these sources

    def to_json(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "episodes": self.episodes,
            "frames": self.frames,
            "steps_left_out": self.steps_left_out,
            "skipped": self.skipped,
            "unchanged": self.unchanged,
        }


@dataclass(frozen=True)
class _Layout:
    fps: float
    cameras: tuple[tuple[str, str, tuple[int, int, int]], ...]  # (name, key, (3, H, W))
    state_names: tuple[str, ...]
    action_names: tuple[str, ...]

    @classmethod
    def of(cls, episode: Episode) -> _Layout:
        info = episode.info
        return cls(
            fps=float(episode.meta["fps"]),
            cameras=tuple((c.name, c.key, c.shape) for c in info.cameras),
            state_names=info.state_names,
            action_names=info.action_names,
        )

    def features(self) -> dict[str, dict[str, Any]]:
        features: dict[str, dict[str, Any]] = {}
        for _, key, (_, height, width) in self.cameras:
            features[key] = {
                "dtype": "image",
                "shape": (height, width, 3),
                "names": ["height", "width", "channels"],
            }
        features["observation.state"] = {
            "dtype": "float32",
            "shape": (len(self.state_names),),
            "names": list(self.state_names),
        }
        features["action"] = {
            "dtype": "float32",
            "shape": (len(self.action_names),),
            "names": list(self.action_names),
        }
        features["driver"] = {"dtype": "float32", "shape": (1,), "names": ["driver"]}
        features["takeover"] = {"dtype": "float32", "shape": (1,), "names": ["takeover"]}
        return features

    def differences(self, other: _Layout) -> str:
        for what, mine, theirs in (
            ("fps", self.fps, other.fps),
            ("cameras", self.cameras, other.cameras),
            ("state", self.state_names, other.state_names),
            ("actions", self.action_names, other.action_names),
        ):
            if mine != theirs:
                return f"its {what} {theirs} differ from the dataset's {mine}"
        return ""


def find_episodes(store: Path) -> list[Path]:
    """Every episode directory under a collect store (`<store>/<car>/<episode>/episode.json`), in time order
    (episode names begin with the UTC start time)."""
    found = [p.parent for p in store.glob("*/*/episode.json")]
    return sorted(found, key=lambda p: (p.name, p.parent.name))


def merge_episodes(
    episode_dirs: Sequence[Path],
    output: Path,
    *,
    repo_id: str = "rover/fleet_drives",
    task: str = DEFAULT_TASK,
    force: bool = False,
) -> MergeResult:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415 - controller only

    if output.exists() and not force:
        raise MergeError(f"output directory already exists: {output} (use --force to replace it)")
    sources = sources_fingerprint(episode_dirs, repo_id, task)
    previous = _previous_merge(output, sources)
    if previous is not None:
        log.info("%s is already merged from these %d episodes: unchanged", output, len(episode_dirs))
        return previous
    result = MergeResult(output)
    episodes: list[Episode] = []
    for path in episode_dirs:
        try:
            episodes.append(open_episode(path))
        except EpisodeError as exc:
            log.error("skipped: %s", exc)
            result.skipped.append({"episode": str(path), "error": str(exc)})
    if not episodes:
        raise MergeError(f"no usable episode among {len(episode_dirs)}: {_skipped_text(result)}")
    layout = _Layout.of(episodes[0])
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-", dir=output.parent) as tmp:
        staging = Path(tmp) / "dataset"
        dataset = LeRobotDataset.create(
            repo_id=repo_id,
            fps=round(layout.fps),
            features=layout.features(),
            root=staging,
            robot_type="rc_car",
            use_videos=False,
        )
        sidecar: list[dict[str, Any]] = []
        try:
            for episode in episodes:
                problem = layout.differences(_Layout.of(episode))
                if problem:
                    result.skipped.append(
                        {"episode": str(episode.path), "error": f"episode {episode.name}: {problem}"}
                    )
                    continue
                try:
                    frames, left_out, takeovers = _episode_frames(episode, layout, task)
                except (EpisodeError, OSError, ValueError, KeyError, TypeError) as exc:
                    error = f"episode {episode.name}: unreadable step or frame: {exc}"
                    log.error("skipped: %s", error)
                    result.skipped.append({"episode": str(episode.path), "error": error})
                    continue
                result.steps_left_out += left_out
                if not frames:
                    result.skipped.append(
                        {"episode": str(episode.path), "error": f"episode {episode.name}: no complete step"}
                    )
                    continue
                for frame in frames:
                    dataset.add_frame(frame)
                dataset.save_episode()
                meta = episode.meta
                sidecar.append(
                    {
                        "episode_index": result.episodes,
                        "source": episode.name,
                        "car": meta["car"],
                        "release": meta["release"],
                        "bundle": meta["bundle"],
                        "started_at": meta.get("started_at"),
                        "modes": meta.get("modes", {}),
                        "takeovers": takeovers,
                        "end_reason": meta.get("end_reason"),
                        "frames": len(frames),
                    }
                )
                result.episodes += 1
                result.frames += len(frames)
                log.info("merged %s (%s): %d frames", episode.name, meta["car"], len(frames))
        finally:
            dataset.finalize()
        if result.episodes == 0:
            raise MergeError(f"no episode could be merged: {_skipped_text(result)}")
        (staging / "meta" / SIDECAR).write_text("".join(json.dumps(row) + "\n" for row in sidecar))
        record = {"sources": sources, "result": result.to_json()}
        (staging / "meta" / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    return result


def sources_fingerprint(episode_dirs: Sequence[Path], repo_id: str, task: str) -> str:
    """What a merge reads: each episode's place and `episode.json` (its files' sha256), the settings, and
    this module's code."""
    digest = hashlib.sha256(json.dumps([repo_id, task]).encode() + b"\0" + Path(__file__).read_bytes())
    for path in episode_dirs:
        try:
            described = (path / "episode.json").read_bytes()
        except OSError as exc:
            described = f"unreadable: {exc.strerror}".encode()
        digest.update(f"\0{path.parent.name}/{path.name}\0".encode() + described)
    return digest.hexdigest()


def _previous_merge(output: Path, sources: str) -> MergeResult | None:
    """The recorded result when `output` is an intact merge of exactly `sources`, else None."""
    try:
        record = json.loads((output / "meta" / MERGE_RECORD).read_text(encoding="utf-8"))
        if record["sources"] != sources or not (output / "meta" / "info.json").is_file():
            return None
        raw = record["result"]
        return MergeResult(
            output=output,
            episodes=int(raw["episodes"]),
            frames=int(raw["frames"]),
            steps_left_out=int(raw["steps_left_out"]),
            skipped=[{"episode": str(s["episode"]), "error": str(s["error"])} for s in raw["skipped"]],
            unchanged=True,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _episode_frames(
    episode: Episode, layout: _Layout, task: str
) -> tuple[list[dict[str, Any]], int, list[list[int]]]:
    """The episode's complete steps as lerobot frames, how many steps were left out, and the takeovers."""
    takeover_steps = {i for start, end in episode.meta.get("takeovers", []) for i in range(start, end)}
    frames: list[dict[str, Any]] = []
    left_out = 0
    flags: list[bool] = []
    for line in episode.steps():
        entries = line["frames"]
        if (
            line["state"] is None
            or line["applied"] is None
            or any(entries.get(c[0]) is None for c in layout.cameras)
        ):
            left_out += 1
            continue
        frame: dict[str, Any] = {"task": task}
        for name, key, _ in layout.cameras:
            frame[key] = episode.frame(name, entries[name])[:, :, ::-1].copy()  # BGR -> RGB
        frame["observation.state"] = np.asarray(line["state"], np.float32)
        frame["action"] = np.asarray(line["applied"], np.float32)
        frame["driver"] = np.asarray([1.0 if line["driver"] else 0.0], np.float32)
        takeover = line["i"] in takeover_steps
        frame["takeover"] = np.asarray([1.0 if takeover else 0.0], np.float32)
        flags.append(takeover)
        frames.append(frame)
    return frames, left_out, _runs(flags)


def _runs(flags: Sequence[bool]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i, flag in enumerate(flags):
        if flag and runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        elif flag:
            runs.append([i, i + 1])
    return runs


def _skipped_text(result: MergeResult) -> str:
    return "; ".join(s["error"] for s in result.skipped) or "none found"
