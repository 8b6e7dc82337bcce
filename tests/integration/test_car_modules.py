"""The car-side modules (plugins/modules) run by ansible itself, as the roles run them: their results are the
tasks' data, refusals are failures with the helper's own sentence, and bad parameters are refused by the
module's argument spec before anything runs. (On the simulated fleet, tests/integration/test_deploy.py runs
them on cars.)"""

from __future__ import annotations

import importlib.util
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from rover_runtime.testing import write_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run_module(
    module: str, args: dict[str, Any], tmp_path: Path, *, check: bool = False, python: str = ""
) -> dict[str, Any]:
    """`ansible localhost -m rover.fleet.<module>` from the project (its ansible.cfg and collections path)."""
    env = dict(
        os.environ,
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json",
        ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"),
    )
    argv = [
        str(BIN / "ansible"),
        "localhost",
        "-c",
        "local",
        "-m",
        f"rover.fleet.{module}",
        *(["-a", json.dumps(args)] if args else []),
    ]
    done = subprocess.run(
        [
            *argv,
            *(["--check"] if check else []),
            *(["-e", f"ansible_python_interpreter={python}"] if python else []),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    try:
        report = json.loads(done.stdout)
    except ValueError:
        pytest.fail(
            f"no JSON from ansible (rc {done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}"
        )
    result: dict[str, Any] = report["plays"][0]["tasks"][0]["hosts"]["localhost"]
    return result


def test_the_deploy_lock_is_data_held_by_one_run_at_a_time(tmp_path: Path) -> None:
    root = str(tmp_path / "rover")
    (tmp_path / "rover").mkdir()
    lock = {"command": "lock", "root": root, "owner": "alice@laptop", "stale_after": 3600}
    first = run_module("rover_release_state", {**lock, "run": "run-a"}, tmp_path)
    assert not first.get("failed"), first
    assert first["busy"] is False
    assert first["lock"]["run"] == "run-a"

    second = run_module("rover_release_state", {**lock, "run": "run-b", "owner": "bob@desk"}, tmp_path)
    assert not second.get("failed"), second  # busy is an outcome the role acts on, not a failure
    assert second["busy"] is True
    assert second["held"]["run"] == "run-a"
    assert "alice@laptop" in second["error"]

    released = run_module(
        "rover_release_state", {"command": "unlock", "root": root, "run": "run-a"}, tmp_path
    )
    assert released["changed"] is True
    assert released["lock"] is None
    status = run_module("rover_release_state", {"command": "status", "root": root}, tmp_path, check=True)
    assert status["lock"] is None
    assert status["current"] is None
    assert status["releases"] == []


def test_a_refusal_fails_with_the_helpers_sentence(tmp_path: Path) -> None:
    (tmp_path / "rover").mkdir()
    result = run_module(
        "rover_release_state", {"command": "rollback-target", "root": str(tmp_path / "rover")}, tmp_path
    )
    assert result["failed"] is True
    assert result["msg"] == result["error"], result
    assert "no good release" in result["msg"]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ({"command": "mark", "release": "abc", "state": "fine"}, "state"),
        ({"command": "lock", "run": "r"}, "owner"),
        ({"command": "prune", "keep": 0, "run": "r", "stale_after": 1}, "keep"),
        ({"command": "switch", "release": "../../etc"}, "release"),
        ({"command": "rollback-target", "release": "abc", "leaving": "def"}, "mutually exclusive"),
        ({"command": "rollback-target", "leaving": "../x"}, "release id"),
    ],
)
def test_bad_parameters_are_refused_before_anything_runs(
    tmp_path: Path, args: dict[str, Any], named: str
) -> None:
    root = tmp_path / "rover"
    root.mkdir()
    result = run_module("rover_release_state", {"root": str(root), **args}, tmp_path)
    assert result["failed"] is True
    assert named in result["msg"], result
    assert sorted(p.name for p in root.iterdir()) == []


def test_the_check_mode_of_a_change_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "rover"
    root.mkdir()
    lock = {"command": "lock", "root": str(root), "run": "r", "owner": "o", "stale_after": 60}
    result = run_module("rover_release_state", lock, tmp_path, check=True)
    assert result["changed"] is False
    assert "check mode" in result["msg"]
    assert list(root.iterdir()) == []


def test_the_health_gate_fails_with_the_reason_and_its_report(tmp_path: Path) -> None:
    args = {
        "metrics": str(tmp_path / "metrics.json"),
        "unit": "rover-runtime-absent.service",
        "expect_release": "5e93c1d2",
        "timeout_s": 0,
        "soak_s": 0,
    }
    result = run_module("rover_health_gate", args, tmp_path)
    assert result["failed"] is True
    assert result["ok"] is False
    assert result["phase"] == "start"
    assert "metrics.json" in result["reason"], result
    assert result["reason"] in result["msg"]
    bad = run_module("rover_health_gate", {**args, "interval_s": 0}, tmp_path)
    assert bad["failed"] is True
    assert "bad arguments" in bad["msg"]
    assert "--interval-s" in bad["msg"]


