"""playbooks/deploy.yml and playbooks/rollback.yml against two simulated cars (real ansible-playbook,
sshd, systemd, the firmware simulator on the serial pty). The tests run in order and share the fleet."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    RELEASES,
    car,
    content_hash,
    corrupt_copy,
    current_release,
    fleet_inventory,
    journal,
    make_bundle,
    metrics,
    new_signing_key,
    run_playbook,
    sign_manifest,
    signing_key,
)

pytestmark = [pytest.mark.fleet, pytest.mark.slow]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    good_a = make_bundle(root / "good-a", chunk_size=10)
    good_b = make_bundle(root / "good-b", chunk_size=12)
    return {
        "a": good_a,
        "b": good_b,
        "corrupt": corrupt_copy(good_b, root / "corrupt"),
        "gate-fails": make_bundle(root / "gate-fails", chunk_size=11, manifest_chunk_size=9),
    }


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Path:
    """The simulated fleet, provisioned (playbooks/provision.yml; a no-op when already done)."""
    inventory = fleet_inventory(request)
    run = run_playbook(inventory, "provision.yml", timeout=1800)
    assert run.rc == 0, run.stdout[-4000:]
    return inventory


@pytest.fixture(scope="module")
def deployed(fleet: Path, bundles: dict[str, Path]) -> Path:
    # The fleet is shared by the session: another test (the benchmark playbook) may have deployed to it.
    # These tests count releases, so start from a car with the service stopped and no release at all.
    for name in CARS:
        car(fleet, name).check_output(
            "systemctl stop rover-runtime || true; "
            f"rm -rf {RELEASES}/releases {RELEASES}/current {RELEASES}/previous"
        )
    run = run_playbook(fleet, "deploy.yml", "-e", f"rover_deploy_bundle={bundles['a']}")
    assert run.rc == 0, run.stdout[-4000:]
    return fleet


CARS = ("car1", "car2")
# A simulated car drives all the time (its policy commands throttle): swapping its model needs force.
FORCE = ("-e", "rover_deploy_force=true")


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
        "-p RestrictRealtime -p LimitRTPRIO -p CapabilityBoundingSet -p PrivateNetwork"
    )
    props = dict(line.split("=", 1) for line in show.splitlines())
    # No start rate limit: systemd keeps restarting a crashing runtime, it never stays failed for good.
    assert props["StartLimitIntervalUSec"] == "0", props
    assert props["Restart"] == "on-failure"
    # SCHED_FIFO for the control loop stays possible.
    assert props["RestrictRealtime"] == "no"
    assert props["LimitRTPRIO"] == "20"
    assert props["CapabilityBoundingSet"] == ""
    assert props["PrivateNetwork"] == "yes"
    # Without RestartSteps (systemd < 254: bookworm) the back-off is a fixed, longer wait.
    systemd = int(host.check_output("systemctl --version").split()[1])
    assert props["RestartUSec"] == ("2s" if systemd >= 254 else "10s"), (systemd, props)


@pytest.mark.parametrize("name", CARS)
def test_current_points_at_a_verified_release(deployed: Path, bundles: dict[str, Path], name: str) -> None:
    host = car(deployed, name)
    expected = content_hash(bundles["a"])
    assert current_release(host) == expected
    assert host.file(f"{RELEASES}/current").is_symlink
    # The release on the car verifies against its manifest with the car's own rover_runtime.
    check = host.run(
        "/opt/rover/venv/bin/python -c 'import sys; from rover_runtime.bundle import open_bundle; "
        f"print(open_bundle(sys.argv[1]).manifest.content_hash)' {RELEASES}/current"
    )
    assert check.rc == 0, check.stderr
    assert check.stdout.strip() == expected


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


def test_redeploy_unchanged_changes_nothing(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    model = f"{RELEASES}/current/model.onnx"
    before = host.check_output(f"stat -L -c '%i %Y' {model}")
    run = run_playbook(deployed, "deploy.yml", "-e", f"rover_deploy_bundle={bundles['a']}")
    assert run.rc == 0, run.stdout[-4000:]
    recap = run.recap()
    assert all(recap[name]["changed"] == 0 for name in CARS), recap
    assert run.text.count("unchanged, 0 bundle bytes sent") == len(CARS)
    assert host.check_output(f"stat -L -c '%i %Y' {model}") == before


def test_no_model_swap_while_driving(deployed: Path, bundles: dict[str, Path]) -> None:
    host = car(deployed, "car1")
    assert metrics(host)["driving"] is True
    run = run_playbook(deployed, "deploy.yml", "-e", f"rover_deploy_bundle={bundles['b']}")
    assert run.rc != 0
    assert "car1 is driving" in run.text
    assert current_release(host) == content_hash(bundles["a"])
    assert not host.file(f"{RELEASES}/releases/{content_hash(bundles['b'])}").exists


def test_check_mode_reports_the_switch_and_changes_nothing(deployed: Path, bundles: dict[str, Path]) -> None:
    run = run_playbook(deployed, "deploy.yml", "--check", *FORCE, "-e", f"rover_deploy_bundle={bundles['b']}")
    assert run.rc == 0, run.stdout[-4000:]
    assert run.recap()["car1"]["changed"] > 0
    host = car(deployed, "car1")
    assert current_release(host) == content_hash(bundles["a"])
    assert not host.file(f"{RELEASES}/releases/{content_hash(bundles['b'])}").exists


def test_corrupted_bundle_is_refused_on_the_controller(deployed: Path, bundles: dict[str, Path]) -> None:
    run = run_playbook(deployed, "deploy.yml", *FORCE, "-e", f"rover_deploy_bundle={bundles['corrupt']}")
    assert run.rc != 0
    assert "does not match its sha256 in the manifest" in run.text
    for name in CARS:
        assert current_release(car(deployed, name)) == content_hash(bundles["a"])


def test_corrupted_bundle_is_refused_on_the_car(deployed: Path, bundles: dict[str, Path]) -> None:
    """With the controller's sha256 check off, the car's own check refuses the bundle before activation."""
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={bundles['corrupt']}",
        "-e",
        "rover_release_verify_on_controller=false",
    )
    assert run.rc != 0
    assert "failed verification on the car and was not activated" in run.text
    assert "does not match its sha256" in run.text
    host = car(deployed, "car1")
    assert current_release(host) == content_hash(bundles["a"])
    assert host.run(f"ls -A {RELEASES}/releases").stdout.split() == [content_hash(bundles["a"])]
    # Rollout stopped at the canary: the second car never saw the bundle.
    assert "car2" not in run.recap() or run.recap()["car2"]["ok"] == 0
    assert metrics(host)["bundle"]["content_hash"] == content_hash(bundles["a"])
    assert host.service("rover-runtime").is_running


def test_failed_health_gate_rolls_back_the_canary_and_stops(deployed: Path, bundles: dict[str, Path]) -> None:
    bad = content_hash(bundles["gate-fails"])
    good = content_hash(bundles["a"])
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={bundles['gate-fails']}",
        "-e",
        "rover_health_timeout_s=30",
    )
    assert run.rc != 0
    assert "health gate FAILED" in run.text
    assert f"rolled back to release {good}" in run.text
    canary, other = car(deployed, "car1"), car(deployed, "car2")
    # The canary is back on the previous release and serving it.
    assert current_release(canary) == good
    assert canary.service("rover-runtime").is_running, journal(canary)
    m: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        # The restarted service writes its first metrics file a moment after it starts.
        if canary.file("/run/rover/metrics.json").exists:
            m = metrics(canary)
            if m["bundle"]["content_hash"] == good and m["healthy"]:
                break
        time.sleep(1)
    assert m, f"no metrics file within 30 s\n{journal(canary)}"
    assert m["bundle"]["content_hash"] == good
    assert m["healthy"]
    # The bad release stays on the canary (for inspection) but is not active.
    assert canary.file(f"{RELEASES}/releases/{bad}").is_directory
    # The rollout stopped after the canary: the other car was never touched.
    assert "car2" not in run.recap() or run.recap()["car2"]["ok"] == 0
    assert current_release(other) == good
    assert not other.file(f"{RELEASES}/releases/{bad}").exists


def test_rollback_playbook_back_one_and_to_a_named_release(deployed: Path, bundles: dict[str, Path]) -> None:
    a, b = content_hash(bundles["a"]), content_hash(bundles["b"])
    run = run_playbook(deployed, "deploy.yml", *FORCE, "-e", f"rover_deploy_bundle={bundles['b']}")
    assert run.rc == 0, run.stdout[-4000:]
    assert all(current_release(car(deployed, n)) == b for n in CARS)

    run = run_playbook(deployed, "rollback.yml", "--limit", "car2")
    assert run.rc == 0, run.stdout[-4000:]
    assert current_release(car(deployed, "car2")) == a
    assert current_release(car(deployed, "car1")) == b  # not in --limit: untouched
    assert metrics(car(deployed, "car2"))["bundle"]["content_hash"] == a

    run = run_playbook(deployed, "rollback.yml", "--limit", "car2", "-e", f"rover_rollback_release={b[:10]}")
    assert run.rc == 0, run.stdout[-4000:]
    assert current_release(car(deployed, "car2")) == b

    run = run_playbook(
        deployed, "rollback.yml", "--limit", "car2", "-e", "rover_rollback_release=ffffnothere"
    )
    assert run.rc != 0
    assert '"ffffnothere" matches 0 releases' in run.text
    assert current_release(car(deployed, "car2")) == b


def test_crash_loop_never_leaves_the_service_failed(deployed: Path) -> None:
    """More crashes in a row than the old start limit (10 per 300 s) allowed: systemd keeps restarting it.
    A runtime drop-in shortens the back-off so the test takes seconds; it is removed afterwards."""
    host = car(deployed, "car1")
    dropin = "/run/systemd/system/rover-runtime.service.d"
    host.check_output(
        f"mkdir -p {dropin} && printf '[Service]\\nRestartSec=200ms\\nRestartSteps=0\\n' "
        f"> {dropin}/fast.conf && systemctl daemon-reload && systemctl restart rover-runtime"
    )
    try:
        for _ in range(12):
            deadline = time.monotonic() + 60
            while host.run("systemctl is-active rover-runtime").stdout.strip() != "active":
                assert time.monotonic() < deadline, journal(host)
                time.sleep(0.2)
            host.run("kill -KILL $(systemctl show -p MainPID --value rover-runtime)")
            time.sleep(0.3)
        deadline = time.monotonic() + 60
        while host.run("systemctl is-active rover-runtime").stdout.strip() != "active":
            assert time.monotonic() < deadline, journal(host)
            time.sleep(0.5)
        assert int(host.check_output("systemctl show rover-runtime -p NRestarts --value")) >= 12
    finally:
        host.run(f"rm -rf {dropin} && systemctl daemon-reload && systemctl restart rover-runtime")
    assert host.service("rover-runtime").is_running, journal(host)


# --- signed bundles: every new release's manifest.json.sig is checked on the car before it is published --


def _refused_on_the_car(deployed: Path, run: Any, bundle: Path, reason: str) -> None:
    """The canary refused `bundle` on the car with one line naming `reason`; nothing was switched."""
    assert run.rc != 0, run.stdout[-4000:]
    assert "failed verification on the car and was not activated" in run.text, run.stdout[-4000:]
    assert reason in run.text, run.stdout[-4000:]
    canary = car(deployed, "car1")
    before = current_release(canary)
    assert before != content_hash(bundle)
    assert not canary.file(f"{RELEASES}/releases/{content_hash(bundle)}").exists
    assert not canary.file(f"{RELEASES}/releases/.incoming-{content_hash(bundle)}").exists
    assert metrics(canary)["bundle"]["content_hash"] == before
    # The rollout stopped at the canary: the second car never saw the bundle.
    assert "car2" not in run.recap() or run.recap()["car2"]["ok"] == 0
    assert not car(deployed, "car2").file(f"{RELEASES}/releases/{content_hash(bundle)}").exists


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
        f"-s {RELEASES}/current/manifest.json.sig < {RELEASES}/current/manifest.json"
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
    run = run_playbook(
        deployed,
        "deploy.yml",
        *FORCE,
        "-e",
        f"rover_deploy_bundle={signed}",
        "-e",
        "rover_release_sign=false",
        "-e",
        "rover_release_activate=false",
    )
    assert run.rc == 0, run.stdout[-4000:]
    assert car(deployed, "car1").file(f"{RELEASES}/releases/{content_hash(signed)}/manifest.json.sig").exists
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
