#!/usr/bin/python
"""Module rover.fleet.rover_release_state: the car's release bookkeeping (module_utils/release_state)."""

from __future__ import annotations

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.rover.fleet.plugins.module_utils.release_state import (  # type: ignore[import-untyped]
    execute,
)

DOCUMENTATION = r"""
module: rover_release_state
short_description: Keep a car's releases, its deploy lock and the active release
description:
  - Runs one command of the release bookkeeping on the car (plugins/module_utils/release_state.py, the same
    code the runtime's unit runs before each start as C(release_state.py boot-check)) and returns its result
    as the module's result.
  - Every file is written atomically and fsynced; C(current) is switched by renaming a symlink over it.
  - Read-only commands (C(status), C(rollback-target)) run in check mode; the others change nothing in check
    mode and say so.
options:
  command:
    description: What to do.
    type: str
    required: true
    choices: [status, lock, unlock, publish, switch, mark, rollback-target, prune]
  root:
    description: The release root on the car.
    type: path
    default: /opt/rover
  run:
    description: This run's id (C(lock), C(unlock), C(prune)).
    type: str
  owner:
    description: Who runs it, for the lock's refusal sentence (C(lock)).
    type: str
  stale_after:
    description: Seconds after which a lock (or a staging directory, for C(prune)) is stale.
    type: float
  break_lock:
    description: Take the lock even when it is fresh (C(lock)).
    type: bool
    default: false
  pid:
    description: A process on the car that holds the lock while it runs (C(lock); the pull agent).
    type: int
  controller:
    description: The run's ansible-playbook process, C(<host>:<pid>:<start>) (C(lock)).
    type: str
    default: ""
  take_over:
    description: Take the lock of this run, whose process ended (C(lock)).
    type: str
    default: ""
  src:
    description: The staging directory to publish, relative to O(root) (C(publish)).
    type: str
  dest:
    description: Where it is published, relative to O(root) (C(publish)).
    type: str
  release:
    description: The release id (C(switch), C(mark)); for C(rollback-target), an id or a unique prefix of one.
    type: str
  leaving:
    description: >-
      For C(rollback-target) without O(release): the release being left, one that failed its gate; the
      target is the newest good release other than it (default: other than the active one, which the unit's
      boot check may already have moved off a release marked bad).
    type: str
  state:
    description: The health gate's verdict (C(mark)).
    type: str
    choices: [good, bad]
  reason:
    description: Why (C(mark)).
    type: str
    default: ""
  keep:
    description: How many releases to keep (C(prune)); the active one is always kept.
    type: int
  metrics:
    description: Also read the runtime's metrics file (C(status)).
    type: path
  engines_fact:
    description: Also read the venv's engines, a JSON fact file (C(status)).
    type: path
author: Rover fleet team
"""

EXAMPLES = r"""
- name: Switch current to the release
  rover.fleet.rover_release_state:
    command: switch
    release: 5e93c1d2
  register: switched   # switched.previous, switched.current

- name: Take the car's deploy lock
  rover.fleet.rover_release_state:
    command: lock
    run: "{{ run_id }}"
    owner: alice@laptop
    stale_after: 3600
  register: lock       # lock.busy with lock.error and lock.held when another run holds it
"""

RETURN = r"""
busy:
  description: >-
    C(lock) only; true when a run that may still be going holds the lock (then RV(error), RV(held)).
  type: bool
  returned: always
error:
  description: The refusal's sentence (with RV(busy), or when the module fails).
  type: str
  returned: when refused
held:
  description: The lock another run holds.
  type: dict
  returned: when busy
"""

# Each command's options, as release_state.py's arguments (None: a flag without a value).
ARGUMENTS: dict[str, dict[str, str | None]] = {
    "status": {"metrics": "--metrics", "engines_fact": "--engines-fact"},
    "lock": {
        "run": "--run",
        "owner": "--owner",
        "stale_after": "--stale-after",
        "pid": "--pid",
        "controller": "--controller",
        "take_over": "--take-over",
        "break_lock": None,
    },
    "unlock": {"run": "--run"},
    "publish": {"src": "--from", "dest": "--to"},
    "switch": {"release": "--to"},
    "mark": {"release": "--id", "state": "--state", "reason": "--reason"},
    "rollback-target": {"release": "--to", "leaving": "--leaving"},
    "prune": {"keep": "--keep", "run": "--run", "stale_after": "--stale-after"},
}
READ_ONLY = ("status", "rollback-target")


def command_line(params: dict[str, object]) -> list[str]:
    """release_state.py's arguments for the module's parameters."""
    command = str(params["command"])
    argv = ["--root", str(params["root"]), command]
    for name, flag in ARGUMENTS[command].items():
        value = params.get(name)
        if flag is None:
            if value:
                argv.append("--break")
        elif value is not None and value != "":
            argv += [flag, str(value)]
    return argv


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "command": {"type": "str", "required": True, "choices": list(ARGUMENTS)},
            "root": {"type": "path", "default": "/opt/rover"},
            "run": {"type": "str"},
            "owner": {"type": "str"},
            "stale_after": {"type": "float"},
            "break_lock": {"type": "bool", "default": False},
            "pid": {"type": "int"},
            "controller": {"type": "str", "default": ""},
            "take_over": {"type": "str", "default": ""},
            "src": {"type": "str"},
            "dest": {"type": "str"},
            "release": {"type": "str"},
            "leaving": {"type": "str"},
            "state": {"type": "str", "choices": ["good", "bad"]},
            "reason": {"type": "str", "default": ""},
            "keep": {"type": "int"},
            "metrics": {"type": "path"},
            "engines_fact": {"type": "path"},
        },
        mutually_exclusive=[("release", "leaving")],
        required_if=[
            ("command", "lock", ("run", "owner", "stale_after")),
            ("command", "unlock", ("run",)),
            ("command", "publish", ("src", "dest")),
            ("command", "switch", ("release",)),
            ("command", "mark", ("release", "state")),
            ("command", "prune", ("keep", "run", "stale_after")),
        ],
        supports_check_mode=True,
    )
    command = module.params["command"]
    if module.check_mode and command not in READ_ONLY:
        module.exit_json(changed=False, msg=f"{command}: not run in check mode")
    code, result = execute(command_line(module.params))
    if code == 0:
        module.exit_json(**{"busy": False, "changed": False, **result})
    if code == 3:
        module.exit_json(changed=False, busy=True, **result)
    module.fail_json(msg=result["error"], **result)


if __name__ == "__main__":
    main()
