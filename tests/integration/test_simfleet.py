"""The simulated fleet (simfleet): real systemd-nspawn hosts (Debian trixie and bookworm) with systemd, sshd,
sudo, a serial stand-in wired to the firmware simulator, and a vcgencmd stand-in. See docs/simulation.md."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from rover_runtime.protocol import Ack, Command, Telemetry, encode, parse_line
from simfleet import binfmt, fleet
from simfleet.errors import SimFleetError
from simfleet.fleet import FleetConfig, port_free, set_thermal, target_for, up
from simfleet.host import UNIT_DIR, units_with_credentials
from simfleet.host_root import mounts_under
from simfleet.image import DEFAULT_RELEASE, RELEASES
from simfleet.paths import fleet_dir
from simfleet.pi_tools import CPUFREQ_ROOT, THERMAL_ZONE_TEMP, ThermalReading
from simfleet.ports import metrics_port
from simfleet.processes import is_alive
from simfleet.ssh import ssh_run
from simfleet.state import FleetState, HostState, load_state
from simfleet.testing import fleet_lock, running_fleet

# This module's fleets are named and numbered after the session fleet's ($SIMFLEET_TEST_NAME, default
# "pytest"; $SIMFLEET_TEST_BASE_PORT, default 2321), so two test sessions on one machine do not collide.
NAME = os.environ.get("SIMFLEET_TEST_NAME", "pytest")
BASE_PORT = int(os.environ.get("SIMFLEET_TEST_BASE_PORT", "2321"))
# What each release's hosts run: Python (python3 --version), systemd (systemctl --version).
RELEASE_VERSIONS = {"trixie": ("Python 3.13.", "systemd 257 "), "bookworm": ("Python 3.11.", "systemd 252 ")}
# car1 trixie (the default release), car2 bookworm: every host test below covers both releases.
MIXED = ("trixie", "bookworm")


@pytest.fixture(scope="module")
def sim_fleet() -> Iterator[FleetState]:
    """This module's own two cars, a mixed fleet (`<name>-simfleet`, ports base+10, base+11; car1 trixie,
    car2 bookworm), overriding the session fleet: these tests check pristine hosts (governor, serial line
    counts), which the session fleet no longer is once the playbook tests have provisioned and deployed
    to it."""
    with running_fleet(f"{NAME}-simfleet", hosts=2, base_port=BASE_PORT + 10, releases=MIXED) as state:
        yield state


def run_on(fleet: FleetState, host: HostState, command: str, timeout: float = 60) -> str:
    result = ssh_run(target_for(fleet, host), [command], timeout=timeout)
    assert result.returncode == 0, f"{host.name}: {command!r} failed ({result.returncode}): {result.stderr}"
    return result.stdout.strip()


def read_status(host: HostState) -> dict[str, object]:
    return json.loads(Path(host.firmware_status).read_text())


# ---- bad input: refused before anything starts (no fleet needed) ----
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Bad_Name"}, "--name"),
        ({"hosts": 0}, "--hosts 0"),
        ({"hosts": 65}, "--hosts 65: must be 1..64"),
        ({"arch": "riscv64"}, "--arch"),
        ({"base_port": 80}, "--base-port 80"),
        ({"releases": ("sid",)}, r"--release 'sid': choose one of trixie, bookworm"),
        ({"releases": ()}, r"--release: give at least one"),
        ({"hosts": 1, "releases": ("trixie", "bookworm")}, r"2 releases for 1 host\(s\): at most 1"),
        ({"kind": "lxc"}, r"--kind 'lxc': choose nspawn or vm"),
        ({"kind": "vm", "arch": "arm64"}, r"--kind vm runs amd64 cars on an amd64 controller"),
        ({"arduino": "uno"}, r"--arduino 'uno': choose sim or board"),
        ({"arduino": "board", "kind": "vm"}, r"--arduino board runs on container cars only"),
        ({"arduino": "board", "transmitter": True}, r"--transmitter needs --arduino sim"),
    ],
)
def test_config_rejects_bad_options(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(SimFleetError, match=message):
        FleetConfig(**kwargs)


def test_trixie_is_the_default_and_releases_go_round_robin() -> None:
    assert DEFAULT_RELEASE == "trixie"
    assert set(RELEASE_VERSIONS) == set(RELEASES)
    assert FleetConfig().releases == ("trixie",)
    config = FleetConfig(hosts=3, releases=("trixie", "bookworm"))
    assert [config.release_of(i) for i in range(3)] == ["trixie", "bookworm", "trixie"]


@pytest.mark.parametrize("option", [["--release", "sid"], ["--release", "trixie,buster"]])
def test_cli_rejects_an_unknown_release_in_one_line(option: list[str], tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "simfleet", "up", "--name", f"{NAME}-bad", *option],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "ROVER_CACHE": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 2
    bad = option[1].split(",")[-1]
    assert result.stderr.splitlines() == [
        f"simfleet: error: argument --release: unknown release '{bad}': choose from trixie, bookworm "
        "(or a comma list of them)"
    ]
    assert not (tmp_path / "fleets" / f"{NAME}-bad").exists()


def test_emulated_hosts_empty_the_credential_settings_their_units_use(tmp_path: Path) -> None:
    units = tmp_path / UNIT_DIR
    units.mkdir(parents=True)
    (units / "systemd-journald.service").write_text("[Service]\nImportCredential=journal.*\n")
    (units / "systemd-sysusers.service").write_text("[Service]\nLoadCredential=a:b\nImportCredential=c\n")
    (units / "plain.service").write_text("[Service]\nExecStart=/bin/true\n")
    (units / "alias.service").symlink_to("systemd-journald.service")
    assert units_with_credentials(tmp_path) == {
        "systemd-journald.service": ["ImportCredential"],
        "systemd-sysusers.service": ["LoadCredential", "ImportCredential"],
    }


def test_qemu_versions_are_read_from_its_banner() -> None:
    assert binfmt._parse_version("qemu-aarch64 version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)") == (7, 2)
    assert binfmt._parse_version("qemu-aarch64 version 10.0.2 (Debian ...)") == (10, 0)
    assert binfmt._parse_version("nonsense") is None


def _fake_qemu(bindir: Path, banner: str) -> None:
    """A qemu-system-x86_64 that only prints `banner` for --version: an old QEMU cannot be installed here."""
    bindir.mkdir(parents=True, exist_ok=True)
    for tool in ("qemu-system-x86_64", "qemu-img"):
        (bindir / tool).write_text(f"#!/bin/sh\necho '{banner}'\n")
        (bindir / tool).chmod(0o755)


@pytest.mark.parametrize(
    ("banner", "message"),
    [
        (None, "simfleet: error: qemu-system-x86_64 not found: apt-get install qemu-system-x86 qemu-utils"),
        (
            "QEMU emulator version 6.2.0 (Debian 1:6.2+dfsg-2)",
            "simfleet: error: qemu-system-x86_64 6.2 is too old",
        ),
    ],
)
def test_vm_cars_without_a_usable_qemu_are_refused_in_one_line(
    banner: str | None, message: str, tmp_path: Path
) -> None:
    """No QEMU on PATH, or one too old: one line, before any image is built or anything started."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    if banner is not None:
        _fake_qemu(bindir, banner)
    cache = tmp_path / "cache"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simfleet",
            "up",
            "--kind",
            "vm",
            "--name",
            f"{NAME}-noqemu",
            "--base-port",
            "2397",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[2],
        env={**os.environ, "ROVER_CACHE": str(cache), "PATH": str(bindir)},
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr
    assert not (cache / "fleets" / f"{NAME}-noqemu").exists()
    assert not (cache / "images").exists()


