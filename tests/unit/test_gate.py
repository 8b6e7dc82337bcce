"""plugins/module_utils/health_gate.py: the deploy's health gate, judged on metrics the real runtime writes.

The gate is a standalone stdlib script (it must not import rover_runtime), loaded here by path. The metrics
dicts come from a real Vehicle.snapshot() (stub policy, synthetic camera, a serial link not yet open), plus
what MetricsWriter adds, so a key renamed in the runtime breaks these tests rather than the deploy.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rover_runtime.camera import Camera, SyntheticSource
from rover_runtime.config import RuntimeConfig, load_config, make_serial_link
from rover_runtime.drive import build_vehicle
from rover_runtime.policy import StubPolicy
from rover_runtime.sd_notify import Notifier

GATE_PATH = Path(__file__).resolve().parents[2] / "plugins" / "module_utils" / "health_gate.py"
RELEASE = "r-2024-abc123"
NOW = 1_700_000_000.0


def _load_gate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rover_health_gate", GATE_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


gate = _load_gate()


def snapshot_of(config: RuntimeConfig, last_rx_age_s: float | None = None) -> dict[str, Any]:
    """The snapshot of a vehicle built as `rover-runtime run` builds it (not started: the link is closed)."""
    link = make_serial_link(config.serial)
    link.stats.replies_ok, link.stats.commands_sent = 120, 130
    if last_rx_age_s is not None:
        link.stats.last_rx_monotonic = time.monotonic() - last_rx_age_s
    camera = Camera(SyntheticSource(64, 48, fps=30), retry_interval_s=1.0, name="front")
    vehicle = build_vehicle(
        config, StubPolicy(chunk_size=10), link, cameras=[camera], notifier=Notifier(environ={})
    )
    return vehicle.snapshot()


@pytest.fixture(scope="module")
def runtime_snapshot(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A real snapshot of a runtime started from /opt/rover/current/runtime.toml (in miniature)."""
    root = tmp_path_factory.mktemp("rover")
    release = root / "releases" / RELEASE
    release.mkdir(parents=True)
    (release / "runtime.toml").write_text('[policy]\nstub = true\nbundle = "bundle"\n[metrics]\npath = ""\n')
    (release / "release.json").write_text(json.dumps({"id": RELEASE}))
    (root / "current").symlink_to(release)
    config = load_config(root / "current" / "runtime.toml", {"serial.port": str(root / "no-tty")})
    snap = snapshot_of(config, last_rx_age_s=0.25)
    snap["release_dir"] = str(release.resolve())  # for the test below only
    return snap


def test_snapshot_reports_the_release_it_started_from_and_the_reply_age(
    runtime_snapshot: dict[str, Any],
) -> None:
    snap = runtime_snapshot
    assert snap["release"] == {"id": RELEASE, "config": snap["release_dir"] + "/runtime.toml"}
    assert 0.2 <= snap["serial"]["last_rx_age_s"] < 5.0
    assert snap["serial"]["replies_ok"] == 120  # the SerialLink counters are still there
    json.dumps(snap)  # what MetricsWriter writes must be JSON


def test_snapshot_without_a_release_or_a_reply() -> None:
    config = load_config(None, {"policy.stub": True, "metrics.path": ""})
    snap = snapshot_of(config)
    assert snap["release"] == {"id": None, "config": None}
    assert snap["serial"]["last_rx_age_s"] is None


@pytest.fixture
def healthy(runtime_snapshot: dict[str, Any]) -> dict[str, Any]:
    """The snapshot as a healthy, driving runtime's metrics file shows it (MetricsWriter's keys added)."""
    m = copy.deepcopy(runtime_snapshot)
    del m["release_dir"]
    m["time_unix"] = NOW - 0.4
    m["ready"], m["healthy"], m["driving"] = True, True, True
    m["failsafe"].update(active=False, reasons=[], count=1)
    m["loop"]["rate_hz_achieved"] = 29.7
    m["loop"]["cycles"] = 900
    m["inference"]["completed"] = 45
    m["inference"]["latency_ms"]["p95"] = 38.2
    m["cameras"]["front"].update(connected=True, frames=880, frame_age_s=0.02)
    m["serial"].update(connected=True, last_rx_age_s=0.08)
    m["bundle"]["content_hash"] = "f" * 64
    m["thermal"] = {"temperature_c": 52.0, "throttled": "0x0", "throttled_now": False}
    return m