def test_the_wheelhouse_fetch_names_an_unreachable_controller_and_writes_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "wheelhouse"
    args = {
        "url": "http://127.0.0.1:9/wheelhouse",  # discard port: nothing listens
        "dest": str(dest),
        "sums_sha256": "0" * 64,
        "requirements_sha256": "0" * 64,
        "timeout": 5,
    }
    result = run_module("rover_wheelhouse_fetch", args, tmp_path)
    assert result["failed"] is True
    assert "cannot fetch the wheelhouse from http://127.0.0.1:9/wheelhouse" in result["msg"], result
    assert "rover_python_wheelhouse_transfer=copy" in result["msg"]
    assert not dest.exists() or list(dest.iterdir()) == []
    checked = run_module("rover_wheelhouse_fetch", args, tmp_path, check=True)
    assert checked["changed"] is False
    assert not checked.get("failed")


def test_the_thermal_reading_judges_vcgencmd_then_sysfs(tmp_path: Path) -> None:
    vcgencmd = tmp_path / "vcgencmd"
    vcgencmd.write_text(
        "#!/bin/sh\n"
        'case "$1" in measure_temp) echo "temp=85.0\'C";; get_throttled) echo throttled=0x20002;; esac\n'
    )
    vcgencmd.chmod(0o755)
    sysfs = tmp_path / "temp"
    sysfs.write_text("72512\n")
    hot = run_module("rover_thermal_reading", {"vcgencmd": str(vcgencmd), "sysfs": str(sysfs)}, tmp_path)
    assert {k: hot[k] for k in ("status", "temp_c", "throttled", "source")} == {
        "status": "over",
        "temp_c": 85.0,
        "throttled": "0x20002",
        "source": "vcgencmd",
    }
    warm = run_module("rover_thermal_reading", {"source": "sysfs", "sysfs": str(sysfs)}, tmp_path, check=True)
    assert {k: warm[k] for k in ("status", "temp_c", "throttled", "source")} == {
        "status": "warn",
        "temp_c": 72.5,
        "throttled": "unknown",
        "source": "sysfs",
    }
    none = run_module(
        "rover_thermal_reading",
        {"vcgencmd": str(tmp_path / "absent"), "sysfs": str(tmp_path / "absent")},
        tmp_path,
    )
    assert not none.get("failed"), none  # the role decides: it fails the car naming the reason
    assert none["status"] == "error"
    assert "not found" in none["error"]