@pytest.mark.parametrize("which", ["ssh", "metrics"])
def test_up_refuses_a_port_in_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, which: str) -> None:
    """A car's ssh port, or its node_exporter's (ssh + 10000), already taken: refused before anything runs."""
    monkeypatch.setenv("ROVER_CACHE", str(tmp_path))
    base = next(p for p in range(30000, 40000) if port_free(p) and port_free(metrics_port(p)))
    taken = base if which == "ssh" else metrics_port(base)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", taken))
        busy.listen()
        with pytest.raises(SimFleetError, match=rf"port\(s\) \[{taken}\] in use"):
            up(FleetConfig(name="pytest-busy", hosts=1, base_port=base, inventory=tmp_path / "hosts.yml"))
    assert load_state("pytest-busy") is None


def test_a_fleet_in_use_by_another_session_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ROVER_CACHE", str(tmp_path))
    message = rf"in use by another test session \(pid {os.getpid()}\)"
    with fleet_lock("pytest-lock"), pytest.raises(SimFleetError, match=message), fleet_lock("pytest-lock"):
        pass
    with fleet_lock("pytest-lock"):  # released at the end of the block
        pass


@pytest.mark.parametrize(("temp", "throttled"), [(130.0, "0x0"), (50.0, "50005"), (50.0, "0xZZ")])
def test_thermal_reading_rejects_bad_values(temp: float, throttled: str) -> None:
    with pytest.raises(SimFleetError):
        ThermalReading(temp_c=temp, throttled=throttled)


