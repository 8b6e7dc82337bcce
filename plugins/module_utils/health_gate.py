#!/usr/bin/python3
"""The deploy's health gate, run on the car (as root, by the module rover.fleet.rover_health_gate) after a
release switch; also a script (``python3 health_gate.py --help``) for a look by hand.

Standard library only, one file, and it never imports rover_runtime: it judges a release whose code may be
broken. It reads what the running service says about itself: `systemctl show` for the unit and the
runtime's metrics file (docs/runtime.md, "Metrics file").

  health_gate.py --metrics PATH --unit NAME --expect-release ID [--expect-bundle HASH] --timeout-s S
          --soak-s S [--interval-s 1] [--min-rate-ratio 0.9] [--max-reply-age-s 2.0] [--no-serial]
          [--journal-since 'YYYY-MM-DD HH:MM:SS[.ffffff]']

Start phase: every interval until --timeout-s, the unit must be active/running and one metrics sample must
pass every condition. Soak phase: for --soak-s every sample must pass (the first that does not fails the
gate at once), and at the end the unit must be the same invocation (no restart) and the firmware's replies
(serial.replies_ok, unless --no-serial) and the completed inferences must have grown.

Conditions per sample: ready; healthy; failsafe not active; loop.rate_hz_achieved >= ratio/2 x target (and
over the whole soak, loop.cycles per second >= ratio x target);
release.id is the expected release; bundle.content_hash is the expected hash (if given); serial connected
and the last reply from the firmware at most --max-reply-age-s old (unless --no-serial); the metrics file
written within the last 5 s.

`run_gate` returns the report {"ok", "phase", "reason", "waited_s", "soak_s", "samples", "summary"}, the
module's result; the script prints it as one JSON object and exits 0 healthy, 1 not healthy, 2 bad
arguments. The reason is composed from what the runtime and systemd say (failsafe reasons, camera error,
serial state, the unit's state and its last journal lines). The runtime's faults are read from its journal
since --journal-since (the car's local time the unit was restarted, as Ansible's command results give it:
the faults of its first start, before the gate began, count too), else since 5 s before the gate began.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK, EXIT_FAILED, EXIT_BAD_ARGS = 0, 1, 2
FRESH_S = 5.0  # the runtime rewrites the metrics file about once per second
JOURNAL_LINES = 15
FAULT_LINES = 4  # the runtime's most recent distinct faults, in the gate's one-line reason
SAMPLE_RATE_SHARE = 0.5  # a single sample's rate must reach this share of --min-rate-ratio
CRASH_LOOP = 3  # restarts while waiting for the first healthy sample: give up early
COMMAND_TIMEOUT_S = 15.0
UNIT_PROPERTIES = (
    "LoadState",
    "ActiveState",
    "SubState",
    "NRestarts",
    "InvocationID",
    "ExecMainStatus",
    "ExecMainCode",
    "MainPID",
)

_MISSING = object()


@dataclass(frozen=True)
class Expect:
    """What a healthy sample looks like."""

    release: str
    bundle: str = ""  # "" = any bundle
    min_rate_ratio: float = 0.9
    max_reply_age_s: float = 2.0
    serial: bool = True  # False: the serial link is not judged (--no-serial)
    fresh_s: float = FRESH_S


# --- reading the metrics --------------------------------------------------------------------------------


def lookup(data: Any, dotted: str) -> Any:
    """data["a"]["b"] for "a.b", or _MISSING when any level is absent or not an object."""
    value = data
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _missing(key: str) -> str:
    return f"{key} missing from the metrics"


def _not_a_number(key: str, value: Any) -> str:
    return f"{key} is not a number in the metrics: {value!r}"


def read_metrics(path: Path) -> tuple[dict[str, Any] | None, str]:
    """(metrics, "") or (None, why the file cannot be used)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, f"metrics file {path} does not exist (the runtime writes it once its loop runs)"
    except OSError as exc:
        return None, f"metrics file {path} cannot be read: {exc.strerror or exc}"
    try:
        data = json.loads(text)
    except ValueError as exc:
        return None, f"metrics file {path} is not valid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"metrics file {path} is not a JSON object"
    return data, ""


# --- judging one sample ---------------------------------------------------------------------------------


