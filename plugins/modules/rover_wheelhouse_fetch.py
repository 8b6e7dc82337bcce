#!/usr/bin/python
"""Module rover.fleet.rover_wheelhouse_fetch: the car fetches its wheelhouse from the controller over HTTP."""

from __future__ import annotations

from pathlib import Path

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.rover.fleet.plugins.module_utils.wheelhouse_fetch import (  # type: ignore[import-untyped]
    FetchError,
    fetch_explained,
)

DOCUMENTATION = r"""
module: rover_wheelhouse_fetch
short_description: Fetch a wheelhouse from the controller over HTTP, verified file by file
description:
  - Downloads into O(dest) only the files it lacks or holds with another hash, each checked against
    SHA256SUMS before it is renamed into place; SHA256SUMS and requirements.txt must have the sha256 the
    controller computed. A failed check, a server that stops answering or a download cut off half-way leaves
    O(dest) as it was apart from files already verified; SHA256SUMS is written last, so a O(dest) with one is
    complete. Standard library only (plugins/module_utils/wheelhouse_fetch.py).
  - Changes nothing in check mode.
options:
  url:
    description: The controller's wheelhouse URL.
    type: str
    required: true
  dest:
    description: The wheelhouse directory on the car.
    type: path
    required: true
  sums_sha256:
    description: The sha256 of the controller's SHA256SUMS.
    type: str
    required: true
  requirements_sha256:
    description: The sha256 of the controller's requirements.txt.
    type: str
    required: true
  timeout:
    description: Seconds a request may take.
    type: float
    default: 60.0
author: Rover fleet team
"""

EXAMPLES = r"""
- name: Fetch the wheelhouse from the controller over HTTP
  rover.fleet.rover_wheelhouse_fetch:
    url: http://192.0.2.10:8765/bookworm-cp311
    dest: /opt/rover/wheelhouse
    sums_sha256: "{{ wheelhouse.sums_sha256 }}"
    requirements_sha256: "{{ wheelhouse.requirements_sha256 }}"
"""

RETURN = r"""
fetched:
  description: Files downloaded (0 when the car had them all).
  type: int
  returned: success
bytes:
  description: Bytes received.
  type: int
  returned: success
"""


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "url": {"type": "str", "required": True},
            "dest": {"type": "path", "required": True},
            "sums_sha256": {"type": "str", "required": True},
            "requirements_sha256": {"type": "str", "required": True},
            "timeout": {"type": "float", "default": 60.0},
        },
        supports_check_mode=True,
    )
    params = module.params
    if module.check_mode:
        module.exit_json(changed=False, msg="not fetched in check mode")
    try:
        result = fetch_explained(
            params["url"],
            Path(params["dest"]),
            params["sums_sha256"],
            params["requirements_sha256"],
            params["timeout"],
        )
    except FetchError as exc:
        module.fail_json(msg=str(exc))
    module.exit_json(changed=result["fetched"] > 0, **result)


if __name__ == "__main__":
    main()
