#!/usr/bin/python
"""Module rover.fleet.rover_process: a long-running program kept as a managed process where there is no
systemd (a development machine, CI): started in its own session with its output in a log file, its pid in a
pid file (with the kernel's start time, so a recycled pid is never taken for it), checked ready, stopped."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: rover_process
short_description: Keep a program running as a managed process (pid file, log file), or stop it
description:
  - For hosts without systemd. C(state=started) starts I(argv) in its own session, output appended to
    I(log_file), and writes I(pid_file) (JSON - pid, the kernel's start time of that pid, argv). A process
    already running with the same argv is left alone; one with other argv is stopped and started again.
  - Before a start, I(listen) (host:port) must be free - another program on it is named in the failure,
    never mistaken for this one. I(ready_url), when given, must answer HTTP 200 within I(ready_timeout)
    seconds, else the process is stopped and the failure carries the end of its log.
  - C(state=stopped) sends SIGTERM to the process group, then SIGKILL after I(stop_timeout) seconds, and
    removes the pid file. C(state=reloaded) sends SIGHUP to the process (Prometheus rereads its configuration
    and rules); nothing when it does not run.
options:
  name:
    description: What the process is, for messages.
    type: str
    required: true
  argv:
    description: The command line.
    type: list
    elements: str
  pid_file:
    description: The pid file (JSON).
    type: path
    required: true
  log_file:
    description: Output of the process (appended).
    type: path
  listen:
    description: The host:port the process listens on, checked free before a start.
    type: str
  ready_url:
    description: A URL that answers HTTP 200 once the process is ready.
    type: str
  ready_timeout:
    description: Seconds to wait for I(ready_url).
    type: float
    default: 30
  stop_timeout:
    description: Seconds between SIGTERM and SIGKILL.
    type: float
    default: 10
  state:
    description: Whether the process runs.
    type: str
    choices: [started, stopped, reloaded]
    default: started
author: Rover fleet team
"""

EXAMPLES = r"""
- name: Run Prometheus as a managed process
  rover.fleet.rover_process:
    name: prometheus
    argv: [/usr/bin/prometheus, --config.file=/srv/monitor/prometheus.yml]
    pid_file: /srv/monitor/prometheus.pid
    log_file: /srv/monitor/prometheus.log
    listen: 127.0.0.1:9090
    ready_url: http://127.0.0.1:9090/-/ready
"""

RETURN = r"""
pid:
  description: The process's pid (null when stopped).
  type: int
  returned: always
started:
  description: Whether this run started it.
  type: bool
  returned: always
"""

LOG_TAIL_LINES = 15


def _start_time(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _read_pid_file(path: Path) -> dict[str, Any] | None:
    """The recorded process when it still runs (same pid and start time), else None."""
    try:
        record = json.loads(path.read_text())
        pid, start = int(record["pid"]), int(record["start_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if _start_time(pid) == start else None


def _write_pid_file(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def _port_taken(listen: str) -> str | None:
    """Why listen (host:port) cannot be used, or None when it is free."""
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        return f"{listen!r} is not host:port"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"{host}:{port} is in use by another program"
            return f"{host}:{port} cannot be used: {exc.strerror or exc}"
    return None


def _stop(record: dict[str, Any], timeout: float) -> None:
    pid = int(record["pid"])
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _start_time(pid) != int(record["start_time"]):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    for _ in range(50):
        if _start_time(pid) != int(record["start_time"]):
            return
        time.sleep(0.1)


def _log_tail(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        lines = path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    except OSError:
        return ""
    return " | ".join(line.strip() for line in lines if line.strip())


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "argv": {"type": "list", "elements": "str"},
            "pid_file": {"type": "path", "required": True},
            "log_file": {"type": "path"},
            "listen": {"type": "str"},
            "ready_url": {"type": "str"},
            "ready_timeout": {"type": "float", "default": 30.0},
            "stop_timeout": {"type": "float", "default": 10.0},
            "state": {"type": "str", "choices": ["started", "stopped", "reloaded"], "default": "started"},
        },
        required_if=[("state", "started", ("argv", "log_file"))],
        supports_check_mode=True,
    )
    p = module.params
    name: str = p["name"]
    pid_file = Path(p["pid_file"])
    running = _read_pid_file(pid_file)

    if p["state"] == "reloaded":
        if running is None:
            module.exit_json(changed=False, pid=None, started=False, msg=f"{name} does not run")
            return
        if not module.check_mode:
            os.kill(int(running["pid"]), signal.SIGHUP)
        module.exit_json(changed=True, pid=int(running["pid"]), started=False, msg=f"{name} reloaded")
        return

    if p["state"] == "stopped":
        if running is None:
            with contextlib.suppress(FileNotFoundError):
                if not module.check_mode:
                    pid_file.unlink()
            module.exit_json(changed=False, pid=None, started=False)
            return
        if not module.check_mode:
            _stop(running, p["stop_timeout"])
            pid_file.unlink(missing_ok=True)
        module.exit_json(changed=True, pid=None, started=False, msg=f"{name} (pid {running['pid']}) stopped")
        return

    argv: list[str] = p["argv"]
    if running is not None and running.get("argv") == argv:
        module.exit_json(changed=False, pid=int(running["pid"]), started=False)
    if module.check_mode:
        module.exit_json(changed=True, pid=None, started=True)
    if running is not None:
        _stop(running, p["stop_timeout"])
    if p["listen"]:
        taken = _port_taken(p["listen"])
        if taken is not None:
            module.fail_json(msg=f"{name} cannot start: {taken}; stop that program or choose another port")
    log_file = Path(p["log_file"])
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as out:
        try:
            child = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as exc:
            module.fail_json(msg=f"{name} cannot start: {argv[0]}: {exc.strerror or exc}")
    start = _start_time(child.pid)
    record = {"pid": child.pid, "start_time": start or 0, "argv": argv}
    _write_pid_file(pid_file, record)
    if p["ready_url"]:
        deadline = time.monotonic() + p["ready_timeout"]
        while not _ready(p["ready_url"]):
            code = child.poll()
            if code is not None or time.monotonic() > deadline:
                if code is None:
                    _stop(record, p["stop_timeout"])
                pid_file.unlink(missing_ok=True)
                why = (
                    f"exited with status {code}"
                    if code is not None
                    else f"was not ready in {p['ready_timeout']:g} s"
                )
                tail = _log_tail(log_file)
                module.fail_json(msg=f"{name} {why} ({p['ready_url']}); the end of {log_file}: {tail}")
            time.sleep(0.2)
    module.exit_json(changed=True, pid=child.pid, started=True, msg=f"{name} started (pid {child.pid})")


if __name__ == "__main__":
    main()