# ---- this module's mixed fleet: car1 trixie, car2 bookworm ----


@pytest.mark.fleet
def test_each_host_runs_its_release(sim_fleet: FleetState) -> None:
    assert [h.release for h in sim_fleet.hosts] == list(MIXED)
    assert sim_fleet.releases == list(MIXED)
    for host in sim_fleet.hosts:
        python, systemd = RELEASE_VERSIONS[host.release]
        assert run_on(sim_fleet, host, ". /etc/os-release; echo $VERSION_CODENAME") == host.release
        assert run_on(sim_fleet, host, "python3 --version").startswith(python)
        assert run_on(sim_fleet, host, "systemctl --version | head -n 1").startswith(systemd)
        assert Path(host.image).name.startswith(f"{host.release}-amd64-")


@pytest.mark.fleet
def test_inventory_and_status_name_each_hosts_release(sim_fleet: FleetState) -> None:
    inventory = yaml.safe_load(Path(sim_fleet.inventory).read_text())
    hosts = inventory["all"]["children"]["rovers"]["hosts"]
    assert {name: v["simfleet_release"] for name, v in hosts.items()} == {"car1": MIXED[0], "car2": MIXED[1]}
    report = fleet.status(sim_fleet.name, check_ssh=False)
    assert [h["release"] for h in report["hosts"]] == list(MIXED)
    assert report["releases"] == list(MIXED)


@pytest.mark.fleet
def test_a_unit_starts_and_stops_on_every_release(sim_fleet: FleetState) -> None:
    for host in sim_fleet.hosts:
        unit = "simfleet-probe"
        try:
            run_on(sim_fleet, host, f"sudo -n systemd-run --unit={unit} --service-type=simple sleep 600")
            assert run_on(sim_fleet, host, f"systemctl is-active {unit}") == "active"
            run_on(sim_fleet, host, f"sudo -n systemctl stop {unit}")
            stopped = ssh_run(target_for(sim_fleet, host), [f"systemctl is-active {unit}"], timeout=30)
            assert stopped.stdout.strip() in ("inactive", "unknown"), stopped.stdout
            assert run_on(sim_fleet, host, "pgrep -x sleep || true") == ""
        finally:
            ssh_run(target_for(sim_fleet, host), [f"sudo -n systemctl stop {unit} 2>/dev/null"], timeout=30)


@pytest.mark.fleet
@pytest.mark.parametrize("index", [0, 1])
def test_pi_logs_in_with_passwordless_sudo(sim_fleet: FleetState, index: int) -> None:
    host = sim_fleet.hosts[index]
    assert run_on(sim_fleet, host, "id -un; hostname") == f"pi\n{host.name}"
    assert run_on(sim_fleet, host, "sudo -n id -u") == "0"
    groups = run_on(sim_fleet, host, "id -Gn").split()
    assert {"sudo", "dialout", "video"} <= set(groups)


@pytest.mark.fleet
def test_systemd_is_pid1_and_the_system_is_running(sim_fleet: FleetState) -> None:
    for host in sim_fleet.hosts:
        assert run_on(sim_fleet, host, "cat /proc/1/comm") == "systemd"
        result = ssh_run(target_for(sim_fleet, host), ["systemctl is-system-running --wait"], timeout=60)
        assert result.stdout.strip() in ("running", "degraded"), result.stdout + result.stderr
        assert run_on(sim_fleet, host, "systemctl is-active ssh") == "active"


@pytest.mark.fleet
def test_sshd_listens_on_loopback_only(sim_fleet: FleetState) -> None:
    for host in sim_fleet.hosts:
        listeners = subprocess.run(
            ["ss", "-ltnH", f"sport = :{host.port}"], capture_output=True, text=True, check=True
        ).stdout
        addresses = {line.split()[3] for line in listeners.splitlines()}
        assert addresses == {f"127.0.0.1:{host.port}"}


