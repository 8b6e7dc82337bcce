#!/usr/bin/python
"""Module rover.fleet.rover_runtime_check: `rover-runtime check` of a release as the service user, its
report read from the result file the check writes (never from its output)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: rover_runtime_check
short_description: Run a release's rover-runtime check as the service user and return its report
description:
  - Runs O(runtime) C(check) (the bundle loads, one inference within O(deadline_ms), the SoC below
    O(max_temp_c)) as O(user) with that user's groups, as the service itself would, and reads the report from
    the result file the check writes (C(--output)) into a private directory in C(/tmp) (whatever C(TMPDIR)
    says: the caller's may be closed to that user) removed afterwards.
  - Fails when a check fails, its message naming each failed check in the runtime's words
    (C(rover-runtime check failed: bundle: ...; inference: ...)), or when the check cannot run (its exit
    status and error output). The report is returned either way.
  - Changes nothing; runs in check mode too. Needs root (become) to run as another user.
options:
  runtime:
    description: The release's C(rover-runtime) program.
    type: path
    required: true
  config:
    description: The release's runtime configuration (TOML).
    type: path
    required: true
  user:
    description: The user the check runs as (the service's), with its groups.
    type: str
    required: true
  deadline_ms:
    description: One inference must finish within this many milliseconds.
    type: float
    required: true
  max_temp_c:
    description: The SoC must be below this temperature (degrees Celsius).
    type: float
    required: true
  serial:
    description: Also test the serial device (off while the running service holds it).
    type: bool
    default: false
  timeout_s:
    description: Seconds the check may take before it is stopped and fails.
    type: float
    default: 900
author: Rover fleet team
"""

EXAMPLES = r"""
- name: Check the active release as the service user
  rover.fleet.rover_runtime_check:
    runtime: /opt/rover/current/bin/rover-runtime
    config: /opt/rover/current/runtime.toml
    user: rover
    deadline_ms: 500
    max_temp_c: 80
  become: true
  register: check   # check.ok, check.failures, check.report.checks.inference.latency_ms
"""

RETURN = r"""
ok:
  description: Every check passed.
  type: bool
  returned: always
failures:
  description: Each failed check as C(name: error).
  type: list
  elements: str
  returned: always
report:
  description: The check's JSON report (C(checks), C(hostname), C(architecture)); empty when it did not run.
  type: dict
  returned: always
rc:
  description: The check's exit status (0 passed, 1 a check failed, 2 bad configuration or bundle).
  type: int
  returned: always
stderr:
  description: The check's error output (its last 4000 characters).
  type: str
  returned: always
"""


SHARED_TMP = "/tmp"  # a private mkdtemp directory in it is handed to the service user


def failures_of(report: dict[str, Any]) -> list[str]:
    """`name: error` for each check that did not pass, in the report's order."""
    checks = report.get("checks", {})
    return [
        f"{name}: {check.get('error', 'failed')}"
        for name, check in checks.items()
        if not (isinstance(check, dict) and check.get("ok") is True)
    ]


def run_as(entry: pwd.struct_passwd, argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run `argv` as the user `entry` (its uid, gid and supplementary groups, HOME=/tmp, in /): exit status,
    stderr."""
    groups = os.getgrouplist(entry.pw_name, entry.pw_gid)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
    done = subprocess.run(
        argv,
        user=entry.pw_uid,
        group=entry.pw_gid,
        extra_groups=groups,
        env=env,
        cwd="/",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return done.returncode, done.stderr[-4000:]


def run_check(params: dict[str, Any]) -> dict[str, Any]:
    """The check as the service user, its report read from its result file in a private directory (removed
    after). Raises CheckError when it cannot run at all."""
    user = params["user"]
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise CheckError(f"no user {user!r} on this car") from None
    for what in ("runtime", "config"):
        if not Path(params[what]).is_file():
            raise CheckError(f"{what} {params[what]} does not exist")
    # In /tmp, not $TMPDIR: the caller's temporary directory may be closed to the service user (the pull
    # agent's is in its own 0700 state directory); this one is private to it (0700, its owner).
    work = Path(tempfile.mkdtemp(prefix="rover-check.", dir=SHARED_TMP))
    try:
        os.chown(work, entry.pw_uid, entry.pw_gid)
        result = work / "check.json"
        argv = [
            params["runtime"], "check", "--config", params["config"],
            "--deadline-ms", f"{params['deadline_ms']:g}", "--max-temp-c", f"{params['max_temp_c']:g}",
            "--output", str(result), *([] if params["serial"] else ["--skip-serial"]),
        ]  # fmt: skip
        try:
            rc, stderr = run_as(entry, argv, params["timeout_s"])
        except subprocess.TimeoutExpired:
            raise CheckError(f"rover-runtime check did not finish within {params['timeout_s']:g} s") from None
        except OSError as exc:  # not executable by the user (a release it cannot read), not a program
            raise CheckError(f"rover-runtime check could not start as {user}: {exc}") from None
        try:
            report = json.loads(result.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            report = {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    failures = failures_of(report)
    ok = rc == 0 and report.get("ok") is True and not failures
    return {"ok": ok, "failures": failures, "report": report, "rc": rc, "stderr": stderr}


class CheckError(Exception):
    """The check could not run (no such user or file, not executable, too slow)."""


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "runtime": {"type": "path", "required": True},
            "config": {"type": "path", "required": True},
            "user": {"type": "str", "required": True},
            "deadline_ms": {"type": "float", "required": True},
            "max_temp_c": {"type": "float", "required": True},
            "serial": {"type": "bool", "default": False},
            "timeout_s": {"type": "float", "default": 900},
        },
        supports_check_mode=True,
    )
    try:
        out = run_check(module.params)
    except CheckError as exc:
        module.fail_json(msg=str(exc), ok=False, failures=[], report={}, rc=-1, stderr="")
    if out["ok"]:
        module.exit_json(changed=False, **out)
    if out["failures"]:
        module.fail_json(msg="rover-runtime check failed: " + "; ".join(out["failures"]), **out)
    stderr = out["stderr"].strip()
    last = stderr.splitlines()[-1] if stderr else "no report written"
    module.fail_json(msg=f"rover-runtime check could not run (exit {out['rc']}): {last}", **out)


if __name__ == "__main__":
    main()
