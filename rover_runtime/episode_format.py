"""An episode on disk: the format the car's black box writes (`recording`, `episode_writer`) and the
controller reads (collect, merge, report: `open_episode`, which checks it as something a car sent).

On disk (`record.directory`):

    episodes/<UTC start>-<car>-<seq>/            a finished episode (never changed again)
        episode.json       written last: what, when, which release, counts, segments, every file's sha256
        steps.jsonl        one JSON line per control step (see `StepRecord`; `temp_c`: the SoC temperature,
                           sampled once a second by the writer)
        <camera>.jpg.bin   the camera's frames at the bundle's resolution, JPEG, back to back; each step
                           line gives its frame's offset, length and CRC-32
    episodes/<...>.partial/                      the episode being written
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rover_runtime.bundle import sha256_file
from rover_runtime.safe_files import (
    UnsafeFileError,
    check_tree,
    listed_path,
    parse_json,
    read_json_file,
)

FORMAT_VERSION = 1
EPISODES = "episodes"
PARTIAL = ".partial"
STEPS_FILE = "steps.jsonl"
EPISODE_FILE = "episode.json"
SEQUENCE_FILE = ".sequence"  # the last episode number used
FRAMES_SUFFIX = ".jpg.bin"


@dataclass(frozen=True)
class CameraSpec:
    name: str
    key: str  # the bundle's image key
    shape: tuple[int, int, int]  # (3, H, W): recorded at the resolution the bundle uses


@dataclass(frozen=True)
class EpisodeInfo:
    """What every step of an episode shares."""

    car: str
    release: str | None
    bundle: str | None  # the bundle's content hash
    cameras: tuple[CameraSpec, ...]
    state_names: tuple[str, ...]
    action_names: tuple[str, ...] = ("steering", "throttle")


@dataclass
class StepRecord:
    """One control step, as the loop saw it. `images` are the cameras' frames (BGR, any size; None when a
    camera had no fresh frame), encoded by the writer, never by the loop."""

    step: int
    monotonic: float
    wall: float
    mode: str | None  # the transmitter switch's mode (protocol.MODE_NAMES)
    driver: bool  # the driver's sticks drive the car (manual mode)
    state: tuple[float, ...] | None
    policy_action: tuple[float, float] | None  # what the policy asked for
    command: tuple[float, float] | None  # what was written to the serial line
    applied: tuple[float, float] | None  # what the car outputs (firmware ack): the training action
    faults: tuple[str, ...]
    images: dict[str, NDArray[Any] | None] = field(default_factory=dict)
    latency_ms: float | None = None  # the newest chunk's inference time


def encode_jpeg(image_bgr: NDArray[Any], shape: tuple[int, int, int], quality: int) -> bytes:
    """The frame at the bundle's (3, H, W), as JPEG (the camera's BGR order; decoders give BGR back)."""
    import cv2  # noqa: PLC0415 - a runtime dependency, kept out of `import rover_runtime`

    _, height, width = shape
    if image_bgr.shape[:2] != (height, width):
        image_bgr = cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_AREA)
    ok, data = cv2.imencode(".jpg", image_bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise OSError("JPEG encoding failed")
    return bytes(data)


def decode_jpeg(data: bytes) -> NDArray[Any]:
    import cv2  # noqa: PLC0415

    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("not a JPEG image")
    result: NDArray[Any] = image
    return result


def finished_episodes(episodes_dir: Path) -> list[Path]:
    """Finished episodes, oldest first (their names start with the UTC start time)."""
    if not episodes_dir.is_dir():
        return []
    return sorted(
        p for p in episodes_dir.iterdir() if p.is_dir() and not p.name.endswith(PARTIAL) and p.name[0] != "."
    )


def info_to_json(info: EpisodeInfo) -> dict[str, Any]:
    return {
        "car": info.car,
        "release": info.release,
        "bundle": info.bundle,
        "cameras": [{"name": c.name, "key": c.key, "shape": list(c.shape)} for c in info.cameras],
        "state_names": list(info.state_names),
        "action_names": list(info.action_names),
    }


def info_from_json(data: dict[str, Any]) -> EpisodeInfo:
    return EpisodeInfo(
        car=str(data["car"]),
        release=data["release"],
        bundle=data["bundle"],
        cameras=tuple(
            CameraSpec(str(c["name"]), str(c["key"]), tuple(int(v) for v in c["shape"]))  # type: ignore[arg-type]
            for c in data["cameras"]
        ),
        state_names=tuple(data["state_names"]),
        action_names=tuple(data["action_names"]),
    )


# --- reading finished episodes (the controller's side: collect, merge, report) -------------------------


class EpisodeError(ValueError):
    """A finished episode that cannot be used; the message names the episode and the problem."""


# What a car may send home: episode.json is a few kB (1 MiB allowed), a step line well under 1 kB.
MAX_EPISODE_JSON_BYTES = 1 << 20
MAX_FRAME_BYTES = 16 << 20


@dataclass(frozen=True)
class Episode:
    path: Path
    meta: dict[str, Any]  # episode.json, checked by open_episode

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def info(self) -> EpisodeInfo:
        return info_from_json(self.meta)

    def steps(self) -> list[dict[str, Any]]:
        """Every step of steps.jsonl, each checked (EpisodeError names the line and what is wrong)."""
        info = self.info
        steps = []
        for number, line in enumerate((self.path / STEPS_FILE).read_bytes().splitlines(), start=1):
            where = f"episode {self.name}: {STEPS_FILE} line {number}"
            try:
                steps.append(_checked_step(parse_json(line, where), info, where))
            except UnsafeFileError as exc:
                raise EpisodeError(str(exc)) from exc
        return steps

    def frame(self, camera: str, entry: Sequence[int]) -> NDArray[Any]:
        """A step's frame (BGR), from its `frames[camera]` entry."""
        offset, length, crc = entry
        with (self.path / (camera + FRAMES_SUFFIX)).open("rb") as stream:
            stream.seek(offset)
            data = stream.read(length)
        if zlib.crc32(data) != crc:
            raise EpisodeError(f"episode {self.name}: frame at {offset} of camera {camera} fails its CRC")
        return decode_jpeg(data)


