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

`meta/rover_merge.json` records what the dataset was merged from (every source episode with the sha256 of
its `episode.json`, which lists its files' sha256; the repo id, the task and this module), its layout and
the merge's result. Merging the same sources again returns that result (`unchanged`) without rewriting the
dataset; sources that only add later episodes are appended (lerobot's `LeRobotDataset.resume`, on a copy
renamed into place): a collect costs its new episodes, not a re-merge of the whole store.
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

from rover_runtime.episode_format import PARTIAL, Episode, EpisodeError, open_episode

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

    def to_json(self) -> dict[str, Any]:
        return {
            "fps": self.fps,
            "cameras": [[name, key, list(shape)] for name, key, shape in self.cameras],
            "state_names": list(self.state_names),
            "action_names": list(self.action_names),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> _Layout:
        return cls(
            fps=float(raw["fps"]),
            cameras=tuple(
                (str(name), str(key), (int(shape[0]), int(shape[1]), int(shape[2])))
                for name, key, shape in raw["cameras"]
            ),
            state_names=tuple(str(n) for n in raw["state_names"]),
            action_names=tuple(str(n) for n in raw["action_names"]),
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
    """Every published episode directory under a collect store (`<store>/<car>/<episode>/episode.json`), in
    time order (episode names begin with the UTC start time); not a quarantined `<episode>.partial`, a
    staging area (`.incoming`) or a symlink."""
    found = [
        p.parent
        for p in store.glob("*/*/episode.json")
        if not p.parent.name.endswith(PARTIAL)
        and not p.parent.name.startswith(".")
        and not p.parent.is_symlink()
        and not p.parent.parent.is_symlink()
    ]
    return sorted(found, key=lambda p: (p.name, p.parent.name))


def merge_episodes(
    episode_dirs: Sequence[Path],
    output: Path,
    *,
    repo_id: str = "rover/fleet_drives",
    task: str = DEFAULT_TASK,
    force: bool = False,
) -> MergeResult:
    """Merge `episode_dirs` into the LeRobotDataset `output`, or bring an earlier merge up to date.

    When `output` is an intact merge of an earlier set of these same sources (`meta/rover_merge.json`) and
    every source that is new sorts after all of them, only the new ones are appended (to a copy, renamed
    into place): the result is the dataset a full merge would write. Nothing new: the recorded result.
    Anything else (a source changed or gone, new settings): a full merge.
    """
    if output.exists() and not force:
        raise MergeError(f"output directory already exists: {output} (use --force to replace it)")
    sources = [_source_entry(path) for path in episode_dirs]
    settings = _settings_fingerprint(repo_id, task)
    record = _previous_record(output, settings)
    if record is None:
        return _merge_all(
            episode_dirs, output, sources=sources, repo_id=repo_id, task=task, settings=settings
        )
    if sources == record["sources"]:
        log.info("%s is already merged from these %d episodes: unchanged", output, len(episode_dirs))
        return _result_of(output, record["result"], unchanged=True)
    known = {entry["source"]: entry for entry in record["sources"]}
    new = [path for path, entry in zip(episode_dirs, sources, strict=True) if entry["source"] not in known]
    appendable = (
        all(known.get(e["source"], e) == e for e in sources)  # nothing merged before has changed...
        and len(sources) - len(new) == len(known)  # ...or gone
        and all(e["source"] > max(known, default="") for e in sources if e["source"] not in known)
    )
    if appendable:
        return _append(
            output, new, sources=sources, record=record, repo_id=repo_id, task=task, settings=settings
        )
    return _merge_all(episode_dirs, output, sources=sources, repo_id=repo_id, task=task, settings=settings)


def _merge_all(
    episode_dirs: Sequence[Path],
    output: Path,
    *,
    sources: list[dict[str, str]],
    repo_id: str,
    task: str,
    settings: str,
) -> MergeResult:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415 - controller only

    result = MergeResult(output)
    episodes = _open_episodes(episode_dirs, result)
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
        try:
            sidecar = _add_episodes(dataset, episodes, layout, task, result)
        finally:
            dataset.finalize()
        if result.episodes == 0:
            raise MergeError(f"no episode could be merged: {_skipped_text(result)}")
        (staging / "meta" / SIDECAR).write_text("".join(json.dumps(row) + "\n" for row in sidecar))
        _write_record(staging, settings, sources, layout, result)
        _publish(staging, output)
    return result


def _append(
    output: Path,
    new: Sequence[Path],
    *,
    sources: list[dict[str, str]],
    record: dict[str, Any],
    repo_id: str,
    task: str,
    settings: str,
) -> MergeResult:
    """Append the `new` episodes to a copy of `output` (the merge `record` describes), then swap it in."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415 - controller only

    result = _result_of(output, record["result"], unchanged=False)
    before = result.episodes
    layout = _Layout.from_json(record["layout"])
    episodes = _open_episodes(new, result)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.tmp-", dir=output.parent) as tmp:
        staging = Path(tmp) / "dataset"
        shutil.copytree(output, staging)
        dataset = LeRobotDataset.resume(repo_id, root=staging)
        try:
            sidecar = _add_episodes(dataset, episodes, layout, task, result)
        finally:
            dataset.finalize()
        with (staging / "meta" / SIDECAR).open("a", encoding="utf-8") as rows:
            rows.writelines(json.dumps(row) + "\n" for row in sidecar)
        _write_record(staging, settings, sources, layout, result)
        _publish(staging, output)
    log.info("appended %d new episodes to %s (%d before)", result.episodes - before, output, before)
    return result


def _open_episodes(episode_dirs: Sequence[Path], result: MergeResult) -> list[Episode]:
    episodes: list[Episode] = []
    for path in episode_dirs:
        try:
            episodes.append(open_episode(path))
        except EpisodeError as exc:
            log.error("skipped: %s", exc)
            result.skipped.append({"episode": str(path), "error": str(exc)})
    return episodes


def _add_episodes(
    dataset: Any, episodes: Sequence[Episode], layout: _Layout, task: str, result: MergeResult
) -> list[dict[str, Any]]:
    """Add every episode that fits `layout` to `dataset`, counted in `result`; returns their sidecar rows."""
    sidecar: list[dict[str, Any]] = []
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
    return sidecar


def _publish(staging: Path, output: Path) -> None:
    """Put the finished `staging` dataset at `output` (same file system), replacing what was there."""
    if output.exists():
        old = staging.parent / "old"
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old)
    else:
        staging.rename(output)


def _source_entry(path: Path) -> dict[str, str]:
    """A source episode as a merge records it: its name, then its car (names begin with the UTC start time,
    so these sort in time order), and the sha256 of its `episode.json` (which lists every file's sha256)."""
    try:
        described = hashlib.sha256((path / "episode.json").read_bytes()).hexdigest()
    except OSError as exc:
        described = f"unreadable: {exc.strerror}"
    return {"source": f"{path.name}/{path.parent.name}", "episode_json_sha256": described}


def _settings_fingerprint(repo_id: str, task: str) -> str:
    """The repo id, the task and this module's code: what else decides the merged dataset."""
    code = Path(__file__).read_bytes()
    return hashlib.sha256(json.dumps([repo_id, task]).encode() + b"\0" + code).hexdigest()


def _write_record(
    staging: Path, settings: str, sources: list[dict[str, str]], layout: _Layout, result: MergeResult
) -> None:
    record = {
        "settings": settings,
        "sources": sources,
        "layout": layout.to_json(),
        "result": result.to_json(),
    }
    (staging / "meta" / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _previous_record(output: Path, settings: str) -> dict[str, Any] | None:
    """`output`'s merge record when `output` is an intact merge made with these settings, else None."""
    try:
        record = json.loads((output / "meta" / MERGE_RECORD).read_text(encoding="utf-8"))
        if record["settings"] != settings or not (output / "meta" / "info.json").is_file():
            return None
        _result_of(output, record["result"], unchanged=True)
        _Layout.from_json(record["layout"])
        for entry in record["sources"]:
            if set(entry) != {"source", "episode_json_sha256"} or not all(
                isinstance(v, str) for v in entry.values()
            ):
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return dict(record)


def _result_of(output: Path, raw: dict[str, Any], *, unchanged: bool) -> MergeResult:
    return MergeResult(
        output=output,
        episodes=int(raw["episodes"]),
        frames=int(raw["frames"]),
        steps_left_out=int(raw["steps_left_out"]),
        skipped=[{"episode": str(s["episode"]), "error": str(s["error"])} for s in raw["skipped"]],
        unchanged=unchanged,
    )


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
