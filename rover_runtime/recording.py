"""The car's black box: drives recorded as episodes on the car's disk, written by a thread beside the loop.

On disk (`record.directory`):

    episodes/<UTC start>-<car>-<seq>/            a finished episode (never changed again)
        episode.json       written last: what, when, which release, counts, segments, every file's sha256
        steps.jsonl        one JSON line per control step (see `StepRecord`; `temp_c`: the SoC temperature,
                           sampled once a second by the writer)
        <camera>.jpg.bin   the camera's frames at the bundle's resolution, JPEG, back to back; each step
                           line gives its frame's offset, length and CRC-32
    episodes/<...>.partial/                      the episode being written

Power loss: a finished episode was fsynced before its directory was renamed into place, so it is complete or
absent. A `.partial` directory left by a crash is recovered at the next start: its steps are kept up to the
first line that does not parse or whose frame is missing or fails its CRC (the files are truncated there),
and it is finished with `end_reason = "recovered"`; one with too few good steps is deleted. Nothing else on
the disk is touched.

Budget: finished episodes take at most `max_bytes`; the oldest are deleted first, and also while the
filesystem has less than `min_free_bytes` free. When even that cannot keep `min_free_bytes` free, or a write
fails (a full disk, a dead card), the recorder stops recording and says why in its status; the loop never
waits for it and driving goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import socket
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import NDArray

from rover_runtime.bundle import sha256_file
from rover_runtime.metrics import fsync_directory, write_json_atomic
from rover_runtime.safe_files import (
    UnsafeFileError,
    check_tree,
    listed_path,
    parse_json,
    read_json_file,
    tree_bytes,
)
from rover_runtime.threads import lower_this_thread

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EPISODES = "episodes"
PARTIAL = ".partial"
STEPS_FILE = "steps.jsonl"
EPISODE_FILE = "episode.json"
SEQUENCE_FILE = ".sequence"  # the last episode number used
FRAMES_SUFFIX = ".jpg.bin"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class RecorderSettings:
    directory: Path
    max_bytes: int  # finished episodes together take at most this
    min_free_bytes: int  # keep this much free on the filesystem
    episode_max_s: float  # a longer drive is split into episodes of this length
    end_after_s: float  # an episode ends after this long outside a recording mode
    min_steps: int  # a recovered episode with fewer good steps is deleted
    queue_steps: int  # steps waiting for the writer; more are dropped (counted)
    jpeg_quality: int
    fps: float
    nice: int = 0


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


@dataclass
class _Begin:
    info: EpisodeInfo


@dataclass
class _End:
    reason: str


@dataclass
class RecorderStats:
    recording: bool = False
    stopped_reason: str | None = None  # why the recorder stopped for good (disk full, write error)
    episodes_finished: int = 0
    episodes_recovered: int = 0
    episodes_discarded: int = 0
    episodes_deleted: int = 0  # by the budget
    steps_written: int = 0
    steps_dropped: int = 0  # the writer was behind: the loop did not wait
    frames_missing: int = 0  # a camera had no fresh frame at that step
    bytes_finished: int = 0  # on disk now, finished episodes
    current_episode: str | None = None
    last_error: str | None = None


class Recorder:
    """The writer side: a thread that takes steps from a queue and writes episodes."""

    def __init__(
        self,
        settings: RecorderSettings,
        *,
        free_bytes: Callable[[Path], int] | None = None,
        temperature: Callable[[], float | None] | None = None,
    ) -> None:
        self.settings = settings
        self.episodes_dir = settings.directory / EPISODES
        self.stats = RecorderStats()
        self._queue: queue.Queue[_Begin | StepRecord | _End | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._episode: _EpisodeWriter | None = None
        self._free_bytes = free_bytes or _free_bytes
        self._temperature = _Sampled(temperature or _soc_temperature, every_s=1.0)
        self._sequence = 0
        self._waiting = 0  # steps queued, not yet taken by the writer

    # --- the loop's side: never blocks --------------------------------------------------------------

    def begin(self, info: EpisodeInfo) -> None:
        self._queue.put(_Begin(info))

    def record(self, step: StepRecord) -> bool:
        """Queue a step; False (and counted) when the writer is `queue_steps` behind or has stopped."""
        with self._lock:
            if self.stats.stopped_reason is not None or self._waiting >= self.settings.queue_steps:
                self.stats.steps_dropped += 1
                return False
            self._waiting += 1
        self._queue.put(step)
        return True

    def end(self, reason: str) -> None:
        self._queue.put(_End(reason))

    # --- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the open episode and stop the thread (what is queued is written first)."""
        self._queue.put(_End("stopped"))
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.error("recorder: the writer did not finish within %.0f s", timeout_s)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = asdict(self.stats)
            out["queued"] = self._waiting
        out["directory"] = str(self.settings.directory)
        return out

    # --- the writer thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        lower_this_thread(self.settings.nice)
        try:
            self.episodes_dir.mkdir(parents=True, exist_ok=True)
            self._sequence = _next_sequence(self.episodes_dir)
            self._recover_all()
            self._enforce_budget()
        except OSError as exc:
            self._give_up(f"cannot use {self.settings.directory}: {exc.strerror or exc}")
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, StepRecord):
                with self._lock:
                    self._waiting -= 1
            if self.stats.stopped_reason is not None:
                continue  # drain: nothing more is written
            try:
                self._handle(item)
            except Exception as exc:  # the writer must never die silently: it stops and says why
                self._write_failed(exc)

    def _handle(self, item: _Begin | StepRecord | _End) -> None:
        if isinstance(item, _Begin):
            self._finish("superseded")
            self._open(item.info)
        elif isinstance(item, _End):
            self._finish(item.reason)
        elif self._episode is not None:
            missing = self._episode.write(item)
            with self._lock:
                self.stats.steps_written += 1
                self.stats.frames_missing += missing
            if self._episode.steps % max(1, int(self.settings.fps)) == 0:
                self._check_space()
            if self._episode is not None and self._episode.duration_s >= self.settings.episode_max_s:
                info = self._episode.info
                self._finish("max_length")
                self._open(info)

    def _open(self, info: EpisodeInfo) -> None:
        self._check_space()
        if self.stats.stopped_reason is not None:
            return
        self._sequence += 1
        (self.episodes_dir / SEQUENCE_FILE).write_text(f"{self._sequence}\n")
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        name = f"{stamp}-{_SAFE_NAME.sub('_', info.car)}-{self._sequence:06d}"
        self._episode = _EpisodeWriter(
            self.episodes_dir / f"{name}{PARTIAL}", info, self.settings, temperature=self._temperature
        )
        with self._lock:
            self.stats.recording = True
            self.stats.current_episode = name
        log.info("recorder: episode %s started", name)

    def _finish(self, reason: str) -> None:
        episode, self._episode = self._episode, None
        with self._lock:
            self.stats.recording = False
            self.stats.current_episode = None
        if episode is None:
            return
        if episode.steps == 0:
            episode.discard()
            return
        final = episode.finish(reason)
        with self._lock:
            self.stats.episodes_finished += 1
        log.info("recorder: episode %s finished (%d steps, %s)", final.name, episode.steps, reason)
        self._enforce_budget()

    def _check_space(self) -> None:
        """Delete old episodes to keep `min_free_bytes` free; stop recording when that is not enough."""
        free = self._free_bytes(self.settings.directory)
        if free >= self.settings.min_free_bytes:
            return
        self._enforce_budget()
        free = self._free_bytes(self.settings.directory)
        if free < self.settings.min_free_bytes:
            if self._episode is not None:
                self._finish("disk_full")
            self._give_up(
                f"disk full: {free / 1e6:.0f} MB free on {self.settings.directory}, below "
                f"record.min_free_mb ({self.settings.min_free_bytes / 1e6:.0f} MB) with no older episode "
                "left to delete: recording stopped, driving goes on"
            )

    def _enforce_budget(self) -> None:
        finished = finished_episodes(self.episodes_dir)
        sizes = {path: tree_bytes(path) for path in finished}
        total = sum(sizes.values())
        for path in finished:  # oldest first
            over_budget = total > self.settings.max_bytes
            low_space = self._free_bytes(self.settings.directory) < self.settings.min_free_bytes
            if not (over_budget or low_space):
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= sizes[path]
            with self._lock:
                self.stats.episodes_deleted += 1
            log.warning("recorder: deleted the oldest episode %s (budget)", path.name)
        with self._lock:
            self.stats.bytes_finished = total

    def _recover_all(self) -> None:
        for partial in sorted(self.episodes_dir.glob(f"*{PARTIAL}")):
            result = recover_episode(partial, self.settings.min_steps)
            with self._lock:
                if result is None:
                    self.stats.episodes_discarded += 1
                else:
                    self.stats.episodes_recovered += 1

    def _write_failed(self, exc: Exception) -> None:
        episode, self._episode = self._episode, None
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        reason = f"write failed: {detail}"
        if episode is not None:
            episode.close_quietly()
            try:
                recover_episode(episode.path, self.settings.min_steps)  # keep what was fully written
            except OSError:
                log.warning("recorder: %s left for recovery at the next start", episode.path.name)
        self._give_up(f"{reason}: recording stopped, driving goes on")

    def _give_up(self, reason: str) -> None:
        log.error("recorder: %s", reason)
        with self._lock:
            self.stats.stopped_reason = reason
            self.stats.last_error = reason
            self.stats.recording = False
            self.stats.current_episode = None


