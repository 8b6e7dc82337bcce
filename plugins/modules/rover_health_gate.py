#!/usr/bin/python
"""Module rover.fleet.rover_health_gate: the deploy's health gate on the car (module_utils/health_gate)."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.rover.fleet.plugins.module_utils.health_gate import (  # type: ignore[import-untyped]
    ArgumentError,
    parse_args,
    run_gate,
)

DOCUMENTATION = r"""
module: rover_health_gate
short_description: Judge the running release by its metrics and its unit over a soak period
description:
  - Waits up to O(timeout_s) for the runtime's unit to be active and one metrics sample to pass every
    condition (ready, healthy, no failsafe, the loop at its rate, the expected release and bundle, fresh
    firmware replies), then requires every sample of O(soak_s) to pass with no restart of the unit.
  - Never imports the release's code (it judges a release whose code may be broken); standard library only
    (plugins/module_utils/health_gate.py).
  - Fails with the reason in the runtime's own words (failsafe reasons, camera or serial faults, the unit's
    state and its last journal lines); the report is the result either way.
  - Changes nothing; runs in check mode too.
options:
  metrics:
    description: The runtime's metrics file.
    type: path
    required: true
  unit:
    description: The runtime's systemd unit, for example C(rover-runtime.service).
    type: str
    required: true
  expect_release:
    description: The release id the metrics must report.
    type: str
    required: true
  expect_bundle:
    description: The bundle's content hash the metrics must report; empty for any.
    type: str
    default: ""
  timeout_s:
    description: Seconds allowed to become healthy.
    type: float
    required: true
  soak_s:
    description: Seconds it must then stay healthy.
    type: float
    required: true
  interval_s:
    description: Seconds between samples.
    type: float
    default: 1.0
  min_rate_ratio:
    description: The achieved loop rate over the soak as a share of the target rate.
    type: float
    default: 0.9
  max_reply_age_s:
    description: The oldest the firmware's last valid reply may be.
    type: float
    default: 2.0
  serial:
    description: Judge the serial link to the firmware.
    type: bool
    default: true
  journal_since:
    description:
      - When the unit was (re)started, in the car's local time as a command result's C(start) gives it
        (C(2026-12-07 18:25:01.123456)). The runtime's faults are read from its journal since then.
      - Empty reads them since 5 s before the gate began.
    type: str
    default: ""
author: Rover fleet team
"""

EXAMPLES = r"""
- name: Watch the running release for the soak period
  rover.fleet.rover_health_gate:
    metrics: /run/rover/metrics.json
    unit: rover-runtime.service
    expect_release: 5e93c1d2
    timeout_s: 60
    soak_s: 20
  register: gate   # gate.summary.rate_hz, gate.reason when it failed
"""

RETURN = r"""
ok:
  description: Whether the release passed.
  type: bool
  returned: always
phase:
  description: C(start) or C(soak), where the gate ended.
  type: str
  returned: always
reason:
  description: Why it failed, in the runtime's own words; empty when it passed.
  type: str
  returned: always
waited_s:
  description: Seconds until the first healthy sample.
  type: float
  returned: always
soak_s:
  description: Seconds of soak judged.
  type: float
  returned: always
samples:
  description: Metrics samples judged.
  type: int
  returned: always
summary:
  description: Loop rate, inference p95, firmware replies and the unit's restarts over the gate.
  type: dict
  returned: always
"""

OPTIONS = {
    "metrics": "--metrics",
    "unit": "--unit",
    "expect_release": "--expect-release",
    "expect_bundle": "--expect-bundle",
    "timeout_s": "--timeout-s",
    "soak_s": "--soak-s",
    "interval_s": "--interval-s",
    "min_rate_ratio": "--min-rate-ratio",
    "max_reply_age_s": "--max-reply-age-s",
    "journal_since": "--journal-since",
}


def command_line(params: dict[str, object]) -> list[str]:
    """health_gate.py's arguments for the module's parameters."""
    argv = [part for name, flag in OPTIONS.items() for part in (flag, str(params[name]))]
    return argv if params["serial"] else [*argv, "--no-serial"]


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "metrics": {"type": "path", "required": True},
            "unit": {"type": "str", "required": True},
            "expect_release": {"type": "str", "required": True},
            "expect_bundle": {"type": "str", "default": ""},
            "timeout_s": {"type": "float", "required": True},
            "soak_s": {"type": "float", "required": True},
            "interval_s": {"type": "float", "default": 1.0},
            "min_rate_ratio": {"type": "float", "default": 0.9},
            "max_reply_age_s": {"type": "float", "default": 2.0},
            "serial": {"type": "bool", "default": True},
            "journal_since": {"type": "str", "default": ""},
        },
        supports_check_mode=True,
    )
    try:
        args = parse_args(command_line(module.params))
    except ArgumentError as exc:
        module.fail_json(msg=f"bad arguments: {exc}", reason=f"bad arguments: {exc}", ok=False)
    report = run_gate(args)
    if report["ok"]:
        module.exit_json(changed=False, **report)
    module.fail_json(msg=f"health gate failed ({report['phase']}): {report['reason']}", **report)


if __name__ == "__main__":
    main()