def sample_problems(metrics: dict[str, Any], expect: Expect, now: float) -> list[str]:
    """Everything wrong with one metrics sample, in the runtime's own words; [] when it passes.

    `now` is the wall clock (time.time()) the file's `time_unix` is compared with.
    """
    problems: list[str] = []
    problems += _freshness_problems(metrics, expect, now)
    problems += _state_problems(metrics)
    problems += _rate_problems(metrics, expect)
    problems += _release_problems(metrics, expect)
    if expect.serial:
        problems += _serial_problems(metrics, expect)
    return problems


def _freshness_problems(metrics: dict[str, Any], expect: Expect, now: float) -> list[str]:
    written = lookup(metrics, "time_unix")
    if written is _MISSING:
        return [_missing("time_unix")]
    written_at = _number(written)
    if written_at is None:
        return [_not_a_number("time_unix", written)]
    age = now - written_at
    if age > expect.fresh_s:
        return [f"metrics file is stale: last written {age:.1f}s ago (the runtime rewrites it every second)"]
    if age < -expect.fresh_s:
        return [f"metrics file time_unix is {-age:.1f}s in the future (clock changed?)"]
    return []


def _state_problems(metrics: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    ready = lookup(metrics, "ready")
    if ready is _MISSING:
        problems.append(_missing("ready"))
    elif ready is not True:
        problems.append("not ready: the control loop has not started")
    active = lookup(metrics, "failsafe.active")
    reasons = lookup(metrics, "failsafe.reasons")
    reason_list = [str(r) for r in reasons] if isinstance(reasons, list) else []
    if active is _MISSING:
        problems.append(_missing("failsafe.active"))
    elif active is not False:
        said = "; ".join(reason_list) if reason_list else "no reason given"
        problems.append(f"failsafe active (neutral): {said}")
        problems += _fault_details(metrics, reason_list)
    healthy = lookup(metrics, "healthy")
    if healthy is _MISSING:
        problems.append(_missing("healthy"))
    elif healthy is not True:
        problems.append("unhealthy: neutral for longer than failsafe.unhealthy_after_s")
    return problems


def _fault_details(metrics: dict[str, Any], reasons: list[str]) -> list[str]:
    """What the runtime knows about the failsafe's causes beyond its reasons."""
    details: list[str] = []
    cameras = lookup(metrics, "cameras")
    if not isinstance(cameras, dict):  # a runtime from before several cameras: one "camera" section
        single = lookup(metrics, "camera")
        cameras = {"": single} if isinstance(single, dict) else {}
    for name, camera in sorted(cameras.items()):
        if not isinstance(camera, dict):
            continue
        connected, error = camera.get("connected"), camera.get("last_error")
        label = f"camera {name}" if name else "camera"
        blamed = any(r.startswith(label) for r in reasons) or connected is False
        if blamed and isinstance(error, str) and error:
            details.append(f"{label} error: {error}")
        elif blamed and connected is False:
            details.append(f"{label} not connected")
    errors = _number(lookup(metrics, "inference.errors"))
    if errors and any(r.startswith("inference") for r in reasons):
        details.append(f"inference errors so far: {int(errors)} (the exceptions are in the journal)")
    stalls = _number(lookup(metrics, "inference.stalls"))
    if stalls and any(r.startswith("inference stalled") for r in reasons):
        details.append(f"inference stalls so far: {int(stalls)}")
    return details


def _rate_problems(metrics: dict[str, Any], expect: Expect) -> list[str]:
    achieved_raw = lookup(metrics, "loop.rate_hz_achieved")
    target_raw = lookup(metrics, "loop.rate_hz_target")
    if achieved_raw is _MISSING:
        return [_missing("loop.rate_hz_achieved") + " (measured from the second write on)"]
    if target_raw is _MISSING:
        return [_missing("loop.rate_hz_target")]
    achieved, target = _number(achieved_raw), _number(target_raw)
    if achieved is None:
        return [_not_a_number("loop.rate_hz_achieved", achieved_raw)]
    if target is None:
        return [_not_a_number("loop.rate_hz_target", target_raw)]
    # One sample is one second of the loop: a busy second may dip. Each sample must reach half the ratio; the
    # soak as a whole must reach the ratio itself (soak_problems).
    floor = expect.min_rate_ratio * SAMPLE_RATE_SHARE
    if achieved < floor * target:
        misses = _number(lookup(metrics, "loop.deadline_misses"))
        extra = "" if misses is None else f", {int(misses)} deadline misses"
        return [f"loop at {achieved:g} Hz, below {floor:g} x its target {target:g} Hz{extra}"]
    return []


def average_rate_problems(first: dict[str, Any], last: dict[str, Any], min_rate_ratio: float) -> list[str]:
    """The loop's rate over the whole soak (cycles / seconds between the first and the last sample)."""
    cycles = (_number(lookup(first, "loop.cycles")), _number(lookup(last, "loop.cycles")))
    times = (_number(lookup(first, "time_unix")), _number(lookup(last, "time_unix")))
    target = _number(lookup(last, "loop.rate_hz_target"))
    if None in cycles or None in times or target is None:
        return []  # the per-sample checks name what is missing
    elapsed = times[1] - times[0]  # type: ignore[operator]
    if elapsed <= 0:
        return []
    rate = (cycles[1] - cycles[0]) / elapsed  # type: ignore[operator]
    if rate < min_rate_ratio * target:
        return [f"loop at {rate:.1f} Hz over the soak, below {min_rate_ratio:g} x its target {target:g} Hz"]
    return []


def _release_problems(metrics: dict[str, Any], expect: Expect) -> list[str]:
    problems: list[str] = []
    release = lookup(metrics, "release.id")
    if release is _MISSING:
        problems.append(_missing("release.id") + " (a runtime that does not report its release)")
    elif release != expect.release:
        config = lookup(metrics, "release.config")
        running = "no release" if release is None else f"release {release}"
        where = f" (config {config})" if isinstance(config, str) and config else ""
        problems.append(f"running {running}{where}, expected {expect.release}")
    if expect.bundle:
        content_hash = lookup(metrics, "bundle.content_hash")
        if content_hash is _MISSING:
            problems.append(_missing("bundle.content_hash"))
        elif content_hash != expect.bundle:
            problems.append(f"running bundle {content_hash}, expected {expect.bundle}")
    return problems


def _serial_problems(metrics: dict[str, Any], expect: Expect) -> list[str]:
    connected = lookup(metrics, "serial.connected")
    if connected is _MISSING:
        return [_missing("serial.connected")]
    if connected is not True:
        counts = [
            f"{key} {int(value)}"
            for key in ("reconnects", "disconnects", "write_errors")
            if (value := _number(lookup(metrics, f"serial.{key}"))) is not None
        ]
        extra = f" ({', '.join(counts)})" if counts else ""
        return [f"serial: not connected to the firmware{extra}"]
    age_raw = lookup(metrics, "serial.last_rx_age_s")
    if age_raw is _MISSING:
        return [_missing("serial.last_rx_age_s")]
    if age_raw is None:
        replies = _number(lookup(metrics, "serial.replies_ok"))
        garbage = _number(lookup(metrics, "serial.garbage_lines"))
        extra = "" if not garbage else f" ({int(garbage)} garbage lines)"
        if replies:
            extra = f" (replies_ok {int(replies)}){extra}"
        return [f"serial: connected but no valid reply from the firmware yet{extra}"]
    age = _number(age_raw)
    if age is None:
        return [_not_a_number("serial.last_rx_age_s", age_raw)]
    if age > expect.max_reply_age_s:
        return [
            f"serial: last valid reply from the firmware {age:.1f}s ago (max {expect.max_reply_age_s:g}s)"
        ]
    return []


# --- the unit -------------------------------------------------------------------------------------------


def unit_display_name(unit: str) -> str:
    return unit if "." in unit else f"{unit}.service"


def parse_systemctl_show(text: str) -> dict[str, str]:
    state: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            state[key.strip()] = value.strip()
    return state


def unit_problems(state: dict[str, str], unit: str) -> list[str]:
    """[] when the unit is active/running; else its state in systemd's words."""
    name = unit_display_name(unit)
    if "error" in state:
        return [f"unit state unknown: {state['error']}"]
    if state.get("LoadState") == "not-found":
        return [f"{name} is not installed (LoadState not-found)"]
    active, sub = state.get("ActiveState", "?"), state.get("SubState", "?")
    if (active, sub) == ("active", "running"):
        return []
    status = state.get("ExecMainStatus")
    extra = f" (exit status {status})" if status not in (None, "") else ""
    return [f"{name} is {active}/{sub}{extra}"]


def unit_is_down(state: dict[str, str]) -> bool:
    """Known, and not active/running: the journal says why."""
    return "error" not in state and (state.get("ActiveState"), state.get("SubState")) != ("active", "running")


def restart_problems(
    before: dict[str, str], after: dict[str, str], pid_before: Any, pid_after: Any
) -> list[str]:
    """The unit restarted between two observations: another invocation, more restarts, another pid."""
    changes: list[str] = []
    n_before, n_after = before.get("NRestarts"), after.get("NRestarts")
    if n_before != n_after:
        changes.append(f"NRestarts {n_before} -> {n_after}")
    if before.get("InvocationID") != after.get("InvocationID"):
        changes.append("new invocation")
    if pid_before != pid_after:
        changes.append(f"metrics pid {pid_before} -> {pid_after}")
    if not changes:
        return []
    return [f"the unit restarted during the soak ({', '.join(changes)})"]


def stopped_problems(state: dict[str, str], unit: str) -> list[str]:
    """The unit's process ended during the soak (the unit is down, waiting to restart or starting again):
    how it ended. A unit that is activating is being restarted by systemd: waiting out RestartSec
    (auto-restart, where ExecMain* still describe the process that ended), or already starting its next
    process (start-pre, start: a loaded car may take longer than RestartSec between two samples)."""
    if not unit_is_down(state):
        return []
    code, status = state.get("ExecMainCode", ""), state.get("ExecMainStatus", "")
    sub = state.get("SubState")
    restarting = state.get("ActiveState") == "activating"
    if restarting and sub != "auto-restart":
        how = "ended and systemd is starting it again"  # ExecMain* now describe the next process
    elif code in {"2", "3"} and status.isdigit():  # CLD_KILLED, CLD_DUMPED: the status is the signal
        try:
            how = f"was killed by signal {status} ({signal.Signals(int(status)).name})"
        except ValueError:
            how = f"was killed by signal {status}"
    elif status not in {"", "0"}:
        how = f"exited with status {status}"
    else:
        how = "ended"
    verb = "restarted" if restarting else "stopped"
    return [f"the unit {verb} during the soak: its process {how} ({unit_problems(state, unit)[0]})"]


def soak_problems(
    first: dict[str, Any],
    last: dict[str, Any],
    unit_before: dict[str, str],
    unit_after: dict[str, str],
    serial: bool = True,
) -> list[str]:
    """What the soak as a whole must show: the same process, fresh firmware replies, fresh inferences."""
    problems = restart_problems(unit_before, unit_after, lookup(first, "pid"), lookup(last, "pid"))
    counters = [("inference.completed", "no inference completed during the soak")]
    if serial:
        counters.insert(0, ("serial.replies_ok", "serial: no fresh reply from the firmware during the soak"))
    for key, message in counters:
        start, end = lookup(first, key), lookup(last, key)
        if start is _MISSING or end is _MISSING:
            problems.append(_missing(key))
            continue
        start_n, end_n = _number(start), _number(end)
        if start_n is None or end_n is None:
            problems.append(_not_a_number(key, start if start_n is None else end))
        elif end_n <= start_n:
            problems.append(f"{message} ({key} stayed at {int(start_n)})")
    return problems


def summarize(
    first: dict[str, Any] | None, last: dict[str, Any] | None, unit: dict[str, str]
) -> dict[str, Any]:
    def get(data: dict[str, Any] | None, key: str) -> Any:
        value = lookup(data, key) if data is not None else _MISSING
        return None if value is _MISSING else value

    replies_first = _number(get(first, "serial.replies_ok"))
    replies_last = _number(get(last, "serial.replies_ok"))
    delta = None if replies_first is None or replies_last is None else int(replies_last - replies_first)
    nrestarts = unit.get("NRestarts", "")
    return {
        "rate_hz": get(last, "loop.rate_hz_achieved"),
        "inference_p95_ms": get(last, "inference.latency_ms.p95"),
        "replies_ok_delta": delta,
        "nrestarts": int(nrestarts) if nrestarts.isdigit() else None,
        "release": get(last, "release.id"),
        "bundle": get(last, "bundle.content_hash"),
    }


# --- the side effects -----------------------------------------------------------------------------------


def _run(argv: list[str]) -> tuple[int, str, str]:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False, errors="replace"
        )
    except FileNotFoundError:
        return 127, "", f"{argv[0]}: command not found"
    except (OSError, subprocess.SubprocessError) as exc:
        return 126, "", f"{argv[0]}: {exc}"
    return done.returncode, done.stdout, done.stderr