def expect(**kwargs: Any) -> Any:
    kwargs.setdefault("release", RELEASE)
    return gate.Expect(**kwargs)


def test_a_healthy_sample_passes(healthy: dict[str, Any]) -> None:
    assert gate.sample_problems(healthy, expect(bundle="f" * 64), NOW) == []


def test_metrics_missing_sections_are_reported_as_missing(healthy: dict[str, Any]) -> None:
    for section in ("loop", "failsafe", "serial", "release"):
        del healthy[section]
    problems = gate.sample_problems(healthy, expect(), NOW)
    assert "failsafe.active missing from the metrics" in problems
    assert any(p.startswith("loop.rate_hz_achieved missing from the metrics") for p in problems)
    assert any(p.startswith("release.id missing from the metrics") for p in problems)
    assert "serial.connected missing from the metrics" in problems
    assert not any("KeyError" in p or "{{" in p for p in problems)


def test_an_empty_or_odd_metrics_object_does_not_raise() -> None:
    problems = gate.sample_problems({}, expect(bundle="abc"), NOW)
    assert "time_unix missing from the metrics" in problems
    assert "ready missing from the metrics" in problems
    odd: dict[str, Any] = {
        "time_unix": "yesterday",
        "loop": [],
        "failsafe": None,
        "serial": {"connected": True},
    }
    problems = gate.sample_problems(odd, expect(), NOW)
    assert "time_unix is not a number in the metrics: 'yesterday'" in problems
    assert "serial.last_rx_age_s missing from the metrics" in problems


def test_a_camera_error_is_reported_in_the_runtimes_words(healthy: dict[str, Any]) -> None:
    healthy["healthy"] = False
    healthy["failsafe"].update(active=True, reasons=["camera front stale: newest frame 3.10s old (max 0.5s)"])
    healthy["cameras"]["front"].update(connected=False, last_error="/dev/video0: no frames for 3.1s")
    problems = gate.sample_problems(healthy, expect(), NOW)
    assert problems == [
        "failsafe active (neutral): camera front stale: newest frame 3.10s old (max 0.5s)",
        "camera front error: /dev/video0: no frames for 3.1s",
        "unhealthy: neutral for longer than failsafe.unhealthy_after_s",
    ]


def test_an_old_camera_error_is_not_blamed_when_the_camera_works(healthy: dict[str, Any]) -> None:
    healthy["cameras"]["front"]["last_error"] = "/dev/video0: no frames for 1.2s"  # recovered since
    healthy["failsafe"].update(active=True, reasons=["inference failed"])
    healthy["inference"]["errors"] = 7
    problems = gate.sample_problems(healthy, expect(), NOW)
    assert problems == [
        "failsafe active (neutral): inference failed",
        "inference errors so far: 7 (the exceptions are in the journal)",
    ]


def test_the_starting_runtime_is_not_ready(runtime_snapshot: dict[str, Any]) -> None:
    m = copy.deepcopy(runtime_snapshot)
    m["time_unix"] = NOW
    problems = gate.sample_problems(m, expect(), NOW)
    assert "not ready: the control loop has not started" in problems
    assert "failsafe active (neutral): starting" in problems


def test_a_wrong_release_and_bundle(healthy: dict[str, Any]) -> None:
    healthy["release"]["id"] = "r-old"
    problems = gate.sample_problems(healthy, expect(bundle="e" * 64), NOW)
    config = healthy["release"]["config"]
    assert problems == [
        f"running release r-old (config {config}), expected {RELEASE}",
        f"running bundle {'f' * 64}, expected {'e' * 64}",
    ]
    healthy["release"] = {"id": None, "config": "/etc/rover/runtime.toml"}
    assert gate.sample_problems(healthy, expect(), NOW) == [
        f"running no release (config /etc/rover/runtime.toml), expected {RELEASE}"
    ]


