"""Writing one episode (`EpisodeWriter`, run by the recorder thread of `recording`) and recovering one a
crash left behind (`recover_episode`), in the format of `episode_format`.

Power loss: a finished episode was fsynced before its directory was renamed into place, so it is complete or
absent. A `.partial` directory left by a crash is recovered at the next start: its steps are kept up to the
first line that does not parse or whose frame is missing or fails its CRC (the files are truncated there),
and it is finished with `end_reason = "recovered"`; one with too few good steps is deleted. Nothing else on
the disk is touched.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from rover_runtime.episode_format import (
    EPISODE_FILE,
    FORMAT_VERSION,
    FRAMES_SUFFIX,
    PARTIAL,
    STEPS_FILE,
    EpisodeInfo,
    StepRecord,
    encode_jpeg,
    info_from_json,
    info_to_json,
)
from rover_runtime.metrics import fsync_directory, write_json_atomic

log = logging.getLogger(__name__)


class EpisodeWriter:
    """One episode being written in its `.partial` directory: `write` each step, then `finish` (or
    `discard`)."""

    def __init__(
        self,
        path: Path,
        info: EpisodeInfo,
        *,
        fps: float,
        jpeg_quality: int,
        temperature: Callable[[], float | None] = lambda: None,
    ) -> None:
        self.path = path
        self.temperature = temperature
        self.info = info
        self.fps = fps
        self.jpeg_quality = jpeg_quality
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
        _write_header(path, info, fps)

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
            jpeg = encode_jpeg(image, camera.shape, self.jpeg_quality)
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
            self.path, self.info, self.fps, reason, steps=self.steps, files=files, summary=summary
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


def recover_episode(partial: Path, min_steps: int) -> Path | None:
    """Finish a `.partial` episode a crash left behind, keeping its good steps; None when it was deleted."""
    header_path = partial / ".header.json"
    try:
        header = json.loads(header_path.read_text())
        info = info_from_json(header["info"])
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
    write_json_atomic(path / ".header.json", {"info": info_to_json(info), "fps": fps}, durable=True)
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
        **info_to_json(info),
        **summary,
    }
    write_json_atomic(partial / EPISODE_FILE, document, durable=True)
    (partial / ".header.json").unlink(missing_ok=True)
    partial.rename(final)
    fsync_directory(final.parent)
    return final


def _floats(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [round(float(v), 6) for v in values]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
