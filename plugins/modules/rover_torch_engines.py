#!/usr/bin/python
"""Module rover.fleet.rover_torch_engines: which torch the car's venv has, and its quantized engines."""

from __future__ import annotations

import sys

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: rover_torch_engines
short_description: Import torch in the Python the module runs on and list its quantized engines
description:
  - Run it on the car's venv (C(ansible_python_interpreter) set to the venv's python for this task) to check
    that torch imports there and which quantized engines it was built with (qnnpack on a Pi, x86 and
    fbgemm on a PC).
  - Changes nothing; runs in check mode too. Fails, naming the interpreter, when torch does not import.
options: {}
author: Rover fleet team
"""

EXAMPLES = r"""
- name: Import torch on the car and list its quantized engines
  rover.fleet.rover_torch_engines:
  vars:
    ansible_python_interpreter: /opt/rover/venv/bin/python
  register: torch_info   # torch_info.version, torch_info.engines
"""

RETURN = r"""
version:
  description: torch.__version__.
  type: str
  returned: success
engines:
  description: torch.backends.quantized.supported_engines.
  type: list
  elements: str
  returned: success
python:
  description: The interpreter that imported it.
  type: str
  returned: always
"""


def main() -> None:
    module = AnsibleModule(argument_spec={}, supports_check_mode=True)
    try:
        import torch  # noqa: PLC0415 - the point of the module: does it import here?
    except ImportError as exc:
        module.fail_json(msg=f"torch does not import in {sys.executable}: {exc}", python=sys.executable)
    module.exit_json(
        changed=False,
        version=str(torch.__version__),
        engines=[str(engine) for engine in torch.backends.quantized.supported_engines],
        python=sys.executable,
    )


if __name__ == "__main__":
    main()
