"""playbooks/deploy.yml and playbooks/rollback.yml against three simulated cars (real ansible-playbook,
sshd, systemd, the firmware simulator on the serial pty). The tests run in order and share the fleet.

A release is the model bundle, the rover_runtime code and the car's runtime.toml (role rover_release):
`current` switches all three at once, and every change goes through the same guard, gate and rollback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import (
    FORCE,
    ONE_BATCH,
    RELEASES,
    REPO,
    PlaybookRun,
    car,
    container_pid,
    content_hash,
    corrupt_copy,
    current_bundle,
    current_release,
    fleet_inventory,
    fleet_state,
    journal,
    leftovers,
    make_bundle,
    metrics,
    metrics_if_any,
    new_signing_key,
    playbook_command,
    playbook_env,
    releases,
    run_playbook,
    runs_healthy,
    sign_manifest,
    signing_key,
    wait_driving,
    wait_running,
)
from quantize_helpers import tiny_bundle

from rover_runtime.testing import write_tiny_bundle
from simfleet.fleet import power_off, power_on, set_thermal
from simfleet.host import DEFAULT_THERMAL
from simfleet.pi_tools import ThermalReading
from simfleet.processes import child_processes

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

CARS = ("car1", "car2")
ALL_CARS = ("car1", "car2", "car3")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    good_a = make_bundle(root / "good-a", chunk_size=10)
    good_b = make_bundle(root / "good-b", chunk_size=12)
    return {
        "a": good_a,
        "b": good_b,
        "c": make_bundle(root / "good-c", chunk_size=14),
        "corrupt": corrupt_copy(good_b, root / "corrupt"),
        "gate-fails": make_bundle(root / "gate-fails", chunk_size=11, manifest_chunk_size=9),
    }


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest, fleet_provisioned: PlaybookRun) -> Path:
    """The session's simulated fleet, provisioned."""
    return fleet_inventory(request)


def _wipe(inventory: Path, name: str) -> None:
    car(inventory, name).check_output(
        "systemctl stop rover-runtime || true; "
        f"rm -rf {RELEASES}/releases {RELEASES}/bundles {RELEASES}/current {RELEASES}/.deploy.lock "
        f"{RELEASES}/models"
    )


@pytest.fixture(scope="module")
def deployed(fleet: Path, bundles: dict[str, Path]) -> Path:
    # The fleet is shared by the session: another test (the benchmark playbook) may have deployed to it.
    # These tests count releases, so start from cars with the service stopped and no release at all.
    for name in ALL_CARS:
        _wipe(fleet, name)
    # A stopped car is not driving: the first deploy needs no force.
    run = run_playbook(fleet, "deploy.yml", *ONE_BATCH, "-e", f"rover_deploy_bundle={bundles['a']}")
    assert run.rc == 0, run.report()
    return fleet


def _deploy_car1(inventory: Path, bundle: Path, *args: str) -> PlaybookRun:
    """deploy.yml of `bundle` to car1 alone, forced (a simulated car always drives)."""
    return run_playbook(
        inventory, "deploy.yml", *FORCE, "--limit", "car1", "-e", f"rover_deploy_bundle={bundle}", *args
    )


def _recap_line(run: Any, name: str) -> str:
    match = re.search(rf"^{name}: (.*)$", run.stdout.split("ROVER RECAP")[-1], re.MULTILINE)
    assert match, run.report()
    return match.group(1)


@pytest.mark.parametrize("name", CARS)
def test_service_runs_hardened_as_rover(deployed: Path, name: str) -> None:
    host = car(deployed, name)
    service = host.service("rover-runtime")
    assert service.is_running, journal(host)
    assert service.is_enabled
    show = host.check_output(
        "systemctl show rover-runtime -p Type -p User -p MainPID -p NoNewPrivileges -p ProtectSystem "
        "-p ProtectHome -p PrivateTmp -p DevicePolicy -p WatchdogUSec -p Restart -p RuntimeDirectory "
        "-p DeviceAllow -p LimitRTPRIO"
    )
    props = dict(line.split("=", 1) for line in show.splitlines())
    assert props["Type"] == "notify"
    assert props["User"] == "rover"
    assert props["NoNewPrivileges"] == "yes"
    assert props["ProtectSystem"] == "strict"
    assert props["ProtectHome"] == "yes"
    assert props["PrivateTmp"] == "yes"
    assert props["DevicePolicy"] == "closed"
    assert props["WatchdogUSec"] == "10s"
    assert props["Restart"] == "on-failure"
    assert props["LimitRTPRIO"] == "20"  # the control loop may run at SCHED_FIFO
    assert props["RuntimeDirectory"] == "rover"
    assert "/dev/ttyUSB0 rw" in props["DeviceAllow"]
    # An increasing restart back-off where the car's systemd has it (>= 254: trixie, not bookworm).
    systemd = int(host.check_output("systemctl --version").split()[1])
    steps = host.check_output("systemctl show rover-runtime -p RestartSteps --value")
    assert steps == ("5" if systemd >= 254 else ""), (systemd, steps)
    # The process itself runs as rover, not only the unit setting.
    assert host.check_output(f"ps -o user= -p {props['MainPID']}").strip() == "rover"


@pytest.mark.parametrize("name", CARS)
def test_service_sandbox_score_devices_and_restart_policy(deployed: Path, name: str) -> None:
    host = car(deployed, name)
    # systemd's own rating of the sandbox: at most 2.0 ("SAFE" ends at 2.0; docs/deploy.md shows the table).
    security = host.check_output("systemd-analyze security --no-pager rover-runtime.service")
    score = re.search(r"Overall exposure level for rover-runtime\.service: (\d+\.\d+)", security)
    assert score, security[-2000:]
    assert float(score.group(1)) <= 2.0, security
    # Device classes (by major number, so a replugged Arduino or camera that comes back under another node
    # name is still allowed) and the VideoCore mailbox vcgencmd reads the throttling bits from.
    allow = host.check_output("systemctl show rover-runtime -p DeviceAllow --value")
    for entry in ("char-ttyUSB rw", "char-ttyACM rw", "char-video4linux rw", "/dev/vcio rw"):
        assert entry in allow, allow
    show = host.check_output(
        "systemctl show rover-runtime -p StartLimitIntervalUSec -p Restart -p RestartUSec "
        "-p RestrictRealtime -p LimitRTPRIO -p CapabilityBoundingSet -p PrivateNetwork -p TimeoutStopUSec"
    )
    props = dict(line.split("=", 1) for line in show.splitlines())
    # No start rate limit: systemd keeps restarting a crashing runtime, it never stays failed for good.
    assert props["StartLimitIntervalUSec"] == "0", props
    assert props["Restart"] == "on-failure"
    # A runtime that hangs on its way out is killed after 20 s, not systemd's default 90 s.
    assert props["TimeoutStopUSec"] == "20s", props
    # SCHED_FIFO for the control loop stays possible.
    assert props["RestrictRealtime"] == "no"
    assert props["LimitRTPRIO"] == "20"
    assert props["CapabilityBoundingSet"] == ""
    assert props["PrivateNetwork"] == "yes"
    # Without RestartSteps (systemd < 254: bookworm) the back-off is a fixed, longer wait.
    systemd = int(host.check_output("systemctl --version").split()[1])
    assert props["RestartUSec"] == ("2s" if systemd >= 254 else "10s"), (systemd, props)


