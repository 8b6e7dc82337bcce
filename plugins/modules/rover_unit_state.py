#!/usr/bin/python
"""Module rover.fleet.rover_unit_state: what a deploy compares the runtime's unit with, read in one go."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: rover_unit_state
short_description: Read the runtime unit's installed state on the car
description:
  - Reads, in one go, what a deploy compares the runtime's unit with - the installed unit file, boot-time
    driver list and release check (sha1, mode, owner, mtime), whether the unit is enabled, when its running
    process started, the systemd version and the rover_python role's local fact (the venv's engines) - and
    what the unit is doing (active state, sub-state, result, main process status, restarts), which a restart
    waits on.
  - A file that does not exist or is not asked for is null, as are a process that is not running and a fact
    file that is missing or unreadable. Changes nothing; runs in check mode too.
options:
  unit:
    description: The service's name, without C(.service).
    type: str
    required: true
  unit_file:
    description: The installed unit file; omitted, not read.
    type: path
  modules_load:
    description: The unit's boot-time driver list (modules-load.d); omitted, not read.
    type: path
  engines_fact:
    description: The rover_python role's local fact file; omitted, not read.
    type: path
  boot_check:
    description: The release check the unit runs before each start; omitted, not read.
    type: path
author: Rover fleet team
"""

EXAMPLES = r"""
- name: Read the unit, its process and what it depends on
  rover.fleet.rover_unit_state:
    unit: rover-runtime
    unit_file: /etc/systemd/system/rover-runtime.service
    modules_load: /etc/modules-load.d/rover-runtime.conf
    engines_fact: /etc/ansible/facts.d/rover_python.fact
    boot_check: /usr/local/lib/rover/release_state.py
  register: unit_state

- name: Wait until the runtime is active
  rover.fleet.rover_unit_state:
    unit: rover-runtime
  register: unit_state
  until: unit_state.active_state == 'active'
  retries: 10
  delay: 2
"""

RETURN = r"""
systemd_version:
  description: The car's systemd version.
  type: int
  returned: always
started:
  description: When the unit's running process started (UNIX time), or null.
  type: float
  returned: always
unit_file_state:
  description: systemd's UnitFileState (enabled, disabled, ...).
  type: str
  returned: always
active_state:
  description: systemd's ActiveState (active, activating, failed, inactive, ...).
  type: str
  returned: always
sub_state:
  description: systemd's SubState (running, auto-restart, dead, ...).
  type: str
  returned: always
result:
  description: systemd's Result for the unit (success, exit-code, signal, watchdog, ...).
  type: str
  returned: always
exec_main_status:
  description: The exit status of the unit's last main process (0 while running or never run).
  type: int
  returned: always
restarts:
  description: How many times systemd restarted the unit (NRestarts).
  type: int
  returned: always
unit_file:
  description: The unit file's sha1, mode, uid, gid and mtime, or null.
  type: dict
  returned: always
modules_load:
  description: The driver list's sha1, mode, uid, gid and mtime, or null.
  type: dict
  returned: always
boot_check:
  description: The release check's sha1, mode, uid, gid and mtime, or null.
  type: dict
  returned: always
engines_fact:
  description: The rover_python fact (the venv's engines), or null.
  type: dict
  returned: always
"""


def file_state(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
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


def read_fact(path: str | None) -> Any:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:  # noqa: PTH123
            return json.load(handle)
    except (OSError, ValueError):
        return None


def systemctl(*args: str) -> str:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, check=True).stdout


def unit_state(params: dict[str, Any]) -> dict[str, Any]:
    version = int(systemctl("--version").splitlines()[0].split()[1])
    shown = dict(
        line.split("=", 1)
        for line in systemctl(
            "show",
            f"{params['unit']}.service",
            "--property=ExecMainStartTimestamp,UnitFileState,ActiveState,SubState,Result,ExecMainStatus,NRestarts",
            "--timestamp=unix",
        ).splitlines()
        if "=" in line
    )
    started = shown.get("ExecMainStartTimestamp", "").lstrip("@")
    return {
        "systemd_version": version,
        "started": float(started) if started else None,
        "unit_file_state": shown.get("UnitFileState", ""),
        "active_state": shown.get("ActiveState", ""),
        "sub_state": shown.get("SubState", ""),
        "result": shown.get("Result", ""),
        "exec_main_status": int(shown.get("ExecMainStatus") or 0),
        "restarts": int(shown.get("NRestarts") or 0),
        "unit_file": file_state(params["unit_file"]),
        "modules_load": file_state(params["modules_load"]),
        "boot_check": file_state(params["boot_check"]),
        "engines_fact": read_fact(params["engines_fact"]),
    }


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "unit": {"type": "str", "required": True},
            "unit_file": {"type": "path"},
            "modules_load": {"type": "path"},
            "engines_fact": {"type": "path"},
            "boot_check": {"type": "path"},
        },
        supports_check_mode=True,
    )
    try:
        state = unit_state(module.params)
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as exc:
        module.fail_json(msg=f"cannot read the unit's state: {exc}")
    module.exit_json(changed=False, **state)


if __name__ == "__main__":
    main()
