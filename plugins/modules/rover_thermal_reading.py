#!/usr/bin/python
"""Module rover.fleet.rover_thermal_reading: the car's temperature and throttle state, judged."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.rover.fleet.plugins.module_utils.thermal_reading import (  # type: ignore[import-untyped]
    SettingError,
    reading,
)

DOCUMENTATION = r"""
module: rover_thermal_reading
short_description: Read the car's SoC temperature and throttle state
description:
  - C(vcgencmd measure_temp) and C(get_throttled) (Raspberry Pi OS), else the sysfs thermal zone
    (millidegrees), judged against O(limit) and O(warn). The same code is the local fact
    /etc/ansible/facts.d/rover_thermal.fact (plugins/module_utils/thermal_reading.py).
  - Read-only; runs in check mode too. A car whose temperature cannot be read is not a failure of the module
    (RV(status) is C(error), with RV(error)); the role decides.
options:
  source:
    description: Where the reading comes from.
    type: str
    default: auto
    choices: [auto, vcgencmd, sysfs]
  vcgencmd:
    description: The vcgencmd command (a name on PATH or an absolute path).
    type: str
    default: vcgencmd
  sysfs:
    description: The sysfs file with the SoC temperature in millidegrees Celsius.
    type: path
    default: /sys/class/thermal/thermal_zone0/temp
  limit:
    description: Above this (°C) the status is C(over).
    type: float
    default: 80.0
  warn:
    description: At or above this (°C) the status is C(warn).
    type: float
    default: 70.0
author: Rover fleet team
"""

EXAMPLES = r"""
- name: Read the temperature and throttle state
  rover.fleet.rover_thermal_reading:
    limit: 80
    warn: 70
  register: thermal   # thermal.status, thermal.temp_c, thermal.throttled
"""

RETURN = r"""
status:
  description: C(ok), C(warn), C(over), or C(error) when no temperature could be read.
  type: str
  returned: always
temp_c:
  description: The SoC temperature (°C).
  type: float
  returned: when read
throttled:
  description: vcgencmd get_throttled's mask (C(0x...)), or C(unknown).
  type: str
  returned: when read
source:
  description: C(vcgencmd) or C(sysfs), what the reading came from.
  type: str
  returned: when read
error:
  description: Why no temperature could be read.
  type: str
  returned: when status is error
"""


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "source": {"type": "str", "default": "auto", "choices": ["auto", "vcgencmd", "sysfs"]},
            "vcgencmd": {"type": "str", "default": "vcgencmd"},
            "sysfs": {"type": "path", "default": "/sys/class/thermal/thermal_zone0/temp"},
            "limit": {"type": "float", "default": 80.0},
            "warn": {"type": "float", "default": 70.0},
        },
        supports_check_mode=True,
    )
    params = module.params
    try:
        result = reading(
            params["source"], params["vcgencmd"], params["sysfs"], params["limit"], params["warn"]
        )
    except SettingError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=False, **result)


if __name__ == "__main__":
    main()
