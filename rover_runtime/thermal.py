"""Temperature and throttling: `vcgencmd` on a Raspberry Pi, else the kernel's thermal zones, else None."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_TEMP_RE = re.compile(r"temp=([-0-9.]+)")
_THROTTLED_RE = re.compile(r"throttled=(0x[0-9a-fA-F]+)")
# get_throttled bits (Raspberry Pi documentation): current state in the low bits, "has occurred" above.
THROTTLE_FLAGS = {
    0: "under_voltage",
    1: "arm_frequency_capped",
    2: "throttled",
    3: "soft_temperature_limit",
    16: "under_voltage_occurred",
    17: "arm_frequency_capping_occurred",
    18: "throttling_occurred",
    19: "soft_temperature_limit_occurred",
}
THROTTLE_NOW_MASK = 0xF  # bits 0-3: what holds now
THROTTLE_NOW_FLAGS = {bit: name for bit, name in THROTTLE_FLAGS.items() if (1 << bit) & THROTTLE_NOW_MASK}


@dataclass(frozen=True)
class ThermalState:
    temperature_c: float | None
    throttled: int | None  # the raw get_throttled bit mask; None where the host has no vcgencmd
    source: str | None  # "vcgencmd", "sysfs" or None

    @property
    def throttled_now(self) -> bool | None:
        """True while under-voltage, frequency capping or throttling is active (bits 0-3)."""
        return None if self.throttled is None else bool(self.throttled & THROTTLE_NOW_MASK)

    def to_dict(self) -> dict[str, object]:
        flags = None
        if self.throttled is not None:
            flags = [name for bit, name in THROTTLE_FLAGS.items() if self.throttled & (1 << bit)]
        return {
            "temperature_c": self.temperature_c,
            "throttled": None if self.throttled is None else hex(self.throttled),
            "throttled_now": self.throttled_now,
            "throttle_flags": flags,
            "source": self.source,
        }


def _vcgencmd(binary: str, *args: str) -> str | None:
    try:
        result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=2.0, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s %s failed: %s", binary, " ".join(args), exc)
        return None
    return result.stdout if result.returncode == 0 else None


def read_thermal(
    vcgencmd: str | None = "vcgencmd", thermal_root: Path = Path("/sys/class/thermal")
) -> ThermalState:
    """Read the SoC temperature and throttling state, from vcgencmd when present, else sysfs."""
    binary = shutil.which(vcgencmd) if vcgencmd else None
    if binary:
        temp_out = _vcgencmd(binary, "measure_temp")
        throttled_out = _vcgencmd(binary, "get_throttled")
        temp_match = _TEMP_RE.search(temp_out or "")
        throttled_match = _THROTTLED_RE.search(throttled_out or "")
        if temp_match or throttled_match:
            return ThermalState(
                temperature_c=float(temp_match.group(1)) if temp_match else None,
                throttled=int(throttled_match.group(1), 16) if throttled_match else None,
                source="vcgencmd",
            )
    temps = []
    for zone in sorted(thermal_root.glob("thermal_zone*/temp")):
        try:
            temps.append(int(zone.read_text().strip()) / 1000.0)
        except (OSError, ValueError):
            continue
    if temps:
        return ThermalState(temperature_c=max(temps), throttled=None, source="sysfs")
    return ThermalState(temperature_c=None, throttled=None, source=None)
