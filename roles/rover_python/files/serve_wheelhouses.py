#!/usr/bin/env python3
"""Serve the controller's wheelhouses to the cars over HTTP for one provisioning run.

Started in the background by the rover_python role (tasks_from: serve) with the controller's Python:
serves ``--root`` read-only (GET/HEAD), writes ``{"port": N, "pid": P, "run_pid": R}`` to
``--ready-file`` once it listens, and stops when it is told to (SIGTERM, at the end of the run) or after
``--idle-exit`` seconds without a request, or ``--first-request-exit`` seconds without any request at all
(the first request can come long after the start, once the slowest car's earlier roles are done), or
within a second of the process ``--run-pid`` ending (the run's ansible-playbook: a run interrupted by
Ctrl-C never reaches the task that stops the server, which would otherwise keep serving until its idle
limit). Nothing it serves is trusted by the cars as such: each car checks SHA256SUMS and requirements.txt
against the hashes the controller computed, and every wheel against SHA256SUMS (module
rover_wheelhouse_fetch).

    serve_wheelhouses.py --root DIR --bind ADDRESS --port N --ready-file FILE --idle-exit SECONDS
                         [--first-request-exit SECONDS] [--run-pid PID]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class Handler(SimpleHTTPRequestHandler):
    """Files only (no directory listings), no log lines; every request counts as activity."""

    def __init__(self, *args: Any, activity: list[float], **kwargs: Any) -> None:
        self.activity = activity
        super().__init__(*args, **kwargs)

    def send_head(self) -> Any:
        self.activity[0] = time.monotonic()
        self.activity[1] = 1.0  # a request came
        if self.path.endswith("/"):
            self.send_error(404, "no directory listings")
            return None
        return super().send_head()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def write_ready(path: Path, data: dict[str, int | None]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)
    Path(tmp).replace(path)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(
    root: Path,
    bind: str,
    port: int,
    ready_file: Path,
    *,
    idle_exit: float,
    first_request_exit: float,
    run_pid: int | None = None,
) -> None:
    activity = [time.monotonic(), 0.0]  # the last request's time; 1.0 once any request came
    handler = functools.partial(Handler, directory=str(root), activity=activity)
    server = ThreadingHTTPServer((bind, port), handler)
    server.daemon_threads = True

    def stop(*_: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    def watch() -> None:
        while time.monotonic() - activity[0] < (idle_exit if activity[1] else first_request_exit):
            if run_pid is not None and not process_alive(run_pid):
                break
            time.sleep(min(1.0, idle_exit, first_request_exit))
        stop()

    signal.signal(signal.SIGTERM, stop)
    threading.Thread(target=watch, daemon=True).start()
    write_ready(ready_file, {"port": server.server_address[1], "pid": os.getpid(), "run_pid": run_pid})
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        ready_file.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serve_wheelhouses.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--bind", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", type=Path, required=True)
    parser.add_argument("--idle-exit", type=float, default=600.0)
    parser.add_argument("--first-request-exit", type=float, default=3600.0)
    parser.add_argument(
        "--run-pid", type=int, help="stop when this process (the run's ansible-playbook) ends"
    )
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        sys.stderr.write(f"serve_wheelhouses: {args.root} is not a directory\n")
        return 1
    if args.run_pid is not None and (args.run_pid <= 1 or not process_alive(args.run_pid)):
        sys.stderr.write(f"serve_wheelhouses: --run-pid {args.run_pid} is not a running process\n")
        return 1
    try:
        serve(
            args.root,
            args.bind,
            args.port,
            args.ready_file,
            idle_exit=args.idle_exit,
            first_request_exit=args.first_request_exit,
            run_pid=args.run_pid,
        )
    except OSError as exc:
        sys.stderr.write(f"serve_wheelhouses: cannot serve on {args.bind}:{args.port}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