def test_a_stale_reply_and_a_disconnected_link(healthy: dict[str, Any]) -> None:
    healthy["serial"]["last_rx_age_s"] = 7.25
    assert gate.sample_problems(healthy, expect(), NOW) == [
        "serial: last valid reply from the firmware 7.2s ago (max 2s)"
    ]
    assert gate.sample_problems(healthy, expect(serial=False), NOW) == []  # --no-serial
    healthy["serial"].update(connected=False, reconnects=0, disconnects=3, write_errors=5)
    assert gate.sample_problems(healthy, expect(), NOW) == [
        "serial: not connected to the firmware (reconnects 0, disconnects 3, write_errors 5)"
    ]
    healthy["serial"].update(connected=True, last_rx_age_s=None, replies_ok=0, garbage_lines=12)
    assert gate.sample_problems(healthy, expect(), NOW) == [
        "serial: connected but no valid reply from the firmware yet (12 garbage lines)"
    ]


def test_a_slow_loop_and_stale_metrics(healthy: dict[str, Any]) -> None:
    # One busy second may dip (a sample needs half the ratio); 10 Hz of a 30 Hz loop is too slow anyway.
    healthy["loop"].update(rate_hz_achieved=20.0)
    assert gate.sample_problems(healthy, expect(), NOW) == []
    healthy["loop"].update(rate_hz_achieved=10.0, deadline_misses=310)
    healthy["time_unix"] = NOW - 12.0
    assert gate.sample_problems(healthy, expect(), NOW) == [
        "metrics file is stale: last written 12.0s ago (the runtime rewrites it every second)",
        "loop at 10 Hz, below 0.45 x its target 30 Hz, 310 deadline misses",
    ]


def test_the_soak_as_a_whole_must_reach_the_rate(healthy: dict[str, Any]) -> None:
    first = copy.deepcopy(healthy)
    last = copy.deepcopy(healthy)
    last["time_unix"] = first["time_unix"] + 10.0
    last["loop"]["cycles"] = first["loop"]["cycles"] + 290  # 29 Hz
    assert gate.average_rate_problems(first, last, 0.9) == []
    last["loop"]["cycles"] = first["loop"]["cycles"] + 200  # 20 Hz
    assert gate.average_rate_problems(first, last, 0.9) == [
        "loop at 20.0 Hz over the soak, below 0.9 x its target 30 Hz"
    ]


UNIT = {
    "LoadState": "loaded",
    "ActiveState": "active",
    "SubState": "running",
    "NRestarts": "0",
    "InvocationID": "a1b2",
    "ExecMainStatus": "0",
    "MainPID": "4242",
}


def test_unit_states() -> None:
    assert gate.unit_problems(UNIT, "rover-runtime") == []
    failed = {**UNIT, "ActiveState": "failed", "SubState": "failed", "ExecMainStatus": "2"}
    assert gate.unit_problems(failed, "rover-runtime") == [
        "rover-runtime.service is failed/failed (exit status 2)"
    ]
    assert gate.unit_is_down(failed)
    unknown = {"error": "systemctl show rover-runtime: command not found"}
    assert gate.unit_problems(unknown, "rover-runtime.service") == [
        "unit state unknown: systemctl show rover-runtime: command not found"
    ]
    assert not gate.unit_is_down(unknown)
    shown = "ActiveState=activating\nSubState=auto-restart\nNRestarts=3\nExecMainStatus=1\n"
    assert gate.unit_problems(gate.parse_systemctl_show(shown), "rover-runtime") == [
        "rover-runtime.service is activating/auto-restart (exit status 1)"
    ]


def advanced(m: dict[str, Any], replies: int = 30, inferences: int = 15) -> dict[str, Any]:
    later = copy.deepcopy(m)
    later["serial"]["replies_ok"] += replies
    later["inference"]["completed"] += inferences
    return later


def test_a_good_soak(healthy: dict[str, Any]) -> None:
    assert gate.soak_problems(healthy, advanced(healthy), UNIT, dict(UNIT)) == []