def test_the_thermal_fact_reads_its_settings_as_data(tmp_path: Path) -> None:
    """The local fact's settings are shell-quoted KEY=VALUE words: read as data, never run; an unknown key
    is refused."""
    script = REPO / "plugins" / "module_utils" / "thermal_reading.py"
    pwned = tmp_path / "pwned"
    hostile = f"{tmp_path / 'temp'} $(touch {pwned}); touch {pwned}"
    (tmp_path / "temp").write_text("48312\n")
    argv = [sys.executable, str(script), "source=sysfs", f"sysfs={hostile}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1, done.stdout  # no such file: the hostile value is one path
    assert json.loads(done.stdout)["status"] == "error"
    assert not pwned.exists()
    good = subprocess.run(
        [
            sys.executable,
            str(script),
            "source=sysfs",
            f"sysfs={tmp_path / 'temp'}",
            "limit=80.0",
            "warn=70.0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert good.returncode == 0, good.stdout
    assert good.stdout.startswith('{"status": "ok", "temp_c": 48.3')
    bad = subprocess.run(
        [sys.executable, str(script), "colour=blue"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2
    assert json.loads(bad.stdout) == {"status": "error", "error": "unknown setting 'colour=blue'"}


def test_the_thermal_conf_is_parsed_as_shell_quoted_words(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "thermal_reading", REPO / "plugins/module_utils/thermal_reading.py"
    )
    assert spec is not None
    assert spec.loader is not None
    thermal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(thermal)
    conf = tmp_path / "thermal.conf"
    hostile = "/sys/x $(touch /tmp/pwned); touch /tmp/pwned"
    conf.write_text(f"# managed\nsource='sysfs'\nsysfs={shlex.quote(hostile)}\nlimit='80.0'\n")
    values = thermal.settings(conf, ["warn=65"])
    assert values == {
        "source": "sysfs",
        "vcgencmd": "vcgencmd",
        "sysfs": hostile,
        "limit": "80.0",
        "warn": "65",
    }
    assert thermal.settings(tmp_path / "absent.conf", []) == thermal.DEFAULTS
    conf.write_text("sysfs='unterminated\n")
    with pytest.raises(thermal.SettingError, match=r"thermal\.conf"):
        thermal.settings(conf, [])


def test_torch_is_imported_in_the_interpreter_the_task_names() -> None:
    """The venv's python imports torch and names its quantized engines; a python without torch is named."""
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    found = run_module("rover_torch_engines", {}, tmp, python=sys.executable)
    assert not found.get("failed"), found
    assert found["python"] == sys.executable
    assert found["version"].startswith("2.")
    assert set(found["engines"]) & {"x86", "fbgemm", "onednn", "qnnpack"}
    bare = "/usr/bin/python3"
    if subprocess.run([bare, "-c", "import torch"], capture_output=True, check=False).returncode == 0:
        pytest.skip(f"{bare} has torch here")
    missing = run_module("rover_torch_engines", {}, tmp, python=bare)
    assert missing["failed"] is True
    assert missing["msg"].startswith(f"torch does not import in {bare}: "), missing


# A stand-in for a release's rover-runtime that reports who ran it, in the check's result file: the venv's
# rover-runtime lives under /root (0700 here), which no other user may run.
WHOAMI_RUNTIME = """#!/bin/sh
while [ $# -gt 0 ]; do [ "$1" = --output ] && out=$2; shift; done
printf '{"ok": true, "checks": {"identity": {"ok": true, "uid": %s, "groups": "%s", "home": "%s"}}}' \\
  "$(id -u)" "$(id -G)" "$HOME" > "$out"
"""


def _check_args(runtime: Path, config: Path, user: str) -> dict[str, Any]:
    return {
        "runtime": str(runtime),
        "config": str(config),
        "user": user,
        "deadline_ms": 5000,
        "max_temp_c": 200,
    }


def test_the_runtime_check_reports_from_its_result_file_and_names_each_failed_check(tmp_path: Path) -> None:
    bundle = write_tiny_bundle(tmp_path / "bundle")
    config = tmp_path / "runtime.toml"
    config.write_text(f'[policy]\nbundle = "{bundle}"\n')
    runtime = BIN / "rover-runtime"
    passed = run_module("rover_runtime_check", _check_args(runtime, config, "root"), tmp_path)
    assert not passed.get("failed"), passed
    assert passed["ok"] is True
    assert passed["failures"] == []
    assert passed["report"]["checks"]["inference"]["finite"] is True
    assert passed["report"]["checks"]["serial"]["skipped"] is True  # the running service holds the line

    (bundle / "extra.bin").write_bytes(b"x")  # a bundle that no longer matches its manifest
    failed = run_module("rover_runtime_check", _check_args(runtime, config, "root"), tmp_path)
    assert failed["failed"] is True
    assert failed["rc"] == 1
    assert [f.split(":")[0] for f in failed["failures"]] == ["bundle", "inference"], failed
    assert failed["msg"].startswith("rover-runtime check failed: bundle: "), failed["msg"]
    assert "extra.bin is not listed in the manifest" in failed["msg"]

    absent = tmp_path / "none.toml"
    missing = run_module("rover_runtime_check", _check_args(runtime, absent, "root"), tmp_path)
    assert missing["failed"] is True
    assert missing["msg"] == f"config {absent} does not exist"
    nobody = run_module("rover_runtime_check", _check_args(runtime, config, "rover-missing"), tmp_path)
    assert nobody["msg"] == "no user 'rover-missing' on this car"


@pytest.mark.skipif(os.geteuid() != 0, reason="running a program as another user needs root")
def test_the_runtime_check_runs_as_the_service_user_with_its_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = Path(tempfile.mkdtemp(prefix="rover-check-test."))  # pytest's tmp_path is closed to other users
    # The caller's TMPDIR closed to the service user, as the pull agent's is (its 0700 state directory).
    closed = tmp_path / "agent-tmp"
    closed.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(closed))
    try:
        work.chmod(0o755)
        runtime = work / "rover-runtime"
        runtime.write_text(WHOAMI_RUNTIME)
        runtime.chmod(0o755)
        config = work / "runtime.toml"
        config.write_text("")
        result = run_module("rover_runtime_check", _check_args(runtime, config, "nobody"), tmp_path)
        assert not result.get("failed"), result
        identity = result["report"]["checks"]["identity"]
        user = pwd.getpwnam("nobody")
        assert identity["uid"] == user.pw_uid
        assert sorted(map(int, identity["groups"].split())) == sorted(os.getgrouplist("nobody", user.pw_gid))
        assert identity["home"] == "/tmp"
        assert not list(Path("/tmp").glob("rover-check.*"))  # its private result directory is gone
        assert not list(closed.glob("rover-check.*"))

        runtime.chmod(0o700)  # a release the service user cannot run
        refused = run_module("rover_runtime_check", _check_args(runtime, config, "nobody"), tmp_path)
        assert refused["failed"] is True
        assert refused["msg"].startswith("rover-runtime check could not start as nobody: "), refused["msg"]
        assert "Permission denied" in refused["msg"]
    finally:
        shutil.rmtree(work)
