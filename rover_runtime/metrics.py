"""The status file: a JSON snapshot of the running loop, atomically replaced about once per second.

Written from its own thread (file I/O and `vcgencmd` stay out of the control loop) to a temporary file in
the same directory, then renamed over the target, so a reader (playbooks, testinfra, the deploy's "is the
car driving?" gate) never sees a half-written file. Keys are documented in docs/runtime.md.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rover_runtime.prometheus import exposition
from rover_runtime.thermal import read_thermal

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, data: dict[str, Any], *, durable: bool = False) -> None:
    """Replace `path` with `data` as JSON in one rename: readers see the old file or the new one, never a
    part. `durable`: also fsync the file and its directory, so the new file survives a power cut."""
    text = json.dumps(data, indent=1, sort_keys=True, default=str) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"), durable=durable)


def write_bytes_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace `path` with `data` in one rename (0644); `durable` as for write_json_atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MetricsWriter:
    """Calls `snapshot()` every `interval_s`, adds thermal state and the achieved loop rate, writes `path`
    (JSON) and `textfile` (Prometheus exposition, for node_exporter's textfile collector), each when given."""

    def __init__(
        self,
        path: Path | None,
        snapshot: Callable[[], dict[str, Any]],
        interval_s: float = 1.0,
        read_thermal_state: Callable[[], Any] = read_thermal,
        textfile: Path | None = None,
    ) -> None:
        self.path = path
        self.textfile = textfile
        self.snapshot = snapshot
        self.interval_s = interval_s
        self.read_thermal_state = read_thermal_state
        self.writes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: tuple[float, int] | None = None
        self._failed: set[Path] = set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def write_now(self, *, running: bool = True) -> None:
        """One snapshot written; `running` False for the last one, when the runtime stops."""
        data = self.snapshot()
        now = time.monotonic()
        cycles = int(data.get("loop", {}).get("cycles", 0))
        if self._previous is not None and now > self._previous[0]:
            rate = (cycles - self._previous[1]) / (now - self._previous[0])
            data.setdefault("loop", {})["rate_hz_achieved"] = round(rate, 3)
        self._previous = (now, cycles)
        data["thermal"] = self.read_thermal_state().to_dict()
        written = [
            self._write(self.path, lambda target: write_json_atomic(target, data)),
            self._write(
                self.textfile,
                lambda target: write_bytes_atomic(target, exposition(data, running=running).encode("utf-8")),
            ),
        ]
        if any(written):
            self.writes += 1

    def _write(self, target: Path | None, write: Callable[[Path], None]) -> bool:
        """Writes one file; a failure is logged once per file until it succeeds again."""
        if target is None:
            return False
        try:
            write(target)
        except OSError as exc:
            if target not in self._failed:
                log.warning("metrics file %s cannot be written: %s", target, exc)
            self._failed.add(target)
            return False
        self._failed.discard(target)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write_now()
            except Exception:
                log.exception("metrics snapshot failed")

    def close(self, final: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        if final:
            try:
                self.write_now(running=False)
            except Exception:
                log.exception("final metrics snapshot failed")