def unit_state(unit: str) -> dict[str, str]:
    """systemctl show's properties, or {"error": why they could not be read}."""
    argv = ["systemctl", "show", unit]
    for prop in UNIT_PROPERTIES:
        argv += ["-p", prop]
    rc, out, err = _run(argv)
    if rc != 0:
        said = (err.strip() or out.strip() or f"exit status {rc}").splitlines()
        return {"error": f"systemctl show {unit}: {said[-1] if said else rc}"}
    state = parse_systemctl_show(out)
    if "ActiveState" not in state:
        return {"error": f"systemctl show {unit}: no ActiveState in its output"}
    return state


# What systemd itself logs about the unit; the runtime's own lines (its refusals, its last errors) say more.
_SYSTEMD_PREFIXES = ("Started ", "Starting ", "Stopped ", "Stopping ", "Scheduled restart job", "Consumed ")


def journal_tail(unit: str, lines: int = JOURNAL_LINES) -> str:
    """The unit's last journal lines, the runtime's own first: systemd's lines about the unit (start, stop,
    exit status) are left out when the runtime said anything, as the reason already gives the unit's state."""
    rc, out, err = _run(["journalctl", "-u", unit, "-n", str(lines * 4), "--no-pager", "-o", "cat"])
    if rc != 0:
        return f"(journalctl: {(err.strip() or f'exit status {rc}').splitlines()[-1]})"
    every = out.rstrip("\n").splitlines()
    own = [
        line
        for line in every
        if not line.startswith(f"{unit_display_name(unit)}:") and not line.startswith(_SYSTEMD_PREFIXES)
    ]
    return "\n".join((own or every)[-lines:])


