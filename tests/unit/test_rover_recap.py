"""plugins/callback/rover_recap.py: a failed car's message is its helper's own sentence, and the results
file is what the pull agent reads."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN = REPO / "plugins" / "callback" / "rover_recap.py"


def _load() -> ModuleType:
    """The callback as ansible-playbook loads it, its collection (this project) importable."""
    if str(REPO / "collections") not in sys.path:
        sys.path.insert(0, str(REPO / "collections"))
    spec = importlib.util.spec_from_file_location("rover_recap", PLUGIN)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["rover_recap"] = module
    spec.loader.exec_module(module)
    return module


recap: Any = _load()


@pytest.mark.parametrize(
    ("result", "message"),
    [
        # Over ssh a helper's stderr arrives in stdout, after sudo's warnings: the helper's JSON line wins.
        (
            {
                "msg": "non-zero return code",
                "stderr": "Shared connection to 127.0.0.1 closed.",
                "stdout": 'sudo: unable to resolve host car1\n{"error": "deploy lock held by alice"}\n'
                "release_state: deploy lock held by alice\n",
            },
            "deploy lock held by alice",
        ),
        ({"msg": "non-zero return code", "stdout": '{"error": ""}'}, "non-zero return code"),
        ({"msg": "", "stderr": "boom\n  twice", "stdout": "{not json"}, "boom twice"),
        ({"stdout": '{"error": "not closed'}, '{"error": "not closed'),
        ({}, "failed"),
    ],
)
def test_a_failed_cars_message_is_its_helpers_own_sentence(result: dict[str, Any], message: str) -> None:
    assert recap._message(result) == message


def test_the_results_file_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "result.json"
    recap.write_json_atomic(path, {"cars": {"car1": {"status": "ok", "message": "deployed"}}})
    assert json.loads(path.read_text())["cars"]["car1"]["status"] == "ok"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]