@pytest.mark.fleet
def test_ansible_reaches_every_host_through_the_inventory(sim_fleet: FleetState, tmp_path: Path) -> None:
    ansible = Path(sys.executable).parent / "ansible"
    result = subprocess.run(
        [
            str(ansible),
            "-i",
            sim_fleet.inventory,
            "rovers",
            "-b",
            "-m",
            "ansible.builtin.command",
            "-a",
            "id -u",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # no project ansible.cfg: the inventory alone must be enough
        env={**os.environ, "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp")},
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for host in sim_fleet.hosts:
        assert f"{host.name} | CHANGED | rc=0 >>\n0\n" in result.stdout


@pytest.mark.fleet
def test_serial_lines_from_the_host_reach_the_firmware_sim(sim_fleet: FleetState) -> None:
    host = sim_fleet.hosts[0]
    assert run_on(sim_fleet, host, "test -c /dev/ttyUSB0 && echo tty") == "tty"
    # What the rover_serial udev rule gives a real Arduino (no udevd runs in a container): the runtime's
    # service user, in dialout, opens it without anything else being changed on the car.
    assert run_on(sim_fleet, host, "stat -L -c '%U:%G %a' /dev/ttyUSB0") == "root:dialout 660"
    before = read_status(host)
    assert before["connected"] is True
    seq = 4242
    line = encode(Command(seq=seq, steering_milli=300, throttle_milli=0)).decode().strip()
    run_on(sim_fleet, host, f"sudo sh -c \"printf '%s\\n' '{line}' > /dev/ttyUSB0\"")
    deadline = time.monotonic() + 10
    status = before
    while time.monotonic() < deadline:
        status = read_status(host)
        if status["last_seq"] == seq:
            break
        time.sleep(0.1)
    assert status["last_seq"] == seq, status
    assert int(status["rx_ok"]) == int(before["rx_ok"]) + 1  # type: ignore[call-overload]
    assert status["rx_bad"] == before["rx_bad"]


@pytest.mark.fleet
def test_the_firmware_sim_answers_back_into_the_host(sim_fleet: FleetState) -> None:
    host = sim_fleet.hosts[1]
    # Whatever the simulator sent (acks, periodic telemetry) arrives in the host on /dev/ttyUSB0.
    out = run_on(sim_fleet, host, "sudo timeout 5 head -n 6 /dev/ttyUSB0")
    messages = []
    for raw in out.splitlines():
        try:
            messages.append(parse_line(raw.encode()))
        except ValueError:
            continue  # the first line may have been cut when the buffer was full
    assert any(isinstance(m, Telemetry | Ack) for m in messages), out


@pytest.mark.fleet
def test_set_thermal_chooses_what_vcgencmd_reports(sim_fleet: FleetState) -> None:
    host = sim_fleet.hosts[1]
    assert run_on(sim_fleet, host, "vcgencmd measure_temp") == "temp=48.3'C"
    try:
        set_thermal(sim_fleet.name, host.name, ThermalReading(temp_c=85, throttled="0x50005"))
        assert run_on(sim_fleet, host, "vcgencmd measure_temp; vcgencmd get_throttled") == (
            "temp=85.0'C\nthrottled=0x50005"
        )
        assert run_on(sim_fleet, host, f"cat {THERMAL_ZONE_TEMP}") == "85000"
        assert run_on(sim_fleet, sim_fleet.hosts[0], "vcgencmd measure_temp") == "temp=48.3'C"
    finally:
        set_thermal(sim_fleet.name, host.name, ThermalReading(temp_c=48.3, throttled="0x0"))


@pytest.mark.fleet
def test_cpufreq_stand_in_looks_like_a_pi5_and_takes_a_governor(sim_fleet: FleetState) -> None:
    host = sim_fleet.hosts[0]
    governors = f"{CPUFREQ_ROOT}/cpu*/cpufreq/scaling_governor"
    assert run_on(sim_fleet, host, f"cat {governors}").split() == ["ondemand"] * 4
    assert "performance" in run_on(
        sim_fleet, host, f"cat {CPUFREQ_ROOT}/cpu0/cpufreq/scaling_available_governors"
    )
    try:
        run_on(sim_fleet, host, f"echo performance | sudo tee {governors} >/dev/null")
        assert run_on(sim_fleet, host, f"cat {governors}").split() == ["performance"] * 4
    finally:
        run_on(sim_fleet, host, f"echo ondemand | sudo tee {governors} >/dev/null")


@pytest.mark.fleet
def test_cli_status_and_errors(sim_fleet: FleetState) -> None:
    cli = [sys.executable, "-m", "simfleet"]
    result = subprocess.run(
        [*cli, "status", "--name", sim_fleet.name, "--json"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [h["host"] for h in report["hosts"]] == ["car1", "car2"]
    assert [h["release"] for h in report["hosts"]] == list(MIXED)
    assert all(h["running"] and h["ssh"] and h["serial"] and h["firmware_sim"] for h in report["hosts"])
    bad = subprocess.run(
        [*cli, "set-thermal", "--name", sim_fleet.name, "car9", "--temp", "50"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    expected = f"simfleet: error: fleet '{sim_fleet.name}' has no host 'car9' (hosts: car1, car2)"
    assert bad.stderr.strip() == expected
    text = subprocess.run(
        [*cli, "status", "--name", sim_fleet.name], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"car1 +trixie +port", text), text
    assert re.search(r"car2 +bookworm +port", text), text
    again = subprocess.run(
        [*cli, "up", "--name", sim_fleet.name, "--base-port", str(BASE_PORT + 70)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 2
    assert "is already up" in again.stderr


@pytest.mark.fleet
@pytest.mark.slow
def test_down_leaves_nothing_running(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    name, port = f"{NAME}-down", BASE_PORT + 50
    with running_fleet(name, hosts=1, base_port=port, inventory=inventory) as state:
        # The default release: trixie.
        assert state.hosts[0].release == "trixie"
        assert run_on(state, state.hosts[0], "python3 --version").startswith("Python 3.13.")
        procs = [p for h in state.hosts for p in (h.nspawn, h.init, h.socat, h.firmware) if p is not None]
        roots = [Path(h.root) for h in state.hosts]
        assert len(procs) == 4
        assert all(is_alive(p) for p in procs)
        assert inventory.is_file()
        assert mounts_under(fleet_dir(name)) == [Path(state.hosts[0].root)]  # the overlay
    assert not any(is_alive(p) for p in procs)
    assert not any(r.exists() for r in roots)
    assert mounts_under(fleet_dir(name)) == []
    assert not inventory.exists()
    assert load_state(name) is None
    assert not Path(f"/run/systemd/nspawn/propagate/{name}-car1").exists()
    assert fleet.port_free(port)  # nothing listens there any more


@pytest.mark.fleet
@pytest.mark.slow
def test_down_ends_a_container_whose_nspawn_was_killed(tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    port = BASE_PORT + 56
    with running_fleet(f"{NAME}-orphan", hosts=1, base_port=port, inventory=inventory) as state:
        host = state.hosts[0]
        assert host.nspawn is not None
        assert host.init is not None
        os.kill(host.nspawn.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while is_alive(host.nspawn) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not is_alive(host.nspawn)
        assert is_alive(host.init)  # the container outlives its nspawn process...
    assert not is_alive(host.init)  # ...until down ends it
    assert fleet.port_free(port)


@pytest.mark.fleet
@pytest.mark.slow
def test_a_host_that_does_not_answer_in_time_fails_up_with_its_boot_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(fleet.BOOT_TIMEOUT, "amd64", 0.0)  # sshd cannot be up the instant nspawn starts
    name = f"{NAME}-slow"
    config = FleetConfig(name=name, hosts=1, base_port=BASE_PORT + 54, inventory=tmp_path / "hosts.yml")
    with pytest.raises(SimFleetError, match=r"(?s)did not answer within 0 s; .*boot\.log ends with:\n.+"):
        up(config)
    assert load_state(name) is None  # what up had started was stopped and removed
    assert not (fleet_dir(name)).exists()
    assert not config.inventory.exists()


@pytest.mark.fleet
@pytest.mark.arm64
@pytest.mark.slow
def test_arm64_host_runs_aarch64_under_qemu_user() -> None:
    with running_fleet(f"{NAME}-arm64", hosts=1, arch="arm64", base_port=BASE_PORT + 60) as arm_fleet:
        host = arm_fleet.hosts[0]
        assert host.release == "trixie"
        machine = run_on(
            arm_fleet, host, "python3 -c 'import platform; print(platform.machine())'", timeout=120
        )
        assert machine == "aarch64"
        python, systemd = RELEASE_VERSIONS[host.release]
        assert run_on(arm_fleet, host, "python3 --version", timeout=120).startswith(python)
        assert run_on(arm_fleet, host, "systemctl --version | head -n 1", timeout=120).startswith(systemd)
        assert run_on(arm_fleet, host, "cat /proc/1/comm") == "systemd"
        # Not "degraded": the credential drop-ins keep the early units working under qemu-user.
        state = ssh_run(target_for(arm_fleet, host), ["systemctl is-system-running --wait"], timeout=120)
        assert state.stdout.strip() == "running", state.stdout + state.stderr
        assert run_on(arm_fleet, host, "sudo -n true && vcgencmd get_throttled") == "throttled=0x0"
        assert run_on(arm_fleet, host, "test -c /dev/ttyUSB0 && echo tty") == "tty"