class _Sampled:
    """A reading taken at most every `every_s` (the SoC temperature: vcgencmd is a process on a Pi)."""

    def __init__(self, read: Callable[[], float | None], every_s: float) -> None:
        self.read, self.every_s = read, every_s
        self._at: float | None = None
        self._value: float | None = None

    def __call__(self) -> float | None:
        now = time.monotonic()
        if self._at is None or now - self._at >= self.every_s:
            self._at = now
            try:
                self._value = self.read()
            except Exception:  # a sensor that fails gives no reading, never a stopped recorder
                log.debug("recorder: temperature reading failed", exc_info=True)
                self._value = None
        return self._value


def _soc_temperature() -> float | None:
    from rover_runtime.thermal import read_thermal  # noqa: PLC0415

    return read_thermal().temperature_c


class _EpisodeWriter:
    def __init__(
        self,
        path: Path,
        info: EpisodeInfo,
        settings: RecorderSettings,
        *,
        temperature: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.path = path
        self.temperature = temperature
        self.info = info
        self.settings = settings
        path.mkdir(parents=True)
        self.started_wall = time.time()
        self.started_monotonic: float | None = None
        self.duration_s = 0.0
        self.steps = 0
        self._files: dict[str, BinaryIO] = {}
        self._hashes: dict[str, Any] = {}
        self._sizes: dict[str, int] = {}
        self._open_file(STEPS_FILE)
        for camera in info.cameras:
            self._open_file(camera.name + FRAMES_SUFFIX)
        self.modes: dict[str, int] = {}
        self.fault_steps = 0
        self._segments = _Segments()
        _write_header(path, info, settings.fps)

    def _open_file(self, name: str) -> None:
        self._files[name] = (self.path / name).open("wb")
        self._hashes[name] = hashlib.sha256()
        self._sizes[name] = 0

    def _append(self, name: str, data: bytes) -> int:
        offset = self._sizes[name]
        self._files[name].write(data)
        self._hashes[name].update(data)
        self._sizes[name] = offset + len(data)
        return offset

    def write(self, record: StepRecord) -> int:
        """Writes the step (frames first, then its line); returns how many cameras had no frame."""
        if self.started_monotonic is None:
            self.started_monotonic = record.monotonic
        frames: dict[str, list[int] | None] = {}
        missing = 0
        for camera in self.info.cameras:
            image = record.images.get(camera.name)
            if image is None:
                frames[camera.name] = None
                missing += 1
                continue
            jpeg = encode_jpeg(image, camera.shape, self.settings.jpeg_quality)
            offset = self._append(camera.name + FRAMES_SUFFIX, jpeg)
            frames[camera.name] = [offset, len(jpeg), zlib.crc32(jpeg)]
        line = {
            "i": self.steps,
            "t": round(record.monotonic - self.started_monotonic, 6),
            "wall": round(record.wall, 6),
            "step": record.step,
            "mode": record.mode,
            "driver": record.driver,
            "state": _floats(record.state),
            "policy_action": _floats(record.policy_action),
            "command": _floats(record.command),
            "applied": _floats(record.applied),
            "faults": list(record.faults),
            "latency_ms": None if record.latency_ms is None else round(record.latency_ms, 3),
            "temp_c": self.temperature(),
            "frames": frames,
        }
        self._append(STEPS_FILE, (json.dumps(line, separators=(",", ":")) + "\n").encode())
        for stream in self._files.values():  # to the kernel at every step: a crash of the process loses
            stream.flush()  # nothing, a power cut what was not yet on the card (recovery keeps the rest)
        self.steps += 1
        self.duration_s = record.monotonic - self.started_monotonic
        mode = record.mode or "unknown"
        self.modes[mode] = self.modes.get(mode, 0) + 1
        self.fault_steps += bool(record.faults)
        self._segments.add(self.steps - 1, record.driver)
        return missing

    def finish(self, reason: str) -> Path:
        for stream in self._files.values():
            stream.flush()
            os.fsync(stream.fileno())
            stream.close()
        files = {n: {"bytes": self._sizes[n], "sha256": h.hexdigest()} for n, h in self._hashes.items()}
        summary = self._summary()
        return _finalize(
            self.path, self.info, self.settings.fps, reason, steps=self.steps, files=files, summary=summary
        )

    def _summary(self) -> dict[str, Any]:
        return {
            "started_at": _iso(self.started_wall),
            "duration_s": round(self.duration_s, 3),
            "modes": self.modes,
            "fault_steps": self.fault_steps,
            "driver_segments": self._segments.driver,
            "takeovers": self._segments.takeovers,
        }

    def discard(self) -> None:
        self.close_quietly()
        shutil.rmtree(self.path, ignore_errors=True)

    def close_quietly(self) -> None:
        for stream in self._files.values():
            with contextlib.suppress(OSError):
                stream.close()


class _Segments:
    """Runs of steps where the driver had the car ([start, end) step indices); a takeover is such a run that
    began right after the Pi was driving (the driver grabbed the transmitter)."""

    def __init__(self) -> None:
        self.driver: list[list[int]] = []
        self.takeovers: list[list[int]] = []
        self._previous: bool | None = None

    def add(self, index: int, driver: bool) -> None:
        if driver and self._previous:
            self.driver[-1][1] = index + 1  # (a takeover is the same list: it grows too)
        elif driver:
            self.driver.append([index, index + 1])
            if self._previous is False:
                self.takeovers.append(self.driver[-1])
        self._previous = driver


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


def recover_episode(partial: Path, min_steps: int) -> Path | None:
    """Finish a `.partial` episode a crash left behind, keeping its good steps; None when it was deleted."""
    header_path = partial / ".header.json"
    try:
        header = json.loads(header_path.read_text())
        info = _info_from_json(header["info"])
        fps = float(header["fps"])
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("recorder: %s has no readable header: deleted", partial.name)
        shutil.rmtree(partial, ignore_errors=True)
        return None
    names = [c.name for c in info.cameras]
    frame_files = {name: partial / (name + FRAMES_SUFFIX) for name in names}
    frame_data = {name: (path.read_bytes() if path.exists() else b"") for name, path in frame_files.items()}
    lines: list[dict[str, Any]] = []
    steps_path = partial / STEPS_FILE
    raw = steps_path.read_bytes() if steps_path.exists() else b""
    for chunk in raw.split(b"\n")[:-1]:  # the last piece has no newline: incomplete
        try:
            line = json.loads(chunk)
        except ValueError:
            break
        if not _frames_intact(line, frame_data) or line.get("i") != len(lines):
            break
        lines.append(line)
    if len(lines) < min_steps:
        log.warning("recorder: %s had %d good steps (< %d): deleted", partial.name, len(lines), min_steps)
        shutil.rmtree(partial, ignore_errors=True)
        return None
    files: dict[str, dict[str, Any]] = {}
    steps_bytes = b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)
    _rewrite(steps_path, steps_bytes)
    files[STEPS_FILE] = {"bytes": len(steps_bytes), "sha256": hashlib.sha256(steps_bytes).hexdigest()}
    for name in names:
        ends = [sum(f[name][:2]) for f in (line["frames"] for line in lines) if f.get(name)]
        kept = frame_data[name][: max(ends, default=0)]
        _rewrite(frame_files[name], kept)
        files[name + FRAMES_SUFFIX] = {"bytes": len(kept), "sha256": hashlib.sha256(kept).hexdigest()}
    segments = _Segments()
    modes: dict[str, int] = {}
    for line in lines:
        segments.add(line["i"], bool(line["driver"]))
        modes[line["mode"] or "unknown"] = modes.get(line["mode"] or "unknown", 0) + 1
    summary = {
        "started_at": _iso(lines[0]["wall"]),
        "duration_s": round(lines[-1]["t"], 3),
        "modes": modes,
        "fault_steps": sum(1 for line in lines if line["faults"]),
        "driver_segments": segments.driver,
        "takeovers": segments.takeovers,
    }
    final = _finalize(partial, info, fps, "recovered", steps=len(lines), files=files, summary=summary)
    log.warning("recorder: recovered %s after a crash (%d good steps)", final.name, len(lines))
    return final


