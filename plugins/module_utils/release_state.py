#!/usr/bin/env python3
"""Keep the release state of a car: the deploy lock, publishing, `current`, health states and pruning.

Run on the car, as root, by the module ``rover.fleet.rover_release_state`` (plugins/modules: the
`rover_release` role's tasks) on the Python Ansible uses there (3.11 on bookworm, 3.13 on trixie), and as a
script by the runtime's unit before each start (``boot-check``, installed by `rover_runtime_service`).
Standard library only, one file: the module and the script run the same code.

Layout under the root R (``--root``, default /opt/rover)::

    R/bundles/<content_hash>/             verified model bundles (manifest.json + files), shared by releases
    R/bundles/.incoming-<hash>-<run>/     staging of a bundle
    R/releases/<id>/                      one release:
        bundle -> ../../bundles/<hash>    relative symlink to its bundle
        lib/, bin/rover-runtime           runtime code
        runtime.toml                      runtime configuration
        release.json                      written by Ansible, read-only here:
                                          {"id", "bundle", "runtime", "config_sha256", "created_at"}
        status.json                       owned by this script:
                                          {"state", "reason", "activated_at", "activated_boot", "gated_at"}
    R/releases/.incoming-<id>-<run>/      staging of a release
    R/current -> releases/<id>            relative symlink, the active release
    R/.deploy.lock/owner.json             the deploy lock: {"run", "owner", "since", "boot_id", "pid"...}

A release's state: "new" (published, never active), "trial" (switched to, its health gate not passed yet),
"good" (passed), "bad" (failed) or "interrupted" (the car booted while it was a trial: a power cut, a
reboot or a hang during its gate). A release without status.json is "new"; one whose release.json is
missing or unreadable is "bad" (reason "release.json unreadable: ...") and is never a rollback target.

`boot-check` runs before the runtime starts (the unit's ExecCondition=): a `current` that is good, or a
trial switched to during this boot (the deploy's own restart), starts; anything else (a trial from an
earlier boot, a new, interrupted or bad release) is set aside: a trial is marked "interrupted", `current`
goes back to the newest good release, and with none the runtime does not start (exit 1: the unit is
skipped, not failed). Pattern of RAUC's mark-good and systemd's boot assessment: only a gated release
drives after a reboot, and the next deploy gates the interrupted one again.

The deploy lock records the boot it was taken in, the run's ansible-playbook process (--controller) and,
for a holder that stays running on the car (the pull agent, --pid), that process: a lock from an earlier
boot or of a process on this car that ended is stale at once; the controller that ran an interrupted run
(Ctrl-C) sees that its process ended and takes its lock over (--take-over RUN).

Every file is written atomically (a temporary
file in the same directory, flushed and fsynced, os.replace, then the directory fsynced), `current` is
switched by renaming a temporary symlink over it. Commands that change something take an flock(2) on R for
their few milliseconds, so two invocations never interleave (the deploy lock itself is the directory).

    release_state.py [--root R] status [--metrics PATH] [--engines-fact PATH]
    release_state.py [--root R] lock --run RUN --owner TEXT --stale-after SECONDS [--pid PID]
                                     [--controller HOST:PID:START] [--take-over RUN] [--break]
    release_state.py [--root R] unlock --run RUN
    release_state.py [--root R] publish --from REL_PATH --to REL_PATH
    release_state.py [--root R] switch --to ID
    release_state.py [--root R] mark --id ID --state good|bad [--reason TEXT]
    release_state.py [--root R] rollback-target [--to PREFIX | --leaving ID]
    release_state.py [--root R] prune --keep N --run RUN --stale-after SECONDS
    release_state.py [--root R] boot-check

`execute(argv)` runs one command and returns (code, result); as a script, the result is printed as one
JSON object on stdout. Code 0 on success (commands that can change something report "changed"); 1 on a
refusal or error, with {"error": "<sentence>"} (the sentence on stderr too); 2 on bad arguments; 3 when the
deploy lock is held by a run that may still be going ({"error": ..., "held": <the lock>}: a retry later,
not a failure of the release).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_ROOT = "/opt/rover"
STATES = ("new", "trial", "good", "bad", "interrupted")
BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
STAGING_PREFIX = ".incoming-"
LOCK_DIR = ".deploy.lock"
OWNER_FILE = "owner.json"
BREAK_HINT = "if it was interrupted, pass -e rover_release_break_lock=true"
MUTEX_TIMEOUT_S = 30.0

JSON = dict[str, Any]


class Refusal(Exception):
    """A refusal or an error with a sentence for the operator (exit 1)."""


class UsageError(Exception):
    """Arguments the parser refuses (code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so the module gets the sentence (subparsers are one too)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


class LockBusy(Refusal):
    """The deploy lock is held by a run that may still be going (exit 3; the held lock is printed too)."""

    def __init__(self, message: str, held: JSON) -> None:
        super().__init__(message)
        self.held = held


# ---------------------------------------------------------------------------------------------- helpers


def _utc(ts: float | None) -> str:
    if ts is None:
        return "an unknown time"
    return datetime.datetime.fromtimestamp(ts, tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _opt_number(value: object) -> float | None:
    """``value`` as a float if it is a finite JSON number (not a bool), else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _is_number(value: object) -> bool:
    return _opt_number(value) is not None


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path, os.O_DIRECTORY)


def _fsync_file(path: Path) -> None:
    _fsync(path, os.O_NOFOLLOW)


def write_json_atomic(path: Path, data: JSON) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, os.replace, fsync the dir.

    The car's one durable JSON writer: the pull agent (beside this file on the car) and the rover_recap
    callback use it too."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (0644), atomically and durably: readers see the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.chmod(0o644)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """The file's sha256 (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_json_object(path: Path) -> JSON:
    """The JSON object in ``path``; ValueError/OSError with a short reason otherwise."""
    with path.open(encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object but {type(data).__name__}")
    return data


def boot_id() -> str:
    """This boot's id (the kernel's; systemd-nspawn gives each container start its own); "" if unreadable."""
    try:
        return BOOT_ID_FILE.read_text(encoding="ascii").strip()
    except (OSError, ValueError):
        return ""


def process_start(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat field 22), or None if it is gone.

    A pid and its start time name one process: a pid reused by another process has another start time.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ", comm may hold spaces
    try:
        return int(fields[19])  # field 22 of the whole line: the 20th after the command name
    except (IndexError, ValueError):
        return None


def _lexists(path: Path) -> bool:
    return path.is_symlink() or path.exists()


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path)


def _check_name(kind: str, value: str) -> str:
    """A release id, run id or prefix: one plain path component."""
    if not value or value in {".", ".."} or "/" in value or "\0" in value or value.startswith("."):
        raise Refusal(f"invalid {kind} {value!r}: it must be a plain name without '/' and not start with '.'")
    return value


@contextlib.contextmanager
def _root_mutex(root: Path) -> Iterator[None]:
    """flock(2) on R while one command changes things (released when the command ends)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + MUTEX_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Refusal(
                        f"another release_state.py command has held {root} for more than "
                        f"{MUTEX_TIMEOUT_S:.0f} s; check for a hung process on the car and try again"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- releases


@dataclass
class Release:
    id: str
    path: Path
    state: str
    reason: str
    activated_at: float | None
    gated_at: float | None
    created_at: float | None
    bundle: str | None
    readable: bool
    status_ok: bool
    activated_boot: str = ""

    def summary(self) -> JSON:
        return {
            "id": self.id,
            "state": self.state,
            "reason": self.reason,
            "activated_at": self.activated_at,
            "activated_boot": self.activated_boot,
            "gated_at": self.gated_at,
            "created_at": self.created_at,
            "bundle": self.bundle,
        }


def read_release(path: Path) -> Release:
    """Read releases/<id>: release.json (its identity) and status.json (its state). Never raises."""
    rid = path.name
    created_at: float | None = None
    bundle: str | None = None
    release_error = ""
    try:
        meta = _read_json_object(path / "release.json")
        if not isinstance(meta.get("bundle"), str) or not meta["bundle"]:
            raise ValueError('"bundle" is missing or not a string')
        if not _is_number(meta.get("created_at")):
            raise ValueError('"created_at" is missing or not a number')
        if meta.get("id") != rid:
            raise ValueError(f'"id" is {meta.get("id")!r}, not the directory name {rid!r}')
        created_at = float(meta["created_at"])
        bundle = meta["bundle"]
    except FileNotFoundError:
        release_error = "release.json unreadable: the file is missing"
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        release_error = f"release.json unreadable: {exc}"

    state, reason = "new", ""
    activated_at: float | None = None
    activated_boot = ""
    gated_at: float | None = None
    status_ok = False
    try:
        status = _read_json_object(path / "status.json")
        if status.get("state") not in STATES:
            raise ValueError(f'"state" is {status.get("state")!r}, not one of {", ".join(STATES)}')
        state = status["state"]
        raw_reason = status.get("reason")
        reason = raw_reason if isinstance(raw_reason, str) else ""
        activated_at = _opt_number(status.get("activated_at"))
        gated_at = _opt_number(status.get("gated_at"))
        raw_boot = status.get("activated_boot")
        activated_boot = raw_boot if isinstance(raw_boot, str) else ""
        status_ok = True
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        state, reason = "new", f"status.json unreadable: {exc}; state unknown"

    if release_error:
        state, reason = "bad", release_error
    return Release(
        id=rid,
        path=path,
        state=state,
        reason=reason,
        activated_at=activated_at,
        gated_at=gated_at,
        created_at=created_at,
        bundle=bundle,
        readable=not release_error,
        status_ok=status_ok,
        activated_boot=activated_boot,
    )


def list_releases(root: Path) -> list[Release]:
    rdir = root / "releases"
    if not rdir.is_dir():
        return []
    found = [read_release(p) for p in rdir.iterdir() if not p.name.startswith(".") and p.is_dir()]
    return sorted(found, key=lambda r: r.id)


def list_staging(root: Path) -> list[Path]:
    found: list[Path] = []
    for sub in ("releases", "bundles"):
        d = root / sub
        if d.is_dir():
            found.extend(p for p in d.iterdir() if p.name.startswith(STAGING_PREFIX))
    return sorted(found)


def read_current(root: Path) -> tuple[str | None, bool]:
    """(id `current` points at or None, whether that release directory is missing)."""
    link = root / "current"
    if not link.is_symlink():
        return None, False
    rid = link.readlink().name
    if not rid:
        return None, True
    return rid, not (root / "releases" / rid).is_dir()


def _desc(value: float | None) -> float:
    """Sort key: newest first, None last."""
    return -value if value is not None else math.inf


def _status_order(r: Release) -> tuple[int, float, str]:
    if r.activated_at is not None:
        return (0, -r.activated_at, r.id)
    return (1, _desc(r.created_at), r.id)


def _newest_good(releases: list[Release], current: str | None) -> Release | None:
    good = [r for r in releases if r.state == "good" and r.readable and r.id != current]
    good.sort(key=lambda r: (_desc(r.activated_at), r.id))
    return good[0] if good else None


def _listing(releases: list[Release]) -> str:
    return ", ".join(f"{r.id} ({r.state})" for r in releases) or "none"


def _get_release(root: Path, rid: str, action: str) -> Release:
    _check_name("release id", rid)
    path = root / "releases" / rid
    if not path.is_dir():
        raise Refusal(
            f"release {rid} is not on this car (releases: {_listing(list_releases(root))}); "
            f"publish it before you {action} it"
        )
    release = read_release(path)
    if not release.readable:
        raise Refusal(f"release {rid} cannot be used, its {release.reason}; deploy it again or remove {path}")
    return release


def _write_status(
    release: Release,
    *,
    state: str,
    reason: str,
    activated_at: float | None,
    gated_at: float | None,
    activated_boot: str | None = None,
) -> None:
    """status.json of `release`; `activated_boot` None keeps the release's own."""
    write_json_atomic(
        release.path / "status.json",
        {
            "state": state,
            "reason": reason,
            "activated_at": activated_at,
            "activated_boot": release.activated_boot if activated_boot is None else activated_boot,
            "gated_at": gated_at,
        },
    )


# ---------------------------------------------------------------------------------------------- lock


def read_lock(root: Path) -> JSON | None:
    """The lock owner dict, or None when no lock. An unreadable owner.json gives run/owner None and the
    directory's mtime as "since", plus "error". "boot_id" is "" and "pid" None when the lock has none."""
    ldir = root / LOCK_DIR
    if not ldir.is_dir():
        return None
    try:
        owner = _read_json_object(ldir / OWNER_FILE)
        if not isinstance(owner.get("run"), str) or not isinstance(owner.get("owner"), str):
            raise ValueError('"run" or "owner" is missing or not a string')
        if not _is_number(owner.get("since")):
            raise ValueError('"since" is missing or not a number')
        pid, pid_start = owner.get("pid"), owner.get("pid_start")
        return {
            "run": owner["run"],
            "owner": owner["owner"],
            "since": float(owner["since"]),
            "boot_id": owner["boot_id"] if isinstance(owner.get("boot_id"), str) else "",
            "pid": pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None,
            "pid_start": pid_start if _is_number(pid_start) else None,
            "controller": _process_or_none(owner.get("controller")),
        }
    except FileNotFoundError:
        error = "owner.json is missing"
    except (OSError, ValueError) as exc:
        error = f"owner.json unreadable: {exc}"
    try:
        mtime: float | None = ldir.stat().st_mtime
    except OSError:
        mtime = None
    return {"run": None, "owner": None, "since": mtime, "boot_id": "", "pid": None, "error": error}


@dataclass
class LockRequest:
    """What `lock` is asked for."""

    run: str
    owner: str
    stale_after: float
    brk: bool = False
    # A process on this car that holds the lock for the run (the pull agent): stale once it ends.
    pid: int | None = None
    # The run's ansible-playbook process, "<host>:<pid>:<start ticks>" (recorded; the controller that ran it
    # can tell whether it ended, and when <host> is this car the check is made here).
    controller: str = ""
    # The run whose lock to take over: its controller found that run's process ended (Ctrl-C, a crash).
    take_over: str = ""


def parse_process(text: str) -> JSON:
    """'<host>:<pid>:<start ticks>' as {"host", "pid", "start"}; Refusal if it is not that."""
    host, _, rest = text.rpartition(":")
    host, _, pid = host.rpartition(":")
    if not host or not pid.isdigit() or not rest.isdigit():
        raise Refusal(f"--controller {text!r} is not <host>:<pid>:<start ticks>")
    return {"host": host, "pid": int(pid), "start": int(rest)}


def _process_or_none(value: object) -> JSON | None:
    if (
        isinstance(value, dict)
        and isinstance(value.get("host"), str)
        and isinstance(value.get("pid"), int)
        and isinstance(value.get("start"), int)
    ):
        return {"host": value["host"], "pid": value["pid"], "start": value["start"]}
    return None


def _gone_holder(held: JSON) -> str:
    """Why the holder of `held` cannot be running any more ("" when it may be): the lock was taken in an
    earlier boot, or the process that holds it (on this car) has ended."""
    this_boot = boot_id()
    if held.get("boot_id") and this_boot and held["boot_id"] != this_boot:
        return "it was taken before the car last booted"
    pid = held.get("pid")
    if pid is not None and process_start(pid) != held.get("pid_start"):
        return f"its process {pid} has ended"
    controller = held.get("controller")
    if (
        isinstance(controller, dict)
        and controller.get("host") == socket.gethostname()
        and process_start(controller["pid"]) != controller.get("start")
    ):
        return f"its run's process {controller['pid']} has ended"
    return ""


def cmd_lock(root: Path, request: LockRequest) -> JSON:
    run, pid = request.run, request.pid
    _check_name("run id", run)
    if pid is not None and process_start(pid) is None:
        raise Refusal(f"lock --pid {pid}: no such process on this car; pass the pid of the lock's holder")
    controller = parse_process(request.controller) if request.controller else None
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    ldir = root / LOCK_DIR
    with _root_mutex(root):
        broke: JSON | None = None
        try:
            ldir.mkdir(mode=0o700)
        except FileExistsError:
            held = read_lock(root)
            if held is None:  # not a directory: a stray file in the way
                raise Refusal(f"{ldir} exists but is not a directory; remove it and deploy again") from None
            if held["run"] == run:
                return {"changed": False, "lock": held}
            now = time.time()
            since = held["since"]
            age = now - since if since is not None else math.inf
            gone = _gone_holder(held)
            if request.take_over and held["run"] == request.take_over:
                gone = "its run's process on the controller has ended (an interrupted run)"
            if age < request.stale_after and not request.brk and not gone:
                who = (
                    f"{held['owner']} (run {held['run']})"
                    if held["run"] is not None
                    else f"an unknown owner ({held['error']})"
                )
                raise LockBusy(
                    f"deploy lock held by {who} since {_utc(since)}, {round(age)} s ago: another deploy is "
                    f"running on this car. Wait for it to finish; {BREAK_HINT}",
                    held,
                ) from None
            shutil.rmtree(ldir)
            ldir.mkdir(mode=0o700)
            why = gone or ("--break" if request.brk else f"older than {request.stale_after:g} s")
            broke = {**held, "why": why}
        mine: JSON = {"run": run, "owner": request.owner, "since": time.time(), "boot_id": boot_id()}
        if pid is not None:
            mine.update(pid=pid, pid_start=process_start(pid))
        if controller is not None:
            mine["controller"] = controller
        write_json_atomic(ldir / OWNER_FILE, mine)
        _fsync_dir(root)
        result: JSON = {"changed": True, "lock": mine}
        if broke is not None:  # only on a takeover (Ansible tests `broke is defined`)
            result["broke"] = broke
        return result


def cmd_unlock(root: Path, run: str) -> JSON:
    _check_name("run id", run)
    if not root.is_dir():
        return {"changed": False, "lock": None}
    with _root_mutex(root):
        held = read_lock(root)
        if held is None or held["run"] != run:
            return {"changed": False, "lock": held}
        shutil.rmtree(root / LOCK_DIR)
        _fsync_dir(root)
        return {"changed": True, "lock": None}


# ---------------------------------------------------------------------------------------------- commands


def _read_optional(path: Path | None) -> JSON | None:
    """A JSON object another part writes (the runtime's metrics, the venv's engines fact), or None: not
    asked for, absent, unreadable, torn or not an object. Status only reports it, never fails on it."""
    if path is None:
        return None
    try:
        return _read_json_object(path)
    except (OSError, ValueError):
        return None


def cmd_status(root: Path, metrics: Path | None = None, engines_fact: Path | None = None) -> JSON:
    releases = list_releases(root)
    current, missing = read_current(root)
    target = _newest_good(releases, current)
    return {
        "metrics": _read_optional(metrics),
        "engines_fact": _read_optional(engines_fact),
        "current": current,
        "current_missing": missing,
        "releases": [r.summary() for r in sorted(releases, key=_status_order)],
        "rollback_target": target.id if target else None,
        "staging": [str(p.relative_to(root)) for p in list_staging(root)],
        "lock": read_lock(root),
    }


def _relative(root: Path, arg: str, what: str) -> Path:
    rel = Path(arg)
    if not arg or rel.is_absolute() or ".." in rel.parts or not rel.parts or "\0" in arg:
        raise Refusal(
            f"publish --{what} {arg!r} is not a path relative to {root} without '..'; "
            "pass e.g. releases/.incoming-<id>-<run>"
        )
    return root / rel


def _fsync_tree(top: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(top, topdown=False):
        d = Path(dirpath)
        for name in filenames:
            p = d / name
            if p.is_file() and not p.is_symlink():
                _fsync_file(p)
        _fsync_dir(d)


def cmd_publish(root: Path, src_arg: str, dst_arg: str) -> JSON:
    src = _relative(root, src_arg, "from")
    dst = _relative(root, dst_arg, "to")
    if src == dst:
        raise Refusal(
            f"publish --from and --to are both {src_arg}; pass the staging directory and the target"
        )
    if not root.is_dir():
        raise Refusal(f"{root} does not exist; stage the release there before publishing it")
    with _root_mutex(root):
        if _lexists(dst):
            if _lexists(src):
                _remove(src)
                _fsync_dir(src.parent)
            return {"changed": False, "path": dst_arg}
        if not src.is_dir() or src.is_symlink():
            raise Refusal(f"nothing to publish: {src_arg} is not a directory under {root}; stage it again")
        if not dst.parent.is_dir():
            raise Refusal(f"cannot publish to {dst_arg}: {dst.parent} does not exist")
        _fsync_tree(src)
        try:
            src.rename(dst)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and _lexists(dst):
                _remove(src)
                _fsync_dir(src.parent)
                return {"changed": False, "path": dst_arg}
            raise
        _fsync_dir(dst.parent)
        if src.parent != dst.parent:
            _fsync_dir(src.parent)
        return {"changed": True, "path": dst_arg}


def _activate(release: Release) -> None:
    """Record that `release` became `current` in this boot: a good release stays good (it passed its gate
    before); anything else is a trial until its gate passes (its earlier reason is kept for the record)."""
    good = release.status_ok and release.state == "good"
    _write_status(
        release,
        state="good" if good else "trial",
        reason=release.reason,
        activated_at=time.time(),
        gated_at=release.gated_at if good else None,
        activated_boot=boot_id(),
    )


def cmd_switch(root: Path, rid: str) -> JSON:
    release = _get_release(root, rid, "switch to")
    link = root / "current"
    want = f"releases/{rid}"
    with _root_mutex(root):
        if _lexists(link) and not link.is_symlink():
            raise Refusal(f"{link} is not a symlink; move it away before switching releases")
        previous, _missing = read_current(root)
        release = read_release(release.path)
        if link.is_symlink() and str(link.readlink()) == want:
            # Already current; a release that is not good (an interrupted trial, one marked bad) is about
            # to be restarted and gated again: a trial of this boot, so that boot-check lets it start.
            if release.state != "good" and (release.state != "trial" or release.activated_boot != boot_id()):
                _activate(release)
            return {"changed": False, "previous": previous, "current": rid}
        # The status first: a power cut between the two leaves `current` on the old release (this one merely
        # marked as a trial), never `current` on a release whose status does not say it is on trial.
        _activate(release)
        _replace_current(root, want)
        return {"changed": True, "previous": previous, "current": rid}


def _replace_current(root: Path, want: str) -> None:
    """Point `current` at `want` (releases/<id>) atomically: a temporary symlink renamed over it."""
    tmp = root / f".current-{secrets.token_hex(8)}.tmp"
    tmp.symlink_to(want)
    try:
        tmp.replace(root / "current")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(root)


def cmd_mark(root: Path, rid: str, state: str, reason: str) -> JSON:
    release = _get_release(root, rid, "mark")
    with _root_mutex(root):
        release = read_release(release.path)
        changed = not release.status_ok or release.state != state or release.reason != reason
        now = time.time()
        _write_status(release, state=state, reason=reason, activated_at=release.activated_at, gated_at=now)
        return {"changed": changed, "id": rid, "state": state, "reason": reason, "gated_at": now}


def cmd_rollback_target(root: Path, prefix: str | None, leaving: str | None = None) -> JSON:
    """The release to go back to: `prefix`'s, or the newest good one other than `leaving` (default: the active
    one). A gate that failed names its release as `leaving`: by then the unit's restart may have run
    boot-check, which moves `current` off a release marked bad onto the newest good one, and that one is
    where the rollback goes, not the one before it."""
    releases = list_releases(root)
    current, _missing = read_current(root)
    if prefix is None:
        if leaving is not None:
            _check_name("release id", leaving)
        target = _newest_good(releases, current if leaving is None else leaving)
        if target is None:
            raise Refusal(f"no good release to roll back to (releases: {_listing(releases)})")
        return {"target": target.id, "current": current}
    _check_name("release prefix", prefix)
    matches = [r for r in releases if r.id.startswith(prefix)]
    if not matches:
        raise Refusal(
            f"no release on this car starts with {prefix!r} (releases: {_listing(releases)}); "
            "pass one of these ids or a unique prefix of one"
        )
    if len(matches) > 1:
        raise Refusal(
            f"{prefix!r} matches {len(matches)} releases ({', '.join(r.id for r in matches)}); "
            f"pass a longer prefix (releases: {_listing(releases)})"
        )
    target = matches[0]
    if not target.readable:
        raise Refusal(f"release {target.id} is unusable, its {target.reason}; not rolling back to it")
    if target.state == "bad":
        raise Refusal(
            f"release {target.id} failed its health gate on {_utc(target.gated_at)}: "
            f"{target.reason or 'no reason recorded'}; not rolling back to it"
        )
    return {"target": target.id, "current": current}


def cmd_boot_check(root: Path) -> tuple[JSON, bool]:
    """Whether the runtime may start on `current` (see the module's docstring); (result, start)."""
    this_boot = boot_id()
    if not root.is_dir():
        return {"start": False, "current": None, "reason": f"{root} does not exist: no release"}, False
    with _root_mutex(root):
        releases = list_releases(root)
        current, missing = read_current(root)
        release = next((r for r in releases if r.id == current), None)
        if release is not None and release.readable:
            if release.state == "good":
                return {"start": True, "current": current, "state": "good"}, True
            if release.state == "trial" and this_boot and release.activated_boot == this_boot:
                return {"start": True, "current": current, "state": "trial", "reason": "under its gate"}, True
        if current is None:
            why = "no release is active (no current)"
        elif release is None or missing:
            why = f"current names release {current}, which is not on this car"
        elif not release.readable:
            why = f"release {current} is unusable, its {release.reason}"
        elif release.state in ("new", "trial"):
            when = _utc(release.activated_at)
            why = f"release {current} was on trial (active since {when}) when the car restarted"
            _write_status(
                release,
                state="interrupted",
                reason=f"the car restarted during its trial (active since {when}); set aside at "
                f"{_utc(time.time())}, the next deploy or pull gates it again",
                activated_at=release.activated_at,
                gated_at=None,
            )
        else:
            why = f"release {current} is {release.state}" + (f" ({release.reason})" if release.reason else "")
        target = _newest_good(releases, current)
        if target is None:
            return {"start": False, "current": current, "reason": f"{why}; no good release to start"}, False
        _replace_current(root, f"releases/{target.id}")
        _write_status(
            target,
            state="good",
            reason=target.reason,
            activated_at=time.time(),
            gated_at=target.gated_at,
            activated_boot=this_boot,
        )
        return {
            "start": True,
            "current": target.id,
            "state": "good",
            "set_aside": current,
            "reason": f"{why}; started on release {target.id}, the newest good one",
        }, True


def _rank(releases: list[Release], current: str | None) -> list[Release]:
    cur = [r for r in releases if r.id == current]
    rest = [r for r in releases if r.id != current]
    good = sorted((r for r in rest if r.state == "good"), key=lambda r: (_desc(r.activated_at), r.id))
    new = sorted(
        (r for r in rest if r.state in ("new", "trial", "interrupted")),
        key=lambda r: (_desc(r.created_at), r.id),
    )
    bad = sorted((r for r in rest if r.state == "bad"), key=lambda r: (_desc(r.activated_at), r.id))
    return cur + good + new + bad


def _bundle_refs(path: Path) -> set[str]:
    """Bundle hashes a release (or release staging) dir refers to: release.json and the bundle symlink."""
    refs: set[str] = set()
    with contextlib.suppress(OSError, ValueError):
        bundle = _read_json_object(path / "release.json").get("bundle")
        if isinstance(bundle, str) and bundle:
            refs.add(bundle)
    link = path / "bundle"
    if link.is_symlink():
        refs.add(link.readlink().name)
    return refs


def cmd_prune(root: Path, keep: int, run: str, stale_after: float) -> JSON:
    _check_name("run id", run)
    if not root.is_dir():
        return {"changed": False, "removed": [], "kept": []}
    removed: list[str] = []
    with _root_mutex(root):
        current, _missing = read_current(root)
        ranked = _rank(list_releases(root), current)
        kept, drop = ranked[:keep], ranked[keep:]
        for r in drop:
            _remove(r.path)
            removed.append(f"releases/{r.id}")

        now = time.time()
        staging_left: list[Path] = []
        for p in list_staging(root):
            if p.name.endswith(f"-{run}"):
                staging_left.append(p)
                continue
            try:
                age = now - p.lstat().st_mtime
            except FileNotFoundError:
                continue
            if age > stale_after:
                _remove(p)
                removed.append(str(p.relative_to(root)))
            else:
                staging_left.append(p)

        referenced: set[str] = set()
        for r in kept:
            referenced |= _bundle_refs(r.path)
        for p in staging_left:
            if p.parent.name == "releases":
                referenced |= _bundle_refs(p)
        bdir = root / "bundles"
        if bdir.is_dir():
            for b in sorted(bdir.iterdir()):
                if b.name.startswith(".") or b.name in referenced:
                    continue
                _remove(b)
                removed.append(f"bundles/{b.name}")

        for sub in ("releases", "bundles"):
            if removed and (root / sub).is_dir():
                _fsync_dir(root / sub)
        return {"changed": bool(removed), "removed": removed, "kept": [r.id for r in kept]}


# ---------------------------------------------------------------------------------------------- CLI


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a number of seconds >= 0")
    return value


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 (the current release is always kept)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="release_state.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--root", default=DEFAULT_ROOT, help=f"the release root on the car (default {DEFAULT_ROOT})"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # --root is accepted after the subcommand too (SUPPRESS keeps a value given before it).
    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--root", default=argparse.SUPPRESS, help="the release root on the car")
        return p

    p = add("status", "releases, their states, current, staging and the lock")
    p.add_argument("--metrics", type=Path, default=None, help="also read the runtime's metrics file")
    p.add_argument(
        "--engines-fact", type=Path, default=None, help="also read the venv's engines (a JSON fact)"
    )
    p = add("lock", "take the deploy lock")
    p.add_argument("--run", required=True)
    p.add_argument("--owner", required=True)
    p.add_argument("--stale-after", type=_non_negative, required=True, metavar="SECONDS")
    p.add_argument("--break", dest="brk", action="store_true", help="take the lock even if it is fresh")
    p.add_argument("--pid", type=int, default=None, help="the holder's process (stale once it ends)")
    p.add_argument(
        "--controller", default="", help="the run's ansible-playbook process: <host>:<pid>:<start>"
    )
    p.add_argument("--take-over", default="", help="take the lock of this run (its process ended)")
    p = add("unlock", "release the deploy lock if this run holds it")
    p.add_argument("--run", required=True)
    p = add("publish", "rename a staging directory into place (paths relative to the root)")
    p.add_argument("--from", dest="src", required=True)
    p.add_argument("--to", dest="dst", required=True)
    p = add("switch", "point current at a release")
    p.add_argument("--to", dest="id", required=True)
    p = add("mark", "record a release's health gate result")
    p.add_argument("--id", required=True)
    p.add_argument("--state", choices=("good", "bad"), required=True)
    p.add_argument("--reason", default="")
    p = add("rollback-target", "the release to roll back to")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--to", dest="prefix", default=None, help="a release id or a unique prefix of one")
    which.add_argument(
        "--leaving",
        default=None,
        metavar="ID",
        help="the newest good release other than ID (one that failed its gate; default: the active one)",
    )
    p = add("prune", "remove old releases, stale staging and orphaned bundles")
    p.add_argument("--keep", type=_at_least_one, required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--stale-after", type=_non_negative, required=True, metavar="SECONDS")
    add("boot-check", "may the runtime start on current? (the unit's ExecCondition; exit 1: do not start)")
    return parser


def run_command(args: argparse.Namespace) -> JSON:
    root = Path(os.path.abspath(args.root))  # noqa: PTH100 - no symlink resolution wanted
    command: str = args.command
    if command == "status":
        return cmd_status(root, args.metrics, args.engines_fact)
    if command == "lock":
        request = LockRequest(
            run=args.run,
            owner=args.owner,
            stale_after=args.stale_after,
            brk=args.brk,
            pid=args.pid,
            controller=args.controller,
            take_over=args.take_over,
        )
        return cmd_lock(root, request)
    if command == "unlock":
        return cmd_unlock(root, args.run)
    if command == "publish":
        return cmd_publish(root, args.src, args.dst)
    if command == "switch":
        return cmd_switch(root, args.id)
    if command == "mark":
        return cmd_mark(root, args.id, args.state, args.reason)
    if command == "rollback-target":
        return cmd_rollback_target(root, args.prefix, args.leaving)
    if command == "prune":
        return cmd_prune(root, args.keep, args.run, args.stale_after)
    if command == "boot-check":
        result, start = cmd_boot_check(root)
        if not start:
            raise Refusal(f"the runtime does not start: {result['reason']}")
        return result
    raise Refusal(f"unknown command {command!r}")  # argparse already refuses it


def execute(argv: list[str]) -> tuple[int, JSON]:
    """Run the command `argv` names: (0, its result), or (1|2|3, {"error": ...}) as described above."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        return 2, {"error": f"bad arguments: {exc}"}
    try:
        return 0, run_command(args)
    except LockBusy as exc:
        return 3, {"error": str(exc), "held": exc.held}
    except Refusal as exc:
        return 1, {"error": str(exc)}
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return 1, {
            "error": (
                f"{args.command} failed: {exc.strerror or exc}{where}; check the file system and the "
                "permissions on the car, then run the deploy again"
            )
        }
    except Exception as exc:
        return 1, {"error": f"{args.command} failed unexpectedly: {type(exc).__name__}: {exc}"}


def main(argv: list[str] | None = None) -> int:
    code, result = execute(sys.argv[1:] if argv is None else argv)
    if code == 2:
        build_parser().print_usage(sys.stderr)
    if code:
        sys.stderr.write(f"release_state: {result['error']}\n")
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
