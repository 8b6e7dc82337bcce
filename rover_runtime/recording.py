"""The car's black box: drives recorded as episodes on the car's disk, written by a thread beside the loop.

This module is the recorder thread: the loop queues steps and never waits; the thread writes them as
episodes (`episode_writer`, which also recovers what a crash left), numbers the episodes and keeps the
budget. The on-disk format and its reader (the controller's side) are in `episode_format`.

Budget: finished episodes take at most `max_bytes`; the oldest are deleted first, and also while the
filesystem has less than `min_free_bytes` free. When even that cannot keep `min_free_bytes` free, or a write
fails (a full disk, a dead card), the recorder stops recording and says why in its status; the loop never
waits for it and driving goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rover_runtime.episode_format import (
    EPISODES,
    PARTIAL,
    SEQUENCE_FILE,
    EpisodeInfo,
    StepRecord,
    finished_episodes,
)
from rover_runtime.episode_writer import EpisodeWriter, recover_episode
from rover_runtime.safe_files import tree_bytes
from rover_runtime.threads import lower_this_thread

log = logging.getLogger(__name__)

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
    episodes_on_disk: int = 0  # finished episodes on disk now (not collected yet)
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
        self._episode: EpisodeWriter | None = None
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
        self._episode = EpisodeWriter(
            self.episodes_dir / f"{name}{PARTIAL}",
            info,
            fps=self.settings.fps,
            jpeg_quality=self.settings.jpeg_quality,
            temperature=self._temperature,
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
        kept = len(finished)
        for path in finished:  # oldest first
            over_budget = total > self.settings.max_bytes
            low_space = self._free_bytes(self.settings.directory) < self.settings.min_free_bytes
            if not (over_budget or low_space):
                break
            shutil.rmtree(path, ignore_errors=True)
            total -= sizes[path]
            kept -= 1
            with self._lock:
                self.stats.episodes_deleted += 1
            log.warning("recorder: deleted the oldest episode %s (budget)", path.name)
        with self._lock:
            self.stats.bytes_finished = total
            self.stats.episodes_on_disk = kept

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