def open_episode(path: Path, *, verify: bool = True) -> Episode:
    """A finished episode, checked as something a car sent (it may be broken or hostile).

    Refused with EpisodeError: an episode directory that is a symlink; episode.json missing, over 1 MiB,
    not strict JSON, of another format or with a field of the wrong type; a file it lists that leaves the
    episode or passes through a symlink; anything in the directory that is a symlink, not a regular file or
    not listed; and (`verify`) a listed file whose size or sha256 differs. Nothing outside `path` is read.
    """
    where = f"episode {path.name}"
    if path.is_symlink():
        raise EpisodeError(f"{where}: the episode is a symlink (to {path.readlink()}), not a directory")
    if not (path / EPISODE_FILE).exists() and not (path / EPISODE_FILE).is_symlink():
        raise EpisodeError(f"{where}: no {EPISODE_FILE} (not a finished episode)")
    try:
        meta = read_json_file(
            path, EPISODE_FILE, where=where, max_bytes=MAX_EPISODE_JSON_BYTES, kind="episode"
        )
        files = _checked_meta(meta, where)
        paths = {name: listed_path(path, name, where=where, kind="episode") for name in files}
        check_tree(path, {*files, EPISODE_FILE}, where=where, kind="episode", listing=EPISODE_FILE)
    except UnsafeFileError as exc:
        raise EpisodeError(str(exc)) from exc
    if verify:
        for name, (size_recorded, sha256) in files.items():
            target = paths[name]
            if not target.is_file():
                raise EpisodeError(f"{where}: {name} is missing")
            size = target.stat().st_size
            if size != size_recorded:
                raise EpisodeError(f"{where}: {name} has {size} bytes, {size_recorded} recorded")
            if sha256_file(target) != sha256:
                raise EpisodeError(f"{where}: {name} does not match its sha256 (corrupt)")
    return Episode(path, meta)