def test_a_restart_during_the_soak(healthy: dict[str, Any]) -> None:
    last = advanced(healthy)
    last["pid"] = healthy["pid"] + 1
    after = {**UNIT, "NRestarts": "1", "InvocationID": "c3d4"}
    problems = gate.soak_problems(healthy, last, UNIT, after)
    assert problems == [
        f"the unit restarted during the soak (NRestarts 0 -> 1, new invocation, "
        f"metrics pid {healthy['pid']} -> {healthy['pid'] + 1})"
    ]


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"ActiveState": "active", "SubState": "running"}, None),
        (
            {
                "ActiveState": "activating",
                "SubState": "auto-restart",
                "ExecMainCode": "2",
                "ExecMainStatus": "9",
            },
            "the unit restarted during the soak: its process was killed by signal 9 (SIGKILL) "
            "(rover-runtime.service is activating/auto-restart (exit status 9))",
        ),
        (
            {"ActiveState": "failed", "SubState": "failed", "ExecMainCode": "1", "ExecMainStatus": "1"},
            "the unit stopped during the soak: its process exited with status 1 "
            "(rover-runtime.service is failed/failed (exit status 1))",
        ),
        (
            {
                "ActiveState": "activating",
                "SubState": "auto-restart",
                "ExecMainCode": "3",
                "ExecMainStatus": "6",
            },
            "the unit restarted during the soak: its process was killed by signal 6 (SIGABRT) "
            "(rover-runtime.service is activating/auto-restart (exit status 6))",
        ),
        # Sampled after RestartSec (a loaded car): systemd already runs the next process's ExecStartPre, or
        # waits for its READY=1. Still a restart, and the status is the new process's, so it is not quoted.
        *(
            (
                {"ActiveState": "activating", "SubState": sub, "ExecMainCode": "0", "ExecMainStatus": "0"},
                "the unit restarted during the soak: its process ended and systemd is starting it again "
                f"(rover-runtime.service is activating/{sub} (exit status 0))",
            )
            for sub in ("start-pre", "start")
        ),
        (
            {"ActiveState": "deactivating", "SubState": "stop-sigterm", "ExecMainStatus": ""},
            "the unit stopped during the soak: its process ended "
            "(rover-runtime.service is deactivating/stop-sigterm)",
        ),
        (
            {"ActiveState": "inactive", "SubState": "dead", "ExecMainCode": "1", "ExecMainStatus": "0"},
            "the unit stopped during the soak: its process ended "
            "(rover-runtime.service is inactive/dead (exit status 0))",
        ),
    ],
)
def test_a_process_that_ended_during_the_soak_is_named(state: dict[str, str], expected: str | None) -> None:
    problems = gate.stopped_problems({**UNIT, **state}, "rover-runtime")
    assert problems == ([] if expected is None else [expected])


def test_a_soak_without_fresh_replies_or_inferences(healthy: dict[str, Any]) -> None:
    last = advanced(healthy, replies=0, inferences=0)
    assert gate.soak_problems(healthy, last, UNIT, UNIT) == [
        "serial: no fresh reply from the firmware during the soak (serial.replies_ok stayed at 120)",
        "no inference completed during the soak (inference.completed stayed at 45)",
    ]
    assert gate.soak_problems(healthy, last, UNIT, UNIT, serial=False) == [
        "no inference completed during the soak (inference.completed stayed at 45)"
    ]
    del last["inference"]
    assert "inference.completed missing from the metrics" in gate.soak_problems(
        healthy, last, UNIT, UNIT, serial=False
    )


def test_summary(healthy: dict[str, Any]) -> None:
    summary = gate.summarize(healthy, advanced(healthy), {**UNIT, "NRestarts": "2"})
    assert summary == {
        "rate_hz": 29.7,
        "inference_p95_ms": 38.2,
        "replies_ok_delta": 30,
        "nrestarts": 2,
        "release": RELEASE,
        "bundle": "f" * 64,
    }
    assert gate.summarize(None, None, {"error": "x"})["nrestarts"] is None