@pytest.mark.parametrize("name", CARS)
def test_release_holds_bundle_runtime_and_config(deployed: Path, bundles: dict[str, Path], name: str) -> None:
    host = car(deployed, name)
    release = current_release(host)
    base = f"{RELEASES}/releases/{release}"
    assert host.file(f"{RELEASES}/current").linked_to == base
    # The model: a link to the verified bundle, kept once per content hash.
    assert host.file(f"{base}/bundle").is_symlink
    assert current_bundle(host) == content_hash(bundles["a"])
    # The runtime's code and its launcher, and the rendered config, readable by the service's group only.
    assert host.file(f"{base}/lib/rover_runtime/vehicle.py").is_file
    assert host.file(f"{base}/bin/rover-runtime").mode == 0o755
    config = host.file(f"{base}/runtime.toml")
    assert (config.user, config.group, config.mode) == ("root", "rover", 0o640)
    assert 'bundle = "bundle"' in config.content_string
    info = releases(host)[release]
    assert info["bundle"] == content_hash(bundles["a"])
    assert info["state"] == "good", info
    # The process runs this release's code: the launcher resolved `current` when it started.
    m = metrics(host)
    assert m["release"] == {"id": release, "config": f"{base}/runtime.toml"}
    environ = host.check_output(f"tr '\\0' '\\n' < /proc/{m['pid']}/environ")
    assert f"PYTHONPATH={base}/lib" in environ.splitlines()
    # The signature the car checked stays with the bundle.
    assert host.file(f"{RELEASES}/bundles/{content_hash(bundles['a'])}/manifest.json.sig").exists


@pytest.mark.parametrize("name", CARS)
def test_metrics_show_the_loop_running(deployed: Path, bundles: dict[str, Path], name: str) -> None:
    host = car(deployed, name)
    first = metrics(host)
    time.sleep(2.5)
    second = metrics(host)
    assert second["loop"]["cycles"] > first["loop"]["cycles"]
    assert second["loop"]["rate_hz_achieved"] >= 0.9 * second["loop"]["rate_hz_target"]
    assert second["healthy"]
    assert not second["failsafe"]["active"]
    assert second["bundle"]["content_hash"] == content_hash(bundles["a"])
    assert second["serial"]["replies_ok"] > first["serial"]["replies_ok"]
    assert second["serial"]["last_rx_age_s"] < 2.0


