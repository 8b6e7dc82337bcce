#!/usr/bin/python3
"""The car's SoC temperature and throttle state: `vcgencmd measure_temp` / `get_throttled` (Raspberry Pi OS),
else the sysfs thermal zone (millidegrees), judged against a limit and a warning level.

Two uses, one file (standard library only, the car's system Python):
- the module rover.fleet.rover_thermal_reading (role rover_thermal) calls `reading()` with the role's
  settings: read-only, so it runs in check mode and on a car with nothing installed;
- installed as the Ansible local fact /etc/ansible/facts.d/rover_thermal.fact, it prints the reading as one
  JSON object each time facts are gathered (ansible_facts['ansible_local']['rover_thermal']). Its settings
  come from /etc/rover/thermal.conf (KEY=VALUE lines, shell-quoted; read as data, never run), then from
  KEY=VALUE arguments: source=auto|vcgencmd|sysfs vcgencmd=COMMAND sysfs=PATH limit=DEG_C warn=DEG_C.
  Exit 0 with a reading, 1 when no temperature can be read, 2 on a bad setting (with {"status": "error"}).
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

CONF = Path("/etc/rover/thermal.conf")
DEFAULTS = {
    "source": "auto",
    "vcgencmd": "vcgencmd",
    "sysfs": "/sys/class/thermal/thermal_zone0/temp",
    "limit": "80",
    "warn": "70",
}
SOURCES = ("auto", "vcgencmd", "sysfs")
COMMAND_TIMEOUT_S = 5.0


class SettingError(ValueError):
    """A setting that is not one of DEFAULTS, or not a number where one is needed."""


def settings(conf: Path, arguments: list[str]) -> dict[str, str]:
    """DEFAULTS, then the conf file's KEY=VALUE words (a missing file is none), then `arguments`."""
    try:
        words = shlex.split(conf.read_text(encoding="utf-8"), comments=True)
    except FileNotFoundError:
        words = []
    except (OSError, ValueError) as exc:
        raise SettingError(f"{conf}: {exc}") from exc
    values = dict(DEFAULTS)
    for word in [*words, *arguments]:
        key, sep, value = word.partition("=")
        if not sep or key not in DEFAULTS:
            raise SettingError(f"unknown setting {word!r}")
        values[key] = value
    return values


def _vcgencmd(command: str, what: str) -> str:
    try:
        done = subprocess.run(
            [command, what], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def reading(source: str, vcgencmd: str, sysfs: str, limit: float, warn: float) -> dict[str, Any]:
    """{"status": ok|warn|over, "temp_c", "throttled", "source", "limit_c", "warn_c"}, or {"status": "error",
    "error": ...} when no temperature can be read."""
    if source not in SOURCES:
        raise SettingError(f"source={source!r}: one of {', '.join(SOURCES)}")
    temp: float | None = None
    throttled = ""
    used = ""
    if source != "sysfs" and shutil.which(vcgencmd):
        found = re.search(r"^temp=([-0-9.]+)", _vcgencmd(vcgencmd, "measure_temp"), re.MULTILINE)
        if found:
            temp, used = float(found[1]), "vcgencmd"
            flags = re.search(
                r"^throttled=(0x[0-9a-fA-F]+)", _vcgencmd(vcgencmd, "get_throttled"), re.MULTILINE
            )
            throttled = flags[1] if flags else ""
    if not used and source != "vcgencmd":
        with contextlib.suppress(OSError, ValueError, IndexError):
            temp, used = round(int(Path(sysfs).read_text(encoding="ascii").split()[0]) / 1000, 1), "sysfs"
    if temp is None:
        return {
            "status": "error",
            "error": f"no temperature: source={source}, {vcgencmd} not found and {sysfs} not readable",
        }
    status = "over" if temp > limit else "warn" if temp >= warn else "ok"
    return {
        "status": status,
        "temp_c": temp,
        "throttled": throttled or "unknown",
        "source": used,
        "limit_c": limit,
        "warn_c": warn,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        values = settings(CONF, sys.argv[1:] if argv is None else argv)
        try:
            limit, warn = float(values["limit"]), float(values["warn"])
        except ValueError as exc:
            raise SettingError(f"limit and warn must be numbers: {exc}") from exc
        result = reading(values["source"], values["vcgencmd"], values["sysfs"], limit, warn)
    except SettingError as exc:
        sys.stdout.write(json.dumps({"status": "error", "error": str(exc)}) + "\n")
        return 2
    sys.stdout.write(json.dumps(result) + "\n")
    return 1 if result["status"] == "error" else 0


if __name__ == "__main__":
    sys.exit(main())