def test_the_gate_imports_the_standard_library_only() -> None:
    imported = set()
    for node in ast.walk(ast.parse(GATE_PATH.read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0
            imported.add((node.module or "").split(".")[0])
    assert imported
    assert imported <= sys.stdlib_module_names | {"__future__"}, imported - sys.stdlib_module_names


def run_gate_script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", str(GATE_PATH), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_bad_arguments_exit_2() -> None:
    done = run_gate_script("--unit", "rover-runtime", "--timeout-s", "-1")
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["reason"].startswith("bad arguments:")
    assert "--metrics" in done.stderr
    done = run_gate_script(
        "--metrics", "/x", "--unit", "u", "--expect-release", "r", "--timeout-s", "1", "--soak-s", "0",
        "--interval-s", "0",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--interval-s must be > 0" in json.loads(done.stdout)["reason"]


def test_missing_metrics_file_fails_at_the_timeout(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.json"
    started = time.monotonic()
    done = run_gate_script(
        "--metrics", str(metrics), "--unit", "rover-runtime-gate-test", "--expect-release", RELEASE,
        "--timeout-s", "1", "--soak-s", "5", "--interval-s", "0.5",
    )  # fmt: skip
    assert time.monotonic() - started < 30
    assert done.returncode == 1, done.stderr
    assert done.stdout.count("\n") == 1  # exactly one JSON object
    report = json.loads(done.stdout)
    assert report["ok"] is False
    assert report["phase"] == "start"
    assert f"metrics file {metrics} does not exist" in report["reason"]
    assert "Traceback" not in done.stderr
    assert report["samples"] >= 2
    assert set(report["summary"]) == {
        "rate_hz",
        "inference_p95_ms",
        "replies_ok_delta",
        "nrestarts",
        "release",
        "bundle",
    }


def fake_systemd(bin_dir: Path, state_file: Path) -> dict[str, str]:
    """`systemctl show` printing state_file, `journalctl` printing two lines; PATH for the gate."""
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f'#!/bin/sh\ncat "{state_file}"\n')
    (bin_dir / "journalctl").write_text("#!/bin/sh\necho 'config policy.bundle: cannot read'\necho bye\n")
    for tool in ("systemctl", "journalctl"):
        (bin_dir / tool).chmod(0o755)
    return {"PATH": f"{bin_dir}:/usr/bin:/bin"}


def write_state(path: Path, state: dict[str, str]) -> None:
    path.write_text("".join(f"{k}={v}\n" for k, v in state.items()))


class MetricsFeeder:
    """Rewrites the metrics file like the runtime does, counters growing, until stopped."""

    def __init__(self, path: Path, metrics: dict[str, Any], interval_s: float = 0.2) -> None:
        self.path, self.metrics, self.interval_s = path, copy.deepcopy(metrics), interval_s
        self.restart_at: float | None = None  # monotonic time the "process" changes pid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self.metrics
            m["time_unix"] = time.time()
            m["serial"]["replies_ok"] += 3
            m["inference"]["completed"] += 1
            m["loop"]["cycles"] += round(30 * self.interval_s)  # a 30 Hz loop
            if self.restart_at is not None and time.monotonic() >= self.restart_at:
                m["pid"] = 99999
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(m))
            tmp.replace(self.path)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MetricsFeeder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def gate_args(metrics: Path, *extra: str) -> list[str]:
    return [
        "--metrics", str(metrics), "--unit", "rover-runtime", "--expect-release", RELEASE,
        "--timeout-s", "5", "--soak-s", "1.5", "--interval-s", "0.3", *extra,
    ]  # fmt: skip


def test_the_gate_passes_a_healthy_runtime_and_fails_a_restart(
    tmp_path: Path, healthy: dict[str, Any]
) -> None:
    state = tmp_path / "state"
    write_state(state, UNIT)
    env = fake_systemd(tmp_path / "bin", state)
    metrics = tmp_path / "metrics.json"
    with MetricsFeeder(metrics, healthy):
        done = run_gate_script(*gate_args(metrics), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True, report
    assert (report["phase"], report["reason"]) == ("soak", "")
    assert report["soak_s"] >= 1.5
    assert report["samples"] >= 5
    assert report["summary"]["replies_ok_delta"] > 0
    assert report["summary"]["release"] == RELEASE
    assert report["summary"]["nrestarts"] == 0

    with MetricsFeeder(metrics, healthy) as feeder:
        feeder.restart_at = time.monotonic() + 0.8
        done = run_gate_script(*gate_args(metrics), env=env)
    report = json.loads(done.stdout)
    assert done.returncode == 1
    assert report["phase"] == "soak"
    assert report["reason"].startswith("the unit restarted during the soak (metrics pid")


def test_the_gate_reports_a_failed_unit_with_its_journal(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write_state(state, {**UNIT, "ActiveState": "failed", "SubState": "failed", "ExecMainStatus": "2"})
    env = fake_systemd(tmp_path / "bin", state)
    done = run_gate_script(*gate_args(tmp_path / "none.json", "--timeout-s", "0"), env=env)
    report = json.loads(done.stdout)
    assert done.returncode == 1
    assert report["phase"] == "start"
    assert report["reason"].startswith("rover-runtime.service is failed/failed (exit status 2); metrics file")
    assert report["reason"].endswith("config policy.bundle: cannot read\nbye")


def test_the_faults_are_read_since_the_restart_given(tmp_path: Path) -> None:
    """A runtime that faulted 20 s before the gate began (its first start, while `rover-runtime check` ran):
    with --journal-since at the restart (the car's local time, as a command result's `start` gives it)
    the gate names the fault; without it the journal is read from 5 s before the gate and the fault is not
    among the runtime's last faults. A time in another form is refused, naming the form."""
    state = tmp_path / "state"
    write_state(state, {**UNIT, "ActiveState": "failed", "SubState": "failed", "ExecMainStatus": "1"})
    env = fake_systemd(tmp_path / "bin", state)
    fault_at = time.time() - 20
    # A journal that honours --since=@EPOCH: the fault line only when the window reaches back to it.
    (tmp_path / "bin" / "journalctl").write_text(
        "#!/bin/sh\nfor a; do case $a in --since=@*) since=${a#--since=@};; esac; done\n"
        f'if [ -z "$since" ] || [ "$since" -le {int(fault_at)} ]; then '
        "echo 'ERROR rover_runtime.parts.cameras: camera front: /dev/video0: cannot open'; fi\necho bye\n"
    )
    restarted = datetime.fromtimestamp(fault_at - 10).strftime("%Y-%m-%d %H:%M:%S.%f")
    args = gate_args(tmp_path / "none.json", "--timeout-s", "0")
    with_since = json.loads(run_gate_script(*args, "--journal-since", restarted, env=env).stdout)
    without = json.loads(run_gate_script(*args, env=env).stdout)
    fault = "the runtime's last faults: (camera front: /dev/video0: cannot open)"
    assert fault in with_since["reason"], with_since["reason"]
    assert fault not in without["reason"], without["reason"]
    for bad in ("yesterday", "07/12/2026 18:25:01", "2026-12-07T18:25:01"):
        done = run_gate_script(*args, "--journal-since", bad, env=env)
        assert done.returncode == 2, done.stdout
        assert json.loads(done.stdout)["reason"] == (
            "bad arguments: --journal-since must be a local time like '2026-12-07 18:25:01.123456', "
            f"got {bad!r}"
        )


def test_the_runtimes_own_faults_come_from_its_log_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real vehicle with no Arduino and a camera that fails: its log lines, as journald keeps them, give
    the gate the faults it went neutral for, each once, with its error lines; systemd's lines and the
    runtime's other warnings are not faults."""
    config = load_config(None, {"serial.port": str(tmp_path / "no-arduino"), "metrics.path": ""})
    camera_source = SyntheticSource(64, 48, fps=30)
    camera_source.fail(OSError("cannot be opened"))
    camera = Camera(camera_source, retry_interval_s=0.05, name="front")
    vehicle = build_vehicle(
        config, StubPolicy(chunk_size=10), make_serial_link(config.serial), cameras=[camera],
        notifier=Notifier(environ={}),
    )  # fmt: skip
    with caplog.at_level("INFO"):
        vehicle.run(max_cycles=40)
    journal = [f"{r.levelname} {r.name}: {r.getMessage()}" for r in caplog.records]
    journal += [
        "rover-runtime.service: Watchdog timeout (limit 15s)!",
        "rover-runtime.service: Main process exited, code=dumped, status=6/ABRT",
        "WARNING rover_runtime.vehicle: control.realtime_priority 20 refused (EPERM); normal scheduling",
        "ERROR rover_runtime.inference_worker: inference failed: RuntimeError: shape mismatch",
    ]
    faults = gate.runtime_faults("\n".join(journal))
    assert any(f.startswith("serial: ") and "not connected" in f for f in faults), journal
    assert any(f.startswith("camera front") for f in faults), journal
    assert faults[-1] == "inference failed: RuntimeError: shape mismatch"
    assert not any("Watchdog" in f or "realtime_priority" in f for f in faults)
    assert len(faults) == len({gate._NUMBER.sub("#", f) for f in faults}) <= gate.FAULT_LINES