# The runtime's log lines as journald keeps them (-o cat): "LEVEL logger: message"; its failsafe lines name
# the faults it went neutral for: "failsafe #3: neutral (serial: ... not connected; camera front: ...)".
_LOG_LINE = re.compile(r"^(?P<level>WARNING|ERROR|CRITICAL) [\w.]+: (?P<message>.+)$")
_FAILSAFE = re.compile(r"^failsafe(?: #\d+)?: (?:still )?neutral \((?P<faults>.+)\)$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def runtime_faults(journal_text: str, limit: int = FAULT_LINES) -> list[str]:
    """The runtime's own most recent distinct faults in `journal_text` (journalctl -o cat), oldest first:
    the reasons its failsafe lines give and its error lines. Faults differing only in numbers (a frame's
    age, an attempt count) count once, as their latest wording."""
    found: dict[str, str] = {}
    for line in journal_text.splitlines():
        logged = _LOG_LINE.match(line.strip())
        if logged is None:
            continue
        message = logged.group("message").strip()
        failsafe = _FAILSAFE.match(message)
        if failsafe is not None:
            items = [f.strip() for f in failsafe.group("faults").split("; ")]
        elif logged.group("level") != "WARNING":
            items = [message]
        else:
            continue
        for item in items:
            key = _NUMBER.sub("#", item)
            found.pop(key, None)
            found[key] = item
    return list(found.values())[-limit:]


def journal_faults(unit: str, since: float) -> list[str]:
    """runtime_faults of the unit's journal since the epoch time `since` ([] if it cannot be read). (Not
    filtered by priority: journald files every line the runtime writes to stdout at the stream's.)"""
    argv = ["journalctl", "-u", unit, f"--since=@{math.floor(since)}", "--no-pager", "-o", "cat"]
    rc, out, _ = _run(argv)
    return runtime_faults(out) if rc == 0 else []


@dataclass
class Observation:
    unit: dict[str, str]
    metrics: dict[str, Any] | None
    problems: list[str]


def observe(args: argparse.Namespace, expect: Expect) -> Observation:
    state = unit_state(args.unit)
    metrics, error = read_metrics(args.metrics)
    problems = unit_problems(state, args.unit)
    if metrics is None:
        problems.append(error)
    else:
        problems += sample_problems(metrics, expect, time.time())
    return Observation(state, metrics, problems)


def failure_reason(
    problems: list[str], state: dict[str, str], unit: str, since: float, *, failing: bool = False
) -> str:
    """The problems in one line; when the runtime keeps failing (`failing`: a crash loop, or it never
    became healthy) or is down, with its own last faults since `since` (epoch) from its journal, and when
    it is down, its last journal lines below."""
    reason = "; ".join(problems)
    found = journal_faults(unit, since) if failing or unit_is_down(state) else []
    faults = [f for f in found if f not in reason]  # the metrics' own failsafe reasons are there already
    if faults:
        reason += f"; the runtime's last faults: ({'; '.join(faults)})"
    if unit_is_down(state):
        reason += f"\nlast {JOURNAL_LINES} journal lines of {unit_display_name(unit)}:\n{journal_tail(unit)}"
    return reason


# --- command line ---------------------------------------------------------------------------------------


class ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ArgumentError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="health_gate.py", description="The deploy's health gate on a car.")
    parser.add_argument("--metrics", type=Path, required=True, help="the runtime's metrics file")
    parser.add_argument("--unit", required=True, help="systemd unit, e.g. rover-runtime")
    parser.add_argument("--expect-release", required=True, help="release id the metrics must report")
    parser.add_argument("--expect-bundle", default="", help="bundle.content_hash the metrics must report")
    parser.add_argument("--timeout-s", type=float, required=True, help="time allowed to become healthy")
    parser.add_argument("--soak-s", type=float, required=True, help="time it must then stay healthy")
    parser.add_argument("--interval-s", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--min-rate-ratio", type=float, default=0.9, help="achieved/target loop rate")
    parser.add_argument(
        "--max-reply-age-s", type=float, default=2.0, help="max age of the firmware's last valid reply"
    )
    parser.add_argument("--no-serial", action="store_true", help="do not judge the serial link")
    parser.add_argument(
        "--journal-since",
        default="",
        help="read the runtime's faults from its journal since this local time (when the unit was restarted: "
        "'YYYY-MM-DD HH:MM:SS[.ffffff]'); default 5 s before the gate begins",
    )
    return parser


JOURNAL_SINCE_FORMATS = ("%Y-%m-%d %H:%M:%S.%f", "%Y-%m-%d %H:%M:%S")


def parse_local_time(text: str) -> float:
    """The epoch time of `text`, a local time as Ansible's command results give it ("2026-12-07
    18:25:01.123456"); ValueError naming the expected form otherwise."""
    for form in JOURNAL_SINCE_FORMATS:
        try:
            return datetime.strptime(text.strip(), form).timestamp()
        except ValueError:
            continue
    raise ValueError(f"must be a local time like '2026-12-07 18:25:01.123456', got {text!r}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for name, minimum, strict in (
        ("timeout_s", 0.0, False),
        ("soak_s", 0.0, False),
        ("interval_s", 0.0, True),
        ("min_rate_ratio", 0.0, False),
        ("max_reply_age_s", 0.0, True),
    ):
        value = getattr(args, name)
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            relation = ">" if strict else ">="
            raise ArgumentError(f"--{name.replace('_', '-')} must be {relation} {minimum:g}, got {value:g}")
    if not args.expect_release.strip():
        raise ArgumentError("--expect-release must not be empty")
    args.journal_since_epoch = None
    if args.journal_since.strip():
        try:
            args.journal_since_epoch = parse_local_time(args.journal_since)
        except ValueError as exc:
            raise ArgumentError(f"--journal-since {exc}") from None
    return args


def _report(
    ok: bool,
    phase: str,
    reason: str,
    *,
    waited_s: float,
    soak_s: float,
    samples: int,
    summary: dict[str, Any],
) -> dict[str, Any]:
    return {
        "ok": ok,
        "phase": phase,
        "reason": reason,
        "waited_s": round(waited_s, 1),
        "soak_s": round(soak_s, 1),
        "samples": samples,
        "summary": summary,
    }


def run_gate(args: argparse.Namespace) -> dict[str, Any]:
    """The two phases; the report's `samples` counts every sample judged (start and soak)."""
    expect = Expect(
        release=args.expect_release,
        bundle=args.expect_bundle,
        min_rate_ratio=args.min_rate_ratio,
        max_reply_age_s=args.max_reply_age_s,
        serial=not args.no_serial,
    )
    started = time.monotonic()
    # The runtime's faults are read from its journal since the unit's restart (--journal-since), else since
    # a little before the gate began (the role restarts the unit right before it). Never after the gate began.
    began = time.time()
    since = began - 5.0 if args.journal_since_epoch is None else min(args.journal_since_epoch, began)
    deadline = started + args.timeout_s
    samples = 0
    restarts_at_start: int | None = None
    while True:
        seen = observe(args, expect)
        samples += 1
        if not seen.problems:
            break
        now = time.monotonic()
        restarts = _int(seen.unit.get("NRestarts"))
        if restarts_at_start is None:
            restarts_at_start = restarts
        known = restarts is not None and restarts_at_start is not None
        crashes = restarts - restarts_at_start if known else 0  # type: ignore[operator]
        crash_loop = crashes >= CRASH_LOOP
        if crash_loop:
            seen.problems.insert(0, f"crash loop: {crashes} restarts in {now - started:.0f} s")
        if now >= deadline or crash_loop:
            reason = failure_reason(seen.problems, seen.unit, args.unit, since, failing=True)
            summary = summarize(None, seen.metrics, seen.unit)
            return _report(
                False, "start", reason, waited_s=now - started, soak_s=0.0, samples=samples, summary=summary
            )
        time.sleep(min(args.interval_s, deadline - now))
    waited = time.monotonic() - started

    assert seen.metrics is not None  # a passing sample has metrics
    first, first_unit = seen.metrics, seen.unit
    soak_start = time.monotonic()
    soak_end = soak_start + args.soak_s
    last = seen
    while (now := time.monotonic()) < soak_end:
        time.sleep(min(args.interval_s, soak_end - now))
        last = observe(args, expect)
        samples += 1
        problems = list(last.problems)
        stopped: list[str] = []
        if "error" not in last.unit:
            stopped = stopped_problems(last.unit, args.unit)
            if stopped:  # the cause first: the runtime's process ended during the soak
                problems = stopped + problems
            elif last.metrics is not None:
                problems += restart_problems(first_unit, last.unit, first.get("pid"), last.metrics.get("pid"))
        if problems:
            reason = failure_reason(problems, last.unit, args.unit, since, failing=bool(stopped))
            summary = summarize(first, last.metrics, last.unit)
            soaked = time.monotonic() - soak_start
            return _report(
                False, "soak", reason, waited_s=waited, soak_s=soaked, samples=samples, summary=summary
            )
    soaked = time.monotonic() - soak_start
    assert last.metrics is not None
    problems = (
        soak_problems(first, last.metrics, first_unit, last.unit, serial=expect.serial)
        + average_rate_problems(first, last.metrics, expect.min_rate_ratio)
        if args.soak_s
        else []
    )
    summary = summarize(first, last.metrics, last.unit)
    if problems:
        reason = "; ".join(problems)
        return _report(
            False, "soak", reason, waited_s=waited, soak_s=soaked, samples=samples, summary=summary
        )
    phase = "soak" if args.soak_s else "start"
    return _report(True, phase, "", waited_s=waited, soak_s=soaked, samples=samples, summary=summary)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ArgumentError as exc:
        sys.stderr.write(f"{build_parser().format_usage()}health_gate.py: error: {exc}\n")
        report = _report(
            False,
            "start",
            f"bad arguments: {exc}",
            waited_s=0.0,
            soak_s=0.0,
            samples=0,
            summary=summarize(None, None, {}),
        )
        sys.stdout.write(json.dumps(report) + "\n")
        return EXIT_BAD_ARGS
    report = run_gate(args)
    sys.stdout.write(json.dumps(report) + "\n")
    return EXIT_OK if report["ok"] else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
