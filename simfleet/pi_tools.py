"""Stand-ins for Raspberry Pi-only tools, put only into simulated hosts (never part of the roles).

- /usr/local/bin/vcgencmd answers `measure_temp` and `get_throttled` from THERMAL_FILE, which the
  controller rewrites (`python -m simfleet set-thermal`) to choose what a test sees.
- The same temperature in millidegrees at THERMAL_ZONE_TEMP, a stand-in for the Pi's
  /sys/class/thermal/thermal_zone0/temp (inventory: simfleet_thermal_zone_temp).
- A writable copy of the cpufreq part of sysfs under CPUFREQ_ROOT: a container's /sys is the
  controller's and read-only, so the governor setting is simulated there; the inventory points the
  role's cpufreq path variable at it (simfleet_cpufreq_root).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from rover_runtime.metrics import write_bytes_atomic
from simfleet.errors import SimFleetError

THERMAL_FILE = "/etc/simfleet/thermal"
CPUFREQ_ROOT = "/var/lib/simfleet/sysfs/devices/system/cpu"
# The same reading as a Pi's /sys/class/thermal/thermal_zone0/temp (millidegrees Celsius).
THERMAL_ZONE_TEMP = "/var/lib/simfleet/sysfs/class/thermal/thermal_zone0/temp"
PI5_CPUS = 4
PI5_GOVERNORS = "conservative ondemand userspace powersave performance schedutil"
PI5_DEFAULT_GOVERNOR = "ondemand"

VCGENCMD = f"""#!/bin/sh
# simfleet stand-in for the Raspberry Pi's vcgencmd (simulated hosts only; see docs/simulation.md).
# The controller chooses the readings: python -m simfleet set-thermal --name FLEET HOST --temp T --throttled X
temp=48.3
throttled=0x0
[ -r "{THERMAL_FILE}" ] && . "{THERMAL_FILE}"
case "$1" in
  measure_temp) echo "temp=${{temp}}'C" ;;
  get_throttled) echo "throttled=${{throttled}}" ;;
  measure_clock) echo "frequency(0)=2400000000" ;;
  measure_volts) echo "volt=0.8500V" ;;
  version) echo "simfleet vcgencmd stand-in" ;;
  *) echo "error=2 error_msg=\\"Command not registered\\""; exit 2 ;;
esac
"""

_THROTTLED = re.compile(r"^0x[0-9a-fA-F]{1,8}$")


@dataclass(frozen=True)
class ThermalReading:
    """What vcgencmd reports: temperature in °C and the throttled bit field (e.g. 0x50005)."""

    temp_c: float
    throttled: str = "0x0"

    def __post_init__(self) -> None:
        if not -40.0 <= self.temp_c <= 125.0:
            raise SimFleetError(f"--temp {self.temp_c} is outside -40..125 °C")
        if not _THROTTLED.match(self.throttled):
            raise SimFleetError(f"--throttled {self.throttled!r} is not a hex value like 0x50005")


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def install_pi_tools(root: Path) -> None:
    """Writes the vcgencmd stand-in into a host's root."""
    tool = _inside(root, "/usr/local/bin/vcgencmd")
    tool.parent.mkdir(parents=True, exist_ok=True)
    tool.write_text(VCGENCMD)
    tool.chmod(0o755)


def thermal_files(reading: ThermalReading) -> dict[str, str]:
    """The stand-in files (path in the host: content) that make vcgencmd and the zone report `reading`."""
    return {
        THERMAL_FILE: f"temp={reading.temp_c:.1f}\nthrottled={reading.throttled}\n",
        THERMAL_ZONE_TEMP: f"{round(reading.temp_c * 1000)}\n",
    }


def write_thermal(root: Path, reading: ThermalReading) -> None:
    """Sets what the host's vcgencmd and its thermal-zone stand-in report (each file atomically)."""
    for path, text in thermal_files(reading).items():
        write_bytes_atomic(_inside(root, path), text.encode())


def write_cpufreq(root: Path) -> None:
    """A Pi 5's cpufreq files (4 cores, governor ondemand), writable, for the governor setting."""
    for cpu in range(PI5_CPUS):
        base = _inside(root, f"{CPUFREQ_ROOT}/cpu{cpu}/cpufreq")
        base.mkdir(parents=True, exist_ok=True)
        (base / "scaling_available_governors").write_text(PI5_GOVERNORS + "\n")
        (base / "scaling_governor").write_text(PI5_DEFAULT_GOVERNOR + "\n")