def _frames_intact(line: dict[str, Any], frame_data: dict[str, bytes]) -> bool:
    frames = line.get("frames")
    if not isinstance(frames, dict):
        return False
    for name, data in frame_data.items():
        entry = frames.get(name)
        if entry is None:
            continue
        offset, length, crc = entry
        if offset + length > len(data) or zlib.crc32(data[offset : offset + length]) != crc:
            return False
    return True


def _rewrite(path: Path, data: bytes) -> None:
    with path.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def _write_header(path: Path, info: EpisodeInfo, fps: float) -> None:
    """What recovery needs to finish the episode, written (durably) before any step."""
    write_json_atomic(path / ".header.json", {"info": _info_to_json(info), "fps": fps}, durable=True)
    fsync_directory(path.parent)


def _finalize(
    partial: Path,
    info: EpisodeInfo,
    fps: float,
    reason: str,
    *,
    steps: int,
    files: dict[str, dict[str, Any]],
    summary: dict[str, Any],
) -> Path:
    """episode.json (durable), then the rename that makes the episode finished."""
    final = partial.with_name(partial.name.removesuffix(PARTIAL))
    document = {
        "format": FORMAT_VERSION,
        "episode": final.name,
        "fps": fps,
        "steps": steps,
        "end_reason": reason,
        "finished_at": _iso(time.time()),
        "files": files,
        **_info_to_json(info),
        **summary,
    }
    write_json_atomic(partial / EPISODE_FILE, document, durable=True)
    (partial / ".header.json").unlink(missing_ok=True)
    partial.rename(final)
    fsync_directory(final.parent)
    return final


def _info_to_json(info: EpisodeInfo) -> dict[str, Any]:
    return {
        "car": info.car,
        "release": info.release,
        "bundle": info.bundle,
        "cameras": [{"name": c.name, "key": c.key, "shape": list(c.shape)} for c in info.cameras],
        "state_names": list(info.state_names),
        "action_names": list(info.action_names),
    }


def _info_from_json(data: dict[str, Any]) -> EpisodeInfo:
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


def _floats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [round(float(v), 6) for v in values]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _next_sequence(episodes_dir: Path) -> int:
    """Continue the episode numbering after the highest one on disk or in the counter file (names stay
    unique across restarts, and after collect removed the delivered episodes)."""
    highest = 0
    with contextlib.suppress(OSError, ValueError):
        highest = int((episodes_dir / SEQUENCE_FILE).read_text())
    for path in episodes_dir.iterdir():
        match = re.search(r"-(\d{6})(?:\.partial)?$", path.name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest


def default_car_name() -> str:
    return socket.gethostname()


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
        return _info_from_json(self.meta)

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
        info = _info_from_json(meta)
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