def _checked_meta(meta: Any, where: str) -> dict[str, tuple[int, str]]:
    """The files episode.json lists (name -> bytes, sha256), after checking every field the controller
    reads; raises UnsafeFileError naming the fields that are wrong."""
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UnsafeFileError(f"{where}: format {found!r}, this tool reads {FORMAT_VERSION}")
    try:
        info = info_from_json(meta)
        steps, fps = meta["steps"], meta["fps"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsafeFileError(f"{where}: {EPISODE_FILE} lacks {exc}") from exc
    modes, takeovers = meta.get("modes", {}), meta.get("takeovers", [])
    checks = {
        "steps": _is_int(steps) and steps >= 0,
        "fps": _is_number(fps) and 0 < fps <= 1000,
        "car": isinstance(meta["car"], str),
        "release": meta["release"] is None or isinstance(meta["release"], str),
        "bundle": meta["bundle"] is None or isinstance(meta["bundle"], str),
        "cameras": all(_FILE_NAME.fullmatch(c.name) for c in info.cameras),
        "modes": isinstance(modes, dict) and all(_is_int(v) for v in modes.values()),
        "takeovers": isinstance(takeovers, list) and all(_is_pair(t) for t in takeovers),
        "fault_steps": _is_int(meta.get("fault_steps", 0)),
        "files": isinstance(meta.get("files"), dict),
    }
    problems = [key for key, ok in checks.items() if not ok]
    if problems:
        raise UnsafeFileError(f"{where}: {EPISODE_FILE} has a bad {', '.join(problems)}")
    files: dict[str, tuple[int, str]] = {}
    for name, entry in meta["files"].items():
        if not (
            isinstance(entry, dict)
            and _is_int(entry.get("bytes"))
            and entry["bytes"] >= 0
            and isinstance(entry.get("sha256"), str)
        ):
            raise UnsafeFileError(f"{where}: {EPISODE_FILE} lists {name!r} without its bytes and sha256")
        files[name] = (entry["bytes"], entry["sha256"])
    return files


_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_pair(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(map(_is_int, value))


def _numbers_or_none(value: Any, length: int) -> bool:
    return value is None or (isinstance(value, list) and len(value) == length and all(map(_is_number, value)))


def _checked_step(line: Any, info: EpisodeInfo, where: str) -> dict[str, Any]:
    """One step line, if every field the controller reads has its type (and its vectors their lengths)."""
    if not isinstance(line, dict):
        raise UnsafeFileError(f"{where}: not a JSON object")
    frames = line.get("frames")
    checks = {
        "i": _is_int(line.get("i")),
        "wall": _is_number(line.get("wall")),
        "driver": isinstance(line.get("driver"), bool),
        "state": _numbers_or_none(line.get("state"), len(info.state_names)),
        "applied": _numbers_or_none(line.get("applied"), len(info.action_names)),
        "latency_ms": line.get("latency_ms") is None or _is_number(line["latency_ms"]),
        "temp_c": line.get("temp_c") is None or _is_number(line["temp_c"]),
        "frames": isinstance(frames, dict)
        and all(frames.get(c.name) is None or _frame_entry(frames[c.name]) for c in info.cameras),
    }
    problems = [key for key, ok in checks.items() if not ok]
    if problems:
        raise UnsafeFileError(f"{where}: bad {', '.join(problems)}")
    return line


def _frame_entry(entry: Any) -> bool:
    """[offset, length, crc32] of a frame in its camera's file."""
    return (
        isinstance(entry, list)
        and len(entry) == 3
        and all(map(_is_int, entry))
        and entry[0] >= 0
        and 0 < entry[1] <= MAX_FRAME_BYTES
        and 0 <= entry[2] < 1 << 32
    )
