"""Background processes the fleet starts (nspawn, socat, firmware simulator) and how they are stopped.

Each runs in its own session (so its whole process group can be signalled) with output to a log file.
A process is identified by pid plus its start time, so a recycled pid is never signalled by mistake.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Proc:
    """A started process: pid and the kernel's start time for it (field 22 of /proc/PID/stat)."""

    pid: int
    start_time: int
    what: str


def _stat(pid: int) -> tuple[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


def spawn(cmd: list[str], log_file: Path, what: str, cwd: Path | None = None) -> Proc:
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        child = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )
    stat = _stat(child.pid)
    start_time = stat[1] if stat else 0
    log.debug("started %s (pid %d): %s", what, child.pid, " ".join(cmd))
    return Proc(pid=child.pid, start_time=start_time, what=what)


def _reap(pid: int) -> None:
    # Only our own children can be reaped; the CLI's children are re-parented when it exits.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_alive(proc: Proc) -> bool:
    _reap(proc.pid)
    stat = _stat(proc.pid)
    return stat is not None and stat[1] == proc.start_time and stat[0] not in ("Z", "X")


def send_sigterm(proc: Proc) -> None:
    """SIGTERM to a live process (a native nspawn powers its container off on it)."""
    if is_alive(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)


def stop_all(procs: list[Proc], grace_seconds: float, *, sigterm: bool = True) -> list[Proc]:
    """Stops processes together: SIGTERM each (unless `sigterm` is False because they were already asked
    to stop), wait up to `grace_seconds` for all, then SIGKILL the process group of any still running.
    Returns the ones that had to be killed."""
    alive = [p for p in procs if is_alive(p)]
    if sigterm:
        for proc in alive:
            send_sigterm(proc)
    deadline = time.monotonic() + grace_seconds
    while time.monotonic() < deadline and any(is_alive(p) for p in alive):
        time.sleep(0.2)
    killed = [p for p in alive if is_alive(p)]
    for proc in killed:
        log.warning("%s (pid %d) did not stop within %.0f s: SIGKILL", proc.what, proc.pid, grace_seconds)
    kill_now(killed)
    for proc in alive:
        _kill_group(proc.pid)  # also whatever the leader left in its group
    return killed


def child_processes(pid: int) -> list[Proc]:
    """The live children of `pid` (for systemd-nspawn: the container's init, in its own session)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(Proc(pid=int(entry.name), start_time=int(fields[19]), what=f"child of {pid}"))
    return found


def _descendants(pid: int) -> list[Proc]:
    result = []
    todo = [pid]
    while todo:
        for child in child_processes(todo.pop()):
            result.append(child)
            todo.append(child.pid)
    return result


def kill_now(procs: list[Proc]) -> None:
    """SIGKILL each live process, its process group and all its descendants, and wait (up to 10 s) until
    they are gone. Descendants matter: killing systemd-nspawn does not end the container, whose init
    lives on (re-parented) unless it is killed too (which ends every process of the container)."""
    alive = [p for p in procs if is_alive(p)]
    for proc in alive:
        tree = _descendants(proc.pid)
        _kill_group(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        for child in tree:
            if is_alive(child):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(is_alive(p) for p in alive):
        time.sleep(0.1)


def _kill_group(pgid: int) -> None:
    # Whatever is left in the process group (the leader's helpers) goes too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    _reap(pgid)