def test_redeploy_unchanged_changes_nothing(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    model = f"{RELEASES}/current/bundle/model.onnx"
    before = host.check_output(f"stat -L -c '%i %Y' {model}")
    pid = metrics(host)["pid"]
    run = run_playbook(deployed, "deploy.yml", "-e", f"rover_deploy_bundle={bundles['a']}")
    assert run.rc == 0, run.report()
    recap = run.recap()
    assert all(recap[name]["changed"] == 0 for name in ALL_CARS), recap
    for name in ALL_CARS:
        assert _recap_line(run, name).endswith("unchanged"), _recap_line(run, name)
    assert host.check_output(f"stat -L -c '%i %Y' {model}") == before
    assert metrics(host)["pid"] == pid  # not restarted
    # An unchanged car ends after its checks: no lock, no unit install, no build or switch on it.
    for task in ("Take the car's deploy lock", "Install the hardened unit", "Switch current to the release"):
        assert f"TASK [rover_release : {task}]" not in run.stdout, task
        assert f"TASK [rover_runtime_service : {task}]" not in run.stdout, task


def test_driving_car_is_skipped_and_reported_not_failed(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    for name in ALL_CARS:
        wait_driving(car(deployed, name))
    before = {name: current_release(car(deployed, name)) for name in ALL_CARS}
    run = run_playbook(deployed, "deploy.yml", "-e", f"rover_deploy_bundle={bundles['b']}")
    assert run.rc == 0, run.report()  # a skip is not a failure: the rollout went on
    for name in ALL_CARS:
        assert _recap_line(run, name).startswith("SKIPPED: driving"), _recap_line(run, name)
        assert current_release(car(deployed, name)) == before[name]
    assert not host.file(f"{RELEASES}/bundles/{content_hash(bundles['b'])}").exists


def test_check_mode_reports_the_switch_and_changes_nothing(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    before = current_release(host)
    run = run_playbook(deployed, "deploy.yml", "--check", *FORCE, "-e", f"rover_deploy_bundle={bundles['b']}")
    assert run.rc == 0, run.report()
    assert run.recap()["car1"]["changed"] > 0
    assert current_release(host) == before
    assert not host.file(f"{RELEASES}/bundles/{content_hash(bundles['b'])}").exists
    assert leftovers(host) == []


def test_corrupted_bundle_is_refused_on_the_controller(deployed: Path, bundles: dict[str, Path]) -> None:
    before = current_release(car(deployed, "car1"))
    run = run_playbook(deployed, "deploy.yml", *FORCE, "-e", f"rover_deploy_bundle={bundles['corrupt']}")
    assert run.rc != 0, run.report()
    assert "does not match its sha256 in the manifest" in run.text, run.report()
    assert current_release(car(deployed, "car1")) == before


def test_corrupted_bundle_is_refused_on_the_car(deployed: Path, bundles: dict[str, Path]) -> None:
    """With the controller's sha256 check off, the car's own check refuses the bundle before activation."""
    host = car(deployed, "car1")
    before = current_release(host)
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={bundles['corrupt']}",
        "-e",
        "rover_release_verify_on_controller=false",
    )
    assert run.rc != 0, run.report()
    assert "failed verification on the car and was not activated" in run.text, run.report()
    assert "does not match its sha256" in run.text, run.report()
    assert current_release(host) == before
    assert host.run(f"ls -A {RELEASES}/bundles").stdout.split() == [content_hash(bundles["a"])]
    assert leftovers(host) == []  # this run's staging directories and its lock are gone
    # Rollout stopped at the canary: the other cars never saw the bundle.
    assert _recap_line(run, "car1").startswith("FAILED"), run.report()
    assert _recap_line(run, "car2").startswith("not attempted"), run.report()
    assert metrics(host)["bundle"]["content_hash"] == content_hash(bundles["a"])
    assert host.service("rover-runtime").is_running


def test_config_only_change_is_a_gated_release(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    first = current_release(host)
    run = _deploy_car1(
        deployed,
        bundles["a"],
        "-e",
        "rover_runtime_service_rate_hz=25",
    )
    assert run.rc == 0, run.report()
    second = current_release(host)
    assert second != first
    assert "0 bundle bytes sent" in _recap_line(run, "car1")  # the model was on the car already
    assert "gated: loop at" in _recap_line(run, "car1")
    m = wait_running(host, second)
    assert m["loop"]["rate_hz_target"] == 25.0
    assert releases(host)[second]["state"] == "good"
    # Back to the old config: the old release again (same bundle, runtime and config = same id), not rebuilt.
    run = _deploy_car1(deployed, bundles["a"])
    assert run.rc == 0, run.report()
    assert current_release(host) == first
    assert wait_running(host, first)["loop"]["rate_hz_target"] == 30.0


def test_a_two_camera_wheel_speed_bundle_drives_a_simulated_car(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A bundle from a car with a front and a rear camera whose state adds wheel speed: deployed, gated, and
    driven by the simulated car (synthetic cameras; the simulated firmware reports wheel speed)."""
    host = car(deployed, "car1")
    first = current_release(host)
    bundle = write_tiny_bundle(
        tmp_path / "two-cameras",
        "onnx",
        cameras=("front", "rear"),
        state_names=("steer", "throttle", "speed_mps"),
    )
    run = _deploy_car1(deployed, bundle)
    assert run.rc == 0, run.report()
    second = current_release(host)
    m = wait_running(host, second)
    assert set(m["cameras"]) == {"front", "rear"}
    assert m["state"]["names"] == ["steer", "throttle", "speed_mps"]
    assert m["state"]["sources"] == ["steering", "throttle", "wheel_speed_mps"]
    deadline = time.monotonic() + 30
    while not (m["driving"] and m["state"]["values"] and m["state"]["values"][2] > 0):
        assert time.monotonic() < deadline, m
        time.sleep(1)
        m = metrics(host)
    assert "wheel_speed" in m["serial"]["firmware"]
    run = _deploy_car1(deployed, bundles["a"])  # back to bundle a: its release again, not rebuilt
    assert run.rc == 0, run.report()
    assert current_release(host) == first


def test_an_executorch_bundle_drives_a_simulated_car_without_torch(
    deployed: Path, bundles: dict[str, Path], tiny_policy: Path, demo_dataset: Path
) -> None:
    """The static INT8 ExecuTorch bundle of the test policy on car1 (trixie, no torch): deployed through
    the gate, and driven by the car's ExecuTorch runtime (rover_executorch)."""
    host = car(deployed, "car1")
    first = current_release(host)
    assert host.run("/opt/rover/venv/bin/python -c 'import torch'").rc != 0  # this car has no torch
    bundle = tiny_bundle(tiny_policy, demo_dataset, "static-executorch")
    run = _deploy_car1(deployed, bundle)
    assert run.rc == 0, run.report()
    m = wait_running(host, current_release(host))
    assert (m["bundle"]["backend"], m["bundle"]["mode"]) == ("executorch", "static")
    assert m["bundle"]["content_hash"] == content_hash(bundle)
    wait_driving(host)
    run = _deploy_car1(deployed, bundles["a"])
    assert run.rc == 0, run.report()
    assert current_release(host) == first


def test_a_bundle_asking_for_a_state_the_car_cannot_supply_never_reaches_current(
    deployed: Path, tmp_path: Path
) -> None:
    host = car(deployed, "car1")
    first = current_release(host)
    bundle = write_tiny_bundle(tmp_path / "odometer", "onnx", state_names=("steer", "throttle", "odometer"))
    run = _deploy_car1(deployed, bundle)
    assert run.rc != 0, run.report()
    assert (
        "the bundle asks for inputs this car's runtime.toml cannot supply: the bundle's state cannot be "
        "supplied: state 'odometer' has no source" in run.text
    ), run.report()
    assert current_release(host) == first
    assert leftovers(host) == []


def test_config_the_runtime_refuses_never_reaches_the_car(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    before = current_release(host)
    run = _deploy_car1(
        deployed,
        bundles["a"],
        "-e",
        "rover_runtime_service_rate_hz=5000",
    )
    assert run.rc != 0, run.report()
    assert (
        "runtime.toml refused by the runtime of this release: config control.rate_hz: must be <= 1000"
        in run.text
    ), run.report()
    assert current_release(host) == before
    assert leftovers(host) == []


def test_failed_gate_rolls_back_to_the_last_good_release(deployed: Path, bundles: dict[str, Path]) -> None:
    canary, other = car(deployed, "car1"), car(deployed, "car2")
    good = current_release(canary)
    other_before = current_release(other)
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={bundles['gate-fails']}",
        "-e",
        "rover_health_timeout_s=20",
    )
    assert run.rc != 0, run.report()
    assert "health gate FAILED" in run.text, run.report()
    assert f"rolled back to release {good}, which is running" in run.text, run.report()
    # The reason is the runtime's own (`rover-runtime check` as the service user): the model's output
    # does not match its manifest.
    line = _recap_line(run, "car1")
    assert "the manifest says [1, 9, 2]" in line, line
    # The canary is back on the last good release and serving it; the failed release is recorded as bad.
    assert current_release(canary) == good
    wait_running(canary, good)
    bad = [r for r, info in releases(canary).items() if info["bundle"] == content_hash(bundles["gate-fails"])]
    assert len(bad) == 1
    assert releases(canary)[bad[0]]["state"] == "bad"
    assert "the manifest says [1, 9, 2]" in releases(canary)[bad[0]]["reason"]
    assert line.startswith(
        f"FAILED: car1: health gate FAILED on release {bad[0]} (rolled back to release {good}"
    )
    # The rollout stopped after the canary.
    assert _recap_line(run, "car2").startswith("not attempted")
    assert current_release(other) == other_before
    assert not other.file(f"{RELEASES}/bundles/{content_hash(bundles['gate-fails'])}").exists

    # The failed release named explicitly is refused (while it is still on the car: cleanup removes bad
    # releases first).
    run = run_playbook(
        deployed, "rollback.yml", *FORCE, "--limit", "car1", "-e", f"rover_rollback_release={bad[0]}"
    )
    assert run.rc != 0, run.report()
    assert "not rolling back to it" in run.text, run.report()
    assert current_release(canary) == good
    # A good release on top; rollback.yml then goes to the newest GOOD release before it, never the bad one.
    run = _deploy_car1(deployed, bundles["b"])
    assert run.rc == 0, run.report()
    b_release = current_release(canary)
    run = run_playbook(deployed, "rollback.yml", *FORCE, "--limit", "car1")
    assert run.rc == 0, run.report()
    assert current_release(canary) == good
    wait_running(canary, good)
    # Forward again to b by name.
    run = run_playbook(
        deployed, "rollback.yml", *FORCE, "--limit", "car1", "-e", f"rover_rollback_release={b_release[:8]}"
    )
    assert run.rc == 0, run.report()
    assert current_release(canary) == b_release


def test_rollback_needs_a_limit_or_the_whole_fleet_named(deployed: Path) -> None:
    before = {name: current_release(car(deployed, name)) for name in ALL_CARS}
    run = run_playbook(deployed, "rollback.yml", *FORCE)
    assert run.rc != 0, run.report()
    assert "name them with --limit" in run.text, run.report()
    assert {name: current_release(car(deployed, name)) for name in ALL_CARS} == before
    run = run_playbook(
        deployed, "rollback.yml", *FORCE, "--limit", "car2", "-e", "rover_rollback_release=ffffnothere"
    )
    assert run.rc != 0, run.report()
    assert "ffffnothere" in run.text, run.report()


def _broken_source(tmp_path: Path) -> Path:
    """A copy of the rover_runtime sources whose vehicle loop raises at start (a broken runtime release)."""
    source = tmp_path / "broken-source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "rover_runtime", source / "rover_runtime", ignore=shutil.ignore_patterns("__pycache__")
    )
    loop = source / "rover_runtime" / "vehicle.py"
    text = loop.read_text()
    marker = "    def _loop(self, max_cycles: int | None) -> None:\n"
    assert marker in text
    loop.write_text(
        text.replace(marker, marker + '        raise RuntimeError("broken runtime release (test)")\n')
    )
    return source


def test_broken_runtime_is_rolled_back_with_its_release(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The same model and config with a broken rover_runtime: a new release, which fails its gate; the
    rollback brings back the old runtime too (each release holds its own code)."""
    host = car(deployed, "car1")
    good = current_release(host)
    run = _deploy_car1(
        deployed,
        bundles["b"],
        "-e",
        f"rover_runtime_service_source={_broken_source(tmp_path)}",
        "-e",
        "rover_health_timeout_s=20",
    )
    assert run.rc != 0, run.report()
    assert "broken runtime release (test)" in run.text, run.report()  # from the journal
    assert f"rolled back to release {good}, which is running" in run.text, run.report()
    assert current_release(host) == good
    wait_running(host, good)
    environ = host.check_output(f"tr '\\0' '\\n' < /proc/{metrics(host)['pid']}/environ")
    assert f"PYTHONPATH={RELEASES}/releases/{good}/lib" in environ.splitlines()


def test_three_cars_in_one_batch_one_failing(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """One batch of three; car2's serial port is wrong, so its restart fails (the release's firmware finds no
    Arduino to check or flash at that port): car2 is rolled back to its release (whose firmware step finds
    the board) and reported failed naming the port, car1 and car3 are deployed, and the recap names each."""
    overlay = tmp_path / "car2-broken.yml"
    overlay.write_text("all:\n  hosts:\n    car2:\n      rover_runtime_service_serial_port: /dev/ttyNOPE\n")
    before = current_release(car(deployed, "car2"))
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-i",
        str(overlay),
        "-e",
        f"rover_deploy_bundle={bundles['c']}",
        "-e",
        '{"rover_deploy_serial": [3]}',
        "-e",
        "rover_health_timeout_s=20",
    )
    assert run.rc != 0, run.report()
    for name in ("car1", "car3"):
        assert _recap_line(run, name).startswith("ok: deployed release"), _recap_line(run, name)
        assert current_bundle(car(deployed, name)) == content_hash(bundles["c"])
    line = _recap_line(run, "car2")
    assert line.startswith("FAILED"), line
    assert "/dev/ttyNOPE does not exist: no Arduino on this car" in line, line
    assert current_release(car(deployed, "car2")) == before
    wait_running(car(deployed, "car2"), before)


def _results(run: PlaybookRun, task: str) -> list[str]:
    """The result lines (ok/changed/fatal) of every run of the task named `task`."""
    found: list[str] = []
    for section in run.stdout.split("TASK [")[1:]:
        header, _, body = section.partition("\n")
        if task in header:
            lines = body.splitlines()
            found += [line for line in lines if line.startswith(("ok: [", "changed: [", "fatal: ["))]
    return found


def test_an_unreachable_canary_does_not_stop_the_rollout(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A car that is switched off comes first in the inventory, so it would be the canary of a rollout of one
    car then the rest: it is reported unreachable and named at the end, and the cars that answer are deployed
    (the first of them as the canary). The controller's work (verify and sign the bundle, build the wheel) is
    done once for the run, not once per batch."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    ghost = {"ghost": {"ansible_host": "127.0.0.1", "ansible_port": closed_port, "ansible_user": "pi"}}
    bundle = make_bundle(tmp_path / "new", chunk_size=13)
    overlay = tmp_path / "ghost-first.yml"
    overlay.write_text(yaml.safe_dump({"all": {"children": {"rovers": {"hosts": ghost}}}}))
    run = run_playbook(
        overlay,  # first: the ghost is the first car of the rovers group
        "deploy.yml",
        "-i",
        str(deployed),
        *FORCE,
        "--limit",
        "ghost,car1,car2",
        "-e",
        f"rover_deploy_bundle={bundle}",
        "-e",
        '{"rover_deploy_serial": [1, "100%"]}',
    )
    assert run.rc == 4, run.report()  # ansible-playbook's "some hosts were unreachable"
    assert _recap_line(run, "ghost").startswith("UNREACHABLE"), run.report()
    for name in ("car1", "car2"):
        assert _recap_line(run, name).startswith("ok: deployed release"), _recap_line(run, name)
        assert current_bundle(car(deployed, name)) == content_hash(bundle)
    assert "unreachable (1/3), not changed, run again for them: ghost" in run.stdout, run.report()
    assert len(_results(run, "Verify every sha256 of the bundle on the controller")) == 1, run.report()
    assert len(_results(run, "Build (or reuse) the wheel")) == 1, run.report()


def test_car_interrupted_after_its_switch_is_gated_by_the_rerun(
    deployed: Path, bundles: dict[str, Path]
) -> None:
    """`--tags rover_release` switches without restarting (what a run interrupted after its switch leaves);
    the car is then stopped. The next full run restarts it onto `current` and gates it."""
    host = car(deployed, "car1")
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "--limit",
        "car1",
        "--tags",
        "rover_release",
        "-e",
        f"rover_deploy_bundle={bundles['a']}",
    )
    assert run.rc == 0, run.report()
    switched = current_release(host)
    assert metrics(host)["release"]["id"] != switched  # still the old process
    host.check_output("systemctl stop rover-runtime")
    run = _deploy_car1(deployed, bundles["a"])
    assert run.rc == 0, run.report()
    assert "restarted and gated" in _recap_line(run, "car1"), _recap_line(run, "car1")
    wait_running(host, switched)
    assert releases(host)[switched]["state"] == "good"


def test_tags_run_each_phase_alone(deployed: Path, bundles: dict[str, Path]) -> None:
    for tag in ("rover_runtime_service", "rover_release", "rover_health"):
        run = run_playbook(
            deployed,
            "deploy.yml",
            *FORCE,
            "--limit",
            "car1",
            "--tags",
            tag,
            "-e",
            f"rover_deploy_bundle={bundles['a']}",
        )
        assert run.rc == 0, (tag, run.report())
    assert "gated" in _recap_line(run, "car1")  # --tags rover_health gates the car even when nothing changed


def test_concurrent_deploys_to_one_car_are_refused(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    first = subprocess.Popen(
        playbook_command(
            deployed,
            "deploy.yml",
            *FORCE,
            "--limit",
            "car1",
            "-e",
            f"rover_deploy_bundle={bundles['b']}",
            "-e",
            "rover_health_soak_s=20",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=playbook_env(deployed),
    )
    try:
        deadline = time.monotonic() + 120
        while not host.file(f"{RELEASES}/.deploy.lock").exists:
            assert first.poll() is None, "the first deploy ended before it took the lock"
            assert time.monotonic() < deadline, "the first deploy never took the lock"
            time.sleep(0.5)
        second = _deploy_car1(deployed, bundles["c"])
        assert second.rc != 0
        # The lock's own sentence, in the recap too (not "non-zero return code").
        assert _recap_line(second, "car1").startswith("LOCKED: deploy lock held by "), second.report()
        assert "another deploy is running on this car" in _recap_line(second, "car1")
    finally:
        out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-4000:]
    assert current_bundle(host) == content_hash(bundles["b"])
    assert leftovers(host) == []


def test_full_disk_during_the_push_leaves_the_old_release_serving(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The car's bundle store fills up while the new bundle is copied: the deploy fails with the error, the
    old release keeps running, and nothing half-written stays behind."""
    host = car(deployed, "car1")
    before = current_release(host)
    store = f"{RELEASES}/bundles"
    pid = container_pid(deployed, "car1")
    enter = ["nsenter", "-t", str(pid), "-m", "--", "sh", "-c"]
    # A full file system over the bundle store, holding the bundles it had.
    subprocess.run(
        [
            *enter,
            f"mkdir -p /run/fullfs && mount -t tmpfs -o size=256k tmpfs /run/fullfs && "
            f"cp -a {store}/. /run/fullfs/ && mount --bind /run/fullfs {store} && "
            f"(dd if=/dev/zero of={store}/.filler bs=4k 2>/dev/null || true)",
        ],
        check=True,
    )
    try:
        big = make_bundle(tmp_path / "big", chunk_size=15)
        run = _deploy_car1(deployed, big)
        assert run.rc != 0, run.report()
        assert "No space left on device" in run.text, run.report()
        assert current_release(host) == before
        assert host.service("rover-runtime").is_running
        assert metrics(host)["release"]["id"] == before
        assert leftovers(host) == []
    finally:
        subprocess.run([*enter, f"umount {store}; umount /run/fullfs; rmdir /run/fullfs"], check=False)
    run = _deploy_car1(deployed, big)
    assert run.rc == 0, run.report()


def test_first_release_that_fails_is_stopped(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car2")
    _wipe(deployed, "car2")
    run = run_playbook(
        deployed,
        "deploy.yml",
        "--limit",
        "car2",
        "-e",
        f"rover_deploy_bundle={bundles['gate-fails']}",
        "-e",
        "rover_health_timeout_s=20",
    )
    assert run.rc != 0, run.report()
    assert "no release that passed its gate to roll back to, so the service was stopped" in run.text, (
        run.report()
    )
    assert not host.service("rover-runtime").is_running
    assert releases(host)[current_release(host)]["state"] == "bad"
    run = run_playbook(deployed, "deploy.yml", "--limit", "car2", "-e", f"rover_deploy_bundle={bundles['a']}")
    assert run.rc == 0, run.report()
    wait_running(host, current_release(host))


def test_cleanup_keeps_good_releases_before_bad_ones(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    # Its inferences all raise: it never becomes healthy, and the gate gives up after its start time-out.
    run = _deploy_car1(deployed, bundles["gate-fails"], "-e", "rover_health_timeout_s=20")
    assert run.rc != 0, run.report()
    bad = [r for r, info in releases(host).items() if info["state"] == "bad"]
    assert bad, releases(host)
    for bundle in ("a", "b", "c"):
        run = _deploy_car1(deployed, bundles[bundle])
        assert run.rc == 0, run.report()
    kept = releases(host)
    assert len(kept) == 3  # rover_release_keep
    assert all(info["state"] == "good" for info in kept.values()), kept
    assert not set(bad) & set(kept)
    # Bundles no kept release uses are gone.
    used = {info["bundle"] for info in kept.values()}
    assert set(host.run(f"ls -A {RELEASES}/bundles").stdout.split()) == used


def _wait_active(host: Any, timeout_s: float = 60) -> None:
    """Until systemd says the runtime is active (the journal's tail when it is not within `timeout_s`)."""
    deadline = time.monotonic() + timeout_s
    while host.run("systemctl is-active rover-runtime").stdout.strip() != "active":
        assert time.monotonic() < deadline, journal(host)
        time.sleep(0.2)


def test_crash_loop_never_leaves_the_service_failed(deployed: Path) -> None:
    """More crashes in a row than the old start limit (10 per 300 s) allowed: systemd keeps restarting it.
    A runtime drop-in shortens the back-off so the test takes seconds; it is removed afterwards. It also
    shortens the stop timeout (the unit's is 20 s): on this machine's cgroup v1 a simulated car's systemd has
    no reliable "cgroup empty" event, and once in a cold run (1 kill of 12, 60 ms after a start) it waited in
    stop-sigterm for the then default 90 s with the runtime already gone, then restarted it."""
    host = car(deployed, "car1")
    dropin = "/run/systemd/system/rover-runtime.service.d"
    host.check_output(
        f"mkdir -p {dropin} && printf '[Service]\\nRestartSec=200ms\\nRestartSteps=0\\nTimeoutStopSec=5s\\n' "
        f"> {dropin}/fast.conf && systemctl daemon-reload && systemctl restart rover-runtime"
    )
    try:
        for _ in range(12):
            _wait_active(host)
            host.run("kill -KILL $(systemctl show -p MainPID --value rover-runtime)")
            time.sleep(0.3)
        _wait_active(host)
        assert int(host.check_output("systemctl show rover-runtime -p NRestarts --value")) >= 12
    finally:
        host.run(f"rm -rf {dropin} && systemctl daemon-reload && systemctl restart rover-runtime")
    # (A restart right after a stop can fail once with 219/CGROUP on cgroup v1; Restart= brings it back.)
    _wait_active(host)


SETTLE_PLAY = """
- name: Restart the runtime and wait for it to settle
  hosts: car1
  gather_facts: false
  become: true
  tasks:
    - name: Restart
      ansible.builtin.include_role:
        name: rover_runtime_service
        tasks_from: restart
      vars:
        rover_runtime_service_settle_timeout_s: 4
"""


def test_a_restart_that_does_not_come_up_fails_naming_the_units_state(deployed: Path, tmp_path: Path) -> None:
    """The restart the benchmark and a rollback use waits on the unit's state as data (the module
    rover_unit_state); a unit whose start is refused (its ExecCondition fails, as the release check refuses a
    car with no good release) is not active, and the failure names systemd's state and result."""
    host = car(deployed, "car1")
    play = tmp_path / "settle.yml"
    play.write_text(SETTLE_PLAY)
    run = run_playbook(deployed, str(play))
    assert run.rc == 0, run.report()
    wait_driving(host)
    dropin = "/run/systemd/system/rover-runtime.service.d"
    host.check_output(
        f"mkdir -p {dropin} && printf '[Service]\\nExecCondition=/bin/false\\n' > {dropin}/refuse.conf"
    )
    try:
        run = run_playbook(deployed, str(play))
        assert run.rc != 0, run.report()
        assert "rover-runtime.service is not active 4 s after its (re)start" in run.text, run.report()
        assert "ActiveState=inactive, SubState=dead, Result=exec-condition" in run.text, run.report()
    finally:
        host.run(f"rm -rf {dropin} && systemctl daemon-reload && systemctl restart rover-runtime")
    wait_driving(host)


# --- signed bundles: every new release's manifest.json.sig is checked on the car before it is published --


def _refused_on_the_car(deployed: Path, run: Any, bundle: Path, reason: str) -> None:
    """The canary refused `bundle` on the car with one line naming `reason`; nothing was switched."""
    assert run.rc != 0, run.report()
    assert "failed verification on the car and was not activated" in run.text, run.report()
    assert reason in run.text, run.report()
    canary = car(deployed, "car1")
    assert current_bundle(canary) != content_hash(bundle)
    assert not canary.file(f"{RELEASES}/bundles/{content_hash(bundle)}").exists
    assert leftovers(canary) == []
    assert metrics(canary)["bundle"]["content_hash"] == current_bundle(canary)
    # The rollout stopped at the canary: the other cars never saw the bundle.
    assert _recap_line(run, "car2").startswith("not attempted")
    assert not car(deployed, "car2").file(f"{RELEASES}/bundles/{content_hash(bundle)}").exists


@pytest.mark.parametrize("name", CARS)
def test_release_carries_the_controllers_signature(deployed: Path, name: str) -> None:
    host = car(deployed, name)
    allowed = host.file("/etc/rover/allowed_signers")
    assert allowed.user == "root"
    assert allowed.mode == 0o644
    public = Path(f"{signing_key()}.pub").read_text().split()[1]
    assert public in allowed.content_string
    check = host.run(
        "ssh-keygen -Y verify -f /etc/rover/allowed_signers -I rover-controller -n rover-bundle "
        f"-s {RELEASES}/current/bundle/manifest.json.sig < {RELEASES}/current/bundle/manifest.json"
    )
    assert check.rc == 0, check.stderr
    assert 'Good "rover-bundle" signature for rover-controller' in check.stdout + check.stderr


def test_unsigned_bundle_is_refused_on_the_car(deployed: Path, tmp_path: Path) -> None:
    unsigned = make_bundle(tmp_path / "unsigned", chunk_size=13)
    before = current_release(car(deployed, "car1"))
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={unsigned}",
        "-e",
        "rover_release_sign=false",
    )
    _refused_on_the_car(deployed, run, unsigned, "the bundle is not signed: no manifest.json.sig")
    assert current_release(car(deployed, "car1")) == before


def test_bundle_signed_with_another_key_is_refused_on_the_car(deployed: Path, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "other-key", chunk_size=13)
    other = new_signing_key(tmp_path / "keys" / "other")
    before = current_release(car(deployed, "car1"))
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={bundle}",
        "-e",
        f"rover_release_signing_key={other}",
    )
    _refused_on_the_car(deployed, run, bundle, 'manifest.json.sig is not a good "rover-bundle" signature')
    assert current_release(car(deployed, "car1")) == before


def test_manifest_changed_after_signing_is_refused_on_the_car(deployed: Path, tmp_path: Path) -> None:
    signed = make_bundle(tmp_path / "signed", chunk_size=13)
    sign_manifest(signed, signing_key())
    # Signed beforehand with the controller's key and sent as it is: accepted (staged only, no switch).
    before = current_release(car(deployed, "car1"))
    run = _deploy_car1(
        deployed, signed, "-e", "rover_release_sign=false", "-e", "rover_release_activate=false",
        "-e", "rover_firmware_manage=false",  # the firmware is not signed beforehand here
    )  # fmt: skip
    assert run.rc == 0, run.report()
    assert car(deployed, "car1").file(f"{RELEASES}/bundles/{content_hash(signed)}/manifest.json.sig").exists
    assert current_release(car(deployed, "car1")) == before
    # The same signature with the manifest changed afterwards (its file hashes still match: only the
    # signature can tell): refused.
    tampered = tmp_path / "tampered"
    shutil.copytree(signed, tampered)
    manifest = json.loads((tampered / "manifest.json").read_text())
    manifest["created_at"] = "2020-01-01T00:00:00+00:00"
    (tampered / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    assert content_hash(tampered) != content_hash(signed)  # the reader accepts it: hashes and sizes match
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={tampered}",
        "-e",
        "rover_release_sign=false",
    )
    _refused_on_the_car(deployed, run, tampered, "the manifest changed after signing")
    assert current_release(car(deployed, "car1")) == before


def _deploy_car1_in_background(
    inventory: Path, bundle: Path, *args: str, soak_s: int, new_session: bool = False
) -> subprocess.Popen[str]:
    """deploy.yml of `bundle` to car1, forced, with a soak of `soak_s`, started and left running, with
    SIGINT at its default as a terminal starts it (a test session run as a background job inherits SIGINT
    ignored, and the Ctrl-C tests would then interrupt nothing)."""
    return subprocess.Popen(
        ["env", "--default-signal=INT", *playbook_command(
            inventory, "deploy.yml", *FORCE, "--limit", "car1", "-e", f"rover_deploy_bundle={bundle}",
            "-e", f"rover_health_soak_s={soak_s}", *args,
        )],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=playbook_env(inventory),
        start_new_session=new_session,
    )  # fmt: skip


def _soaking(host: Any, good: str, deploy: subprocess.Popen[str], timeout: float = 180) -> str:
    """The release `deploy` switched to, once its runtime runs it and is healthy: the gate's first healthy
    sample (within its 1 s interval, once the gate runs) begins its soak. Before that a restart is a slow
    start the gate waits out, not a failure of the soak."""
    deadline = time.monotonic() + timeout
    while True:
        assert deploy.poll() is None, (deploy.communicate()[0] or "")[-4000:]
        assert time.monotonic() < deadline, "the deploy never reached its soak"
        trial = current_release(host)
        if trial != good and runs_healthy(metrics_if_any(host), trial):
            return trial
        time.sleep(0.5)


def _cut_the_soak(
    host: Any, good: str, deploy: subprocess.Popen[str], after_s: float, cut: Callable[[], object]
) -> tuple[str, str]:
    """`cut()` `after_s` into the soak of the release `deploy` switched to; (that release, the deploy's output
    once it ended). The deploy is killed if anything goes wrong before it ends by itself."""
    try:
        trial = _soaking(host, good, deploy)
        assert releases(host)[trial]["state"] == "trial"
        time.sleep(after_s)
        cut()
        out, _ = deploy.communicate(timeout=300)
    finally:
        _kill_run(deploy)
    return trial, out


def _signal_workers(deploy: subprocess.Popen[str], signum: int) -> list[int]:
    """Send `signum` to the session of each of `deploy`'s workers (ansible-playbook's children, each in its
    own session, which a signal to the run's process group never reaches); their pids."""
    workers = [child.pid for child in child_processes(deploy.pid)]
    for worker in workers:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker, signum)
    return workers


def _kill_run(deploy: subprocess.Popen[str]) -> None:
    """End `deploy` if it still runs (a test that failed meanwhile): ansible-playbook and each of its workers'
    sessions (a worker left running would hold car1's deploy lock against the next test)."""
    if deploy.poll() is not None:
        return
    _signal_workers(deploy, signal.SIGKILL)
    deploy.kill()
    deploy.communicate()


def _ctrl_c(deploy: subprocess.Popen[str]) -> str:
    """The terminal's Ctrl-C to `deploy`'s process group (its own session); its output once it has ended.

    ansible-core 2.21 forwards a Ctrl-C to its workers (each in its own session) from its signal handler,
    which misses a worker being forked at that moment (not yet alive to multiprocessing): that worker runs its
    task to its end and ansible-playbook waits for it at exit (a CI run sat there for > 300 s). The tests
    press Ctrl-C during a long soak, when no worker is being forked; should a run still be going 60 s later,
    they do what an operator does (Ctrl-C again: ansible-playbook has reset its handler, the second one ends
    it) and what ansible's handler meant to do (a Ctrl-C to each remaining worker's session), and warn."""
    os.killpg(deploy.pid, signal.SIGINT)
    try:
        return deploy.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        workers = _signal_workers(deploy, signal.SIGINT)
        os.killpg(deploy.pid, signal.SIGINT)
        warnings.warn(
            f"ansible-playbook still ran 60 s after Ctrl-C: pressed again, workers {workers} interrupted",
            stacklevel=2,
        )
        return deploy.communicate(timeout=120)[0]  # a hang guard


def test_ctrl_c_after_the_switch_then_the_same_deploy_converges(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """Ctrl-C in the operator's terminal after the switch (during the soak) leaves the run's lock on the
    car; the same deploy run again from the same controller sees that run's process has ended, takes its lock
    over and restarts and gates the release, without any flag."""
    host = car(deployed, "car1")
    assert _deploy_car1(deployed, bundles["a"]).rc == 0
    good = current_release(host)
    fresh = make_bundle(tmp_path / "fresh", chunk_size=17)
    # A soak no test run outlasts: the run cannot have ended by itself when Ctrl-C comes.
    deploy = _deploy_car1_in_background(deployed, fresh, soak_s=900, new_session=True)
    try:
        _soaking(host, good, deploy)
        time.sleep(3)  # into the gate's task
        out = _ctrl_c(deploy)
    finally:
        _kill_run(deploy)
    assert deploy.returncode != 0, out[-3000:]
    assert host.file(f"{RELEASES}/.deploy.lock").exists, out[-3000:]  # what the interrupted run left

    run = _deploy_car1(deployed, fresh)
    assert run.rc == 0, run.report()
    assert "process on the controller has ended (an interrupted run)" in run.text, run.report()
    switched = current_release(host)
    assert switched != good
    assert releases(host)[switched]["state"] == "good"
    wait_running(host, switched)
    assert leftovers(host) == []


def test_a_controller_without_proc_deploys_and_never_takes_over_a_live_runs_lock(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A controller without a process table in /proc (macOS; rover_release_controller_proc names a missing
    one here) deploys, recording no process in the lock. After Ctrl-C its run's lock cannot be told from a
    live run's, so the same deploy again is refused naming the holder (never taken over); with
    rover_release_break_lock it converges."""
    no_proc = ("-e", "rover_release_controller_proc=/nonexistent-proc")
    host = car(deployed, "car1")
    assert _deploy_car1(deployed, bundles["a"], *no_proc).rc == 0
    good = current_release(host)
    fresh = make_bundle(tmp_path / "fresh", chunk_size=18)
    deploy = _deploy_car1_in_background(deployed, fresh, *no_proc, soak_s=900, new_session=True)
    try:
        _soaking(host, good, deploy)
        owner = json.loads(host.file(f"{RELEASES}/.deploy.lock/owner.json").content_string)
        out = _ctrl_c(deploy)
    finally:
        _kill_run(deploy)
    assert "controller" not in owner, owner
    assert deploy.returncode != 0, out[-3000:]
    refused = _deploy_car1(deployed, fresh, *no_proc)
    assert refused.rc != 0
    assert _recap_line(refused, "car1").startswith("LOCKED: "), refused.report()
    run = _deploy_car1(deployed, fresh, *no_proc, "-e", "rover_release_break_lock=true")
    assert run.rc == 0, run.report()
    switched = current_release(host)
    assert releases(host)[switched]["state"] == "good"
    wait_running(host, switched)


def test_a_power_cut_during_the_soak_boots_the_last_good_release(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The battery dies 3 s into a new release's soak: at the next boot the car starts on its last good
    release, the cut one is `interrupted` (not left as the active, ungated release), and the same deploy run
    again takes over the dead run's lock (taken before the boot) and gates the release."""
    fleet = str(fleet_state(deployed)["name"])
    host = car(deployed, "car1")
    assert _deploy_car1(deployed, bundles["a"]).rc == 0
    good = current_release(host)
    assert releases(host)[good]["state"] == "good"
    fresh = make_bundle(tmp_path / "fresh", chunk_size=16)  # never on this car: a trial release
    deploy = _deploy_car1_in_background(deployed, fresh, soak_s=120)
    trial, out = _cut_the_soak(host, good, deploy, 3, lambda: power_off(fleet, "car1"))
    assert deploy.returncode != 0, out[-3000:]
    power_on(fleet, "car1")
    host = car(deployed, "car1")
    wait_running(host, good, timeout=120)
    assert current_release(host) == good
    state = releases(host)[trial]
    assert state["state"] == "interrupted", state
    assert "the car restarted during its trial" in state["reason"]
    assert f"release {trial} was on trial" in journal(host)  # the boot check says why, in the unit's journal
    assert host.file(f"{RELEASES}/.deploy.lock").exists  # the dead run's, from before the boot

    run = _deploy_car1(deployed, fresh)
    assert run.rc == 0, run.report()
    assert "it was taken before the car last booted" in run.text, run.report()
    assert current_release(host) == trial
    assert releases(host)[trial]["state"] == "good"
    wait_running(host, trial)
    assert leftovers(host) == []


def test_a_car_whose_releases_all_failed_stays_stopped_after_a_reboot(
    deployed: Path, bundles: dict[str, Path]
) -> None:
    """A first release that failed its gate stopped the service; a reboot does not start it again."""
    fleet = str(fleet_state(deployed)["name"])
    host = car(deployed, "car2")
    _wipe(deployed, "car2")
    run = run_playbook(
        deployed, "deploy.yml", "--limit", "car2", "-e", f"rover_deploy_bundle={bundles['gate-fails']}",
        "-e", "rover_health_timeout_s=20",
    )  # fmt: skip
    assert run.rc != 0, run.report()
    bad = current_release(host)
    power_off(fleet, "car2")
    power_on(fleet, "car2")
    host = car(deployed, "car2")
    deadline = time.monotonic() + 60
    while "no good release to start" not in journal(host):
        assert time.monotonic() < deadline, journal(host)
        time.sleep(1)
    assert not host.service("rover-runtime").is_running
    assert current_release(host) == bad
    assert releases(host)[bad]["state"] == "bad"
    run = run_playbook(deployed, "deploy.yml", "--limit", "car2", "-e", f"rover_deploy_bundle={bundles['a']}")
    assert run.rc == 0, run.report()
    wait_running(host, current_release(host))


def test_a_runtime_killed_during_the_soak_is_rolled_back_naming_the_restart(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A real soak, a real kill: the runtime is killed 10 s after it runs the release healthy (well into
    the 60 s soak, which the gate begins at its next sample, a task after the restart); systemd restarts it,
    and the gate fails the release naming the restart and rolls the car back."""
    host = car(deployed, "car1")
    assert _deploy_car1(deployed, bundles["a"]).rc == 0
    good = current_release(host)
    fresh = make_bundle(tmp_path / "killed", chunk_size=19)
    deploy = _deploy_car1_in_background(deployed, fresh, soak_s=60)
    trial, out = _cut_the_soak(
        host, good, deploy, 10, lambda: host.check_output("systemctl kill --signal=SIGKILL rover-runtime")
    )
    assert deploy.returncode != 0, out[-3000:]
    line = _recap_line(PlaybookRun(deploy.returncode, out), "car1")
    assert line.startswith("FAILED: "), line
    assert "the unit restarted during the soak" in line, line  # and, when it was seen down, how it ended
    assert f"rolled back to release {good}" in line, line
    assert current_release(host) == good
    assert releases(host)[trial]["state"] == "bad"
    assert "the unit restarted during the soak" in releases(host)[trial]["reason"]
    wait_running(host, good)


def test_a_car_at_85_degrees_fails_its_gate_naming_the_temperature(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    fleet = str(fleet_state(deployed)["name"])
    host = car(deployed, "car1")
    assert _deploy_car1(deployed, bundles["a"]).rc == 0
    good = current_release(host)
    fresh = make_bundle(tmp_path / "hot", chunk_size=20)
    set_thermal(fleet, "car1", ThermalReading(temp_c=85.0))
    try:
        run = _deploy_car1(deployed, fresh)
    finally:
        set_thermal(fleet, "car1", DEFAULT_THERMAL)
    assert run.rc != 0, run.report()
    line = _recap_line(run, "car1")
    assert "thermal: the SoC is at 85.0 °C, above the 80 °C limit" in line, line
    assert current_release(host) == good, line
    wait_running(host, good)


def test_a_car_that_drove_moments_ago_is_skipped(
    deployed: Path, bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The Arduino stops answering (its simulator frozen): the runtime goes to failsafe and stops driving. A
    deploy a moment later skips the car: it drove less than rover_release_driving_grace_s ago, and a brief
    failsafe does not mean the car is parked. The grace is 120 s here, not the default 10 s: on CI's two
    loaded cores ansible-playbook can take longer than 10 s from its start to the car's check, and the test
    is about the skip, not about how fast the playbook starts. A deploy that slow can also outlast the
    runtime's `failsafe.unhealthy_after_s`: its watchdog pings stop and systemd restarts it (by design,
    docs/runtime.md) while the Arduino is still frozen, so the drive's age is read before the deploy, and
    afterwards the car must drive on, on its release, once the Arduino answers again."""
    host = car(deployed, "car1")
    assert _deploy_car1(deployed, bundles["a"]).rc == 0
    before = current_release(host)
    other = make_bundle(tmp_path / "other", chunk_size=21)
    firmware = next(h for h in fleet_state(deployed)["hosts"] if h["name"] == "car1")["firmware"]["pid"]
    os.kill(firmware, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 20
        while (status := metrics(host))["driving"]:
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        assert status["driving_age_s"] is not None, "the car never drove"
        run = run_playbook(
            deployed,
            "deploy.yml",
            "--limit",
            "car1",
            "-e",
            f"rover_deploy_bundle={other}",
            "-e",
            json.dumps({"rover_release_driving_grace_s": 120}),
        )
        # What the car's runtime did while its Arduino stayed frozen through the deploy (for a failure).
        during = host.run("journalctl -u rover-runtime --since '-3min' --no-pager | tail -n 40").stdout
    finally:
        os.kill(firmware, signal.SIGCONT)
    assert run.rc == 0, run.report() + during  # a skip is not a failure
    line = _recap_line(run, "car1")
    assert line.startswith(
        "SKIPPED: driving (/run/rover/metrics.json: driving, or drove less than 120 s ago)"
    ), f"{line}\n{during}"
    assert current_release(host) == before, during
    wait_running(host, before, timeout=120)  # the Arduino answers again: it drives on, on its release
