#!/usr/bin/env python3
"""Read, in one go, what a deploy compares the runtime's unit with: the installed unit file and boot-time
driver list (sha1, mode, owner, mtime), whether the unit is enabled, when its running process started, the
systemd version and the rover_python role's local fact (the venv's inference engines).

Run by the rover_runtime_service role (tasks_from: unit_check) on the car through ansible.builtin.script
with /usr/bin/python3 (3.11 on bookworm, 3.13 on trixie); standard library only; changes nothing. Prints
one JSON object; a file that does not exist is null, as are a process that is not running and a fact file
that is missing or unreadable.

    unit_state.py --unit NAME --unit-file PATH --modules-load PATH --engines-fact PATH --boot-check PATH
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from typing import Any


def file_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:  # noqa: PTH123
            data = handle.read()
            st = os.fstat(handle.fileno())
    except FileNotFoundError:
        return None
    return {
        "sha1": hashlib.sha1(data).hexdigest(),  # the checksum Ansible compares files by
        "mode": f"{st.st_mode & 0o7777:04o}",
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime": st.st_mtime,
    }


def systemctl(*args: str) -> str:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=True).stdout


def read_fact(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:  # noqa: PTH123
            return json.load(handle)
    except (OSError, ValueError):
        return None


def unit_state(
    unit: str, unit_file: str, modules_load: str, engines_fact: str, boot_check: str
) -> dict[str, Any]:
    version = int(systemctl("--version").splitlines()[0].split()[1])
    shown = dict(
        line.split("=", 1)
        for line in systemctl(
            "show", f"{unit}.service", "--property=ExecMainStartTimestamp,UnitFileState", "--timestamp=unix"
        ).splitlines()
        if "=" in line
    )
    started = shown.get("ExecMainStartTimestamp", "").lstrip("@")
    return {
        "systemd_version": version,
        "started": float(started) if started else None,
        "unit_file_state": shown.get("UnitFileState", ""),
        "unit_file": file_state(unit_file),
        "modules_load": file_state(modules_load),
        "boot_check": file_state(boot_check),
        "engines_fact": read_fact(engines_fact),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unit_state.py", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--unit", required=True, help="the service's name, without .service")
    parser.add_argument("--unit-file", required=True)
    parser.add_argument("--modules-load", required=True)
    parser.add_argument("--engines-fact", required=True)
    parser.add_argument(
        "--boot-check", required=True, help="the release check the unit runs before each start"
    )
    args = parser.parse_args(argv)
    try:
        state = unit_state(args.unit, args.unit_file, args.modules_load, args.engines_fact, args.boot_check)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as exc:
        sys.stderr.write(f"unit_state: cannot read the unit's state: {exc}\n")
        return 1
    sys.stdout.write(json.dumps(state, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
