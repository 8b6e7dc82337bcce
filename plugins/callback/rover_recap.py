"""Ansible callback `rover_recap`: after a deploy, rollback or benchmark run, one line per car saying what
happened to it: done (and what), SKIPPED (and why: a driving car), FAILED (and why), UNREACHABLE, or not
attempted because the rollout stopped before its batch; then one line naming the unreachable cars (switched
off or out of range: run again for them). Ansible's own PLAY RECAP counts tasks; this names cars.

The playbooks record each car's outcome in the fact `rover_deploy_outcome` ("started" first, a final text
when the car is done, "skipped: why" or "locked: why" when another deploy holds the car); a car still at
"started" when the run ends failed or was interrupted. Enabled in ansible.cfg (callbacks_enabled); prints
nothing for playbooks that record no outcome (provisioning).

With ROVER_RESULTS_FILE set, the same per car is also written there as JSON (atomically), for programs:
{"cars": {"<car>": {"status": "ok"|"skipped"|"locked"|"failed"|"unreachable"|"not-attempted",
"message": "<the recap's text>"}}}. The pull agent reads it instead of the printed recap. A failure's
message is the failing step's own sentence: a car-side helper's JSON {"error": ...} line when its output
has one (over ssh its stderr is mixed into stdout), else the task's msg and stderr.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ansible.plugins.callback import CallbackBase
from ansible_collections.rover.fleet.plugins.module_utils.release_state import (  # type: ignore[import-untyped]
    write_json_atomic,
)

DOCUMENTATION = """
    name: rover_recap
    type: aggregate
    short_description: one line per car at the end of a deploy, rollback or benchmark
    description:
      - Names the cars that were done, skipped (with the reason), failed (with the reason) or not attempted.
    requirements:
      - enable in ansible.cfg callbacks_enabled
"""

OUTCOME = "rover_deploy_outcome"
RESULTS_FILE = "ROVER_RESULTS_FILE"
FAILED_MESSAGE_LIMIT = 700


class CallbackModule(CallbackBase):  # type: ignore[misc]
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "rover_recap"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []
        self.outcomes: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        self.unreachable: list[str] = []

    def v2_playbook_on_play_start(self, play: Any) -> None:
        inventory = play.get_variable_manager()._inventory
        # All the play's hosts within --limit, not only the current serial batch.
        for host in inventory.get_hosts(play.hosts, ignore_restrictions=True):
            name = host.get_name()
            if name != "localhost" and name not in self.targets:
                self.targets.append(name)

    def v2_runner_on_ok(self, result: Any) -> None:
        facts = result._result.get("ansible_facts") or {}
        if OUTCOME in facts:
            self.outcomes[result._host.get_name()] = " ".join(str(facts[OUTCOME]).split())

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        if not ignore_errors:
            self.failures[result._host.get_name()] = _message(result._result)

    def v2_runner_on_unreachable(self, result: Any) -> None:
        name = result._host.get_name()
        self.failures[name] = "unreachable: " + _message(result._result)
        self.unreachable.append(name)

    def v2_playbook_on_stats(self, stats: Any) -> None:
        if not self.outcomes:
            return
        self._display.banner("ROVER RECAP")
        results: dict[str, dict[str, str]] = {}
        for name in self.targets:
            status, message = self._result(name)
            results[name] = {"status": status, "message": message}
            label = {"ok": "ok", "not-attempted": "not attempted"}.get(status, status.upper())
            self._display.display(f"{name}: {label}: {message}")
        path = os.environ.get(RESULTS_FILE)
        if path:
            write_json_atomic(Path(path), {"cars": results})
        missing = [name for name in self.targets if name in self.unreachable]
        if missing:
            names = ", ".join(missing)
            count = f"{len(missing)}/{len(self.targets)}"
            self._display.display(f"unreachable ({count}), not changed, run again for them: {names}")

    def _result(self, name: str) -> tuple[str, str]:
        """(status, message) of one car."""
        outcome = self.outcomes.get(name)
        if name in self.unreachable:
            return "unreachable", self.failures[name].removeprefix("unreachable: ")[:FAILED_MESSAGE_LIMIT]
        if outcome is None:
            return "not-attempted", "the rollout stopped before this car's batch"
        if outcome == "started":
            return "failed", self.failures.get(name, "interrupted before it finished")[:FAILED_MESSAGE_LIMIT]
        for status in ("skipped", "locked"):
            if outcome.startswith(f"{status}:"):
                return status, outcome.removeprefix(f"{status}:").strip()
        return "ok", outcome


def _message(result: dict[str, Any]) -> str:
    """The failing step's own sentence: a helper's {"error": ...} line when its output has one."""
    for line in reversed(str(result.get("stdout") or "").splitlines()):
        if line.startswith('{"error": '):
            try:
                error = json.loads(line).get("error")
            except ValueError:
                continue
            if isinstance(error, str) and error:
                return " ".join(error.split())
    text = str(result.get("msg") or result.get("stderr") or result.get("stdout") or "failed")
    return " ".join(text.split())
