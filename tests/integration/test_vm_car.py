"""A car with a kernel: one trixie VM car (`simfleet up --kind vm`) provisioned (through a power cut during
its venv install), deployed and driven through its USB-serial Arduino (ftdi_sio, the udev rule's
/dev/rover-arduino) and a V4L2 camera (/dev/video0), checked by the testinfra suite with its kernel-only
checks, both devices pulled and plugged back while it drives, a power cut during a deploy's soak (while the
black box writes), a reboot, and the benchmark and collect playbooks.

The `vm` stage of scripts/run-tests.sh (opt-in) runs those not marked `vm_extra` (the issue's CI minimum and
a reboot); `pytest -m vm` (or the `vm-all` stage) runs them all.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from deploy_helpers import (
    FORCE,
    RELEASES,
    REPO,
    make_bundle,
    playbook_command,
    playbook_env,
    run_infra_suite,
    run_playbook,
)

from simfleet.fleet import plug, power_off, power_on, status, target_for, unplug
from simfleet.image import DEFAULT_RELEASE
from simfleet.paths import images_dir
from simfleet.ssh import ssh_run
from simfleet.state import FleetState, load_state
from simfleet.testing import running_fleet
from simfleet.vm_image import VmImage, ensure_vm_image

pytestmark = pytest.mark.vm

FLEET = "pytest-vm"
BASE_PORT = 2391
VENV = "/opt/rover/venv"
INCOMPLETE = f"{VENV}/rover-install.incomplete"  # role rover_python: an install that has not finished


def test_a_guest_that_does_not_boot_is_named_with_its_console_and_nothing_is_left_running(
    tmp_path: Path,
) -> None:
    """The image's initramfs damaged (its first 64 KiB only, as a copy cut short): the guest's kernel
    panics, reboots and panics again. `up` says in one line that the car does not boot, shows how its last
    attempt ended, stops everything it started and leaves the image as it was. (Runs first: no fleet.)"""
    real, _ = ensure_vm_image(DEFAULT_RELEASE)
    cache = tmp_path / "cache"
    broken = VmImage(cache / "images" / real.path.name)
    broken.path.mkdir(parents=True)
    broken.disk.symlink_to(real.disk)
    broken.kernel.symlink_to(real.kernel)
    with real.initrd.open("rb") as whole:
        broken.initrd.write_bytes(whole.read(64 * 1024))
    for probe in images_dir().glob("kvm-probe-*.json"):  # the accelerator, as probed for this image
        (cache / "images" / probe.name).write_bytes(probe.read_bytes())
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in (real.disk, real.kernel, real.initrd)}
    name = f"{FLEET}-noboot"
    up = [sys.executable, "-m", "simfleet", "up", "--kind", "vm", "--hosts", "1", "--base-port", "2398"]
    result = subprocess.run(
        [*up, "--name", name],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "ROVER_CACHE": str(cache)},
        timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("simfleet: error:"))
    assert re.match(rf"simfleet: error: {name}/car1 does not boot: its kernel started \d+ times", error), (
        result.stderr
    )
    assert "(a reboot loop): Kernel panic - not syncing: " in error, error
    for left in (f"process=qemu-{name}-car1", str(cache / "fleets" / name)):  # QEMU, socat, firmware
        assert subprocess.run(["pgrep", "-f", left], capture_output=True, check=False).returncode == 1, left
    assert not (cache / "fleets" / name).exists()
    assert before == {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in before}


@pytest.mark.vm_extra
def test_a_bookworm_vm_car_boots_with_its_kernel_and_devices() -> None:
    """A bookworm car (Debian 12's kernel 6.1, whose virtio drivers are modules its initramfs must carry)
    boots, and its kernel makes the USB Arduino's ttyUSB0 and the camera's video0. (Before its own fleet:
    only one VM car runs at a time.)"""
    name = f"{FLEET}-bookworm"
    with running_fleet(name, hosts=1, base_port=2399, kind="vm", releases=("bookworm",)) as car:
        assert guest_out(car, "uname -r").startswith("6.1.")
        assert guest_out(car, "systemctl is-system-running --wait").strip() == "running"
        assert guest_out(car, "python3 --version").startswith("Python 3.11.")
        guest_out(car, "udevadm settle && test -c /dev/ttyUSB0 && test -c /dev/video0")


@pytest.fixture(scope="module")
def vm_fleet() -> Iterator[FleetState]:
    with running_fleet(FLEET, hosts=1, base_port=BASE_PORT, kind="vm") as state:
        yield state


def guest(state: FleetState, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`command` on car1 (as pi, through the remote shell)."""
    fresh = load_state(state.name)
    assert fresh is not None
    return ssh_run(target_for(fresh, fresh.host("car1")), [command], timeout=timeout)


def guest_out(state: FleetState, command: str) -> str:
    result = guest(state, command)
    assert result.returncode == 0, f"{command}: {result.stderr}"
    return result.stdout


def car_metrics(state: FleetState) -> dict[str, Any]:
    """The runtime's metrics file; {} while there is none (the runtime not started yet)."""
    result = guest(state, "cat /run/rover/metrics.json")
    return dict(json.loads(result.stdout)) if result.returncode == 0 else {}


def is_driving(state: FleetState) -> bool:
    return bool(car_metrics(state).get("driving"))


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.5)


def cut_the_power_during(
    state: FleetState,
    inventory: Path,
    playbook: tuple[str, ...],
    *,
    what: str,
    until: Callable[[], bool],
) -> None:
    """Runs `playbook` (its file and arguments) in the background; once `until()` holds (`what`, within
    20 min), poweroff --hard (a pulled battery) and the playbook must fail; then poweron (returns once sshd
    answers)."""
    run = subprocess.Popen(
        playbook_command(inventory, *playbook), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=playbook_env(inventory), cwd=REPO,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 1200
        while not until():
            assert run.poll() is None, (
                f"{playbook} ended before {what}: " + (run.communicate()[0] or "")[-4000:]
            )
            assert time.monotonic() < deadline, f"{playbook}: never {what}"
            time.sleep(1)
        power_off(state.name, "car1", hard=True)
        out, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode != 0, out[-3000:]
    power_on(state.name, "car1")


@pytest.fixture(scope="module")
def provisioned(vm_fleet: FleetState) -> Path:
    """The car provisioned the way a battery allows: the first provision.yml is cut (poweroff --hard) while
    pip unpacks the runtime's packages into the venv; after poweron the second run must finish the job."""
    inventory = Path(vm_fleet.inventory)

    def unpacking() -> bool:  # pip installing into the venv, past its first seconds
        if guest(vm_fleet, f"pgrep -f '{VENV}/bin/pip install'", timeout=20).returncode != 0:
            return False
        time.sleep(5)
        return guest(vm_fleet, f"test -e {INCOMPLETE}").returncode == 0

    cut_the_power_during(
        vm_fleet, inventory, ("provision.yml",), what="pip installing into the venv", until=unpacking
    )
    run = run_playbook(inventory, "provision.yml", timeout=1800)
    assert run.rc == 0, run.report()
    return inventory


def test_a_power_cut_during_the_venv_install_is_repaired_by_the_next_run(
    vm_fleet: FleetState, provisioned: Path
) -> None:
    """The run after the cut saw the install had not finished and installed every package again: the mark
    is gone and the venv's packages are whole (they import, pip finds nothing broken)."""
    assert guest(vm_fleet, f"test -e {INCOMPLETE}").returncode == 1
    guest_out(vm_fleet, f"{VENV}/bin/python -c 'import numpy, cv2, onnxruntime, serial'")
    guest_out(vm_fleet, f"{VENV}/bin/pip check")


@pytest.fixture(scope="module")
def driving(provisioned: Path, tmp_path_factory: pytest.TempPathFactory, vm_fleet: FleetState) -> str:
    """A release of a one-camera bundle deployed and gated; the runtime drives from /dev/video0 and
    /dev/rover-arduino. Returns the release id."""
    bundle = make_bundle(tmp_path_factory.mktemp("vm-release") / "bundle", chunk_size=10)
    run = run_playbook(provisioned, "deploy.yml", "-e", f"rover_deploy_bundle={bundle}", *FORCE)
    assert run.rc == 0, run.report()
    release = current(vm_fleet)
    assert release
    return release


def test_the_car_runs_its_own_kernel(vm_fleet: FleetState) -> None:
    report = status(FLEET)
    (host,) = report["hosts"]
    assert report["kind"] == "vm"
    assert host["running"]
    assert host["ssh"]
    assert host["accelerator"] in ("kvm", "tcg")
    assert guest_out(vm_fleet, "uname -r").strip() != os.uname().release
    assert guest_out(vm_fleet, "systemd-detect-virt").strip() in ("qemu", "kvm")
    assert guest_out(vm_fleet, "systemctl is-system-running --wait").strip() == "running"


def test_the_runtime_drives_through_the_usb_arduino_and_the_camera(
    vm_fleet: FleetState, driving: str
) -> None:
    wait_for("driving", lambda: is_driving(vm_fleet))
    m = car_metrics(vm_fleet)
    assert m["release"]["id"] == driving
    assert m["serial"]["port"] == "/dev/rover-arduino"
    assert m["serial"]["connected"]
    assert m["cameras"]["front"]["source"] == "camera 0"
    assert m["cameras"]["front"]["frames"] > 0


KERNEL_CHECKS = (
    "test_udev_names_the_usb_arduino",
    "test_the_camera_is_a_v4l2_capture_device",
    "test_the_runtimes_sandbox_holds_on_the_kernel",
)


def test_the_testinfra_suite_passes_on_the_vm_car_with_its_kernel_checks(
    vm_fleet: FleetState, driving: str
) -> None:
    """The suite a user runs against a real fleet, unchanged, on the VM car: the checks only a kernel can
    answer (skipped on container cars) pass here: udev named the USB Arduino by the role's rule (ids,
    serial number, group, mode), /dev/video0 answers VIDIOC_QUERYCAP as a capture device, and the running
    runtime's sandbox holds (systemd's rating, only `lo` in its network namespace, its own IPC one)."""
    run = run_infra_suite(Path(vm_fleet.inventory))
    assert run.rc == 0, run.report()
    for check in KERNEL_CHECKS:
        assert re.search(rf"^PASSED \S+::{check}\[", run.stdout, re.MULTILINE), run.report()


def test_a_pulled_arduino_is_named_and_comes_back_by_itself(vm_fleet: FleetState, driving: str) -> None:
    wait_for("driving", lambda: is_driving(vm_fleet))
    before = car_metrics(vm_fleet)["serial"]["reconnects"]
    unplug(FLEET, "car1", "arduino")
    try:
        wait_for(
            "the failsafe naming the serial link",
            lambda: (
                "serial: /dev/rover-arduino not connected" in car_metrics(vm_fleet)["failsafe"]["reasons"]
            ),
            timeout=30,
        )
        assert not car_metrics(vm_fleet)["driving"]
    finally:
        plug(FLEET, "car1", "arduino")
    wait_for("the link back", lambda: car_metrics(vm_fleet)["serial"]["reconnects"] > before, timeout=60)
    wait_for("driving again", lambda: is_driving(vm_fleet), timeout=60)
    assert guest(vm_fleet, "systemctl is-active rover-runtime").stdout.strip() == "active"


def test_a_pulled_camera_is_named_and_frames_resume(vm_fleet: FleetState, driving: str) -> None:
    wait_for("driving", lambda: is_driving(vm_fleet))
    before = car_metrics(vm_fleet)["cameras"]["front"]["reopens"]
    unplug(FLEET, "car1", "camera")
    try:
        wait_for(
            "the failsafe naming the camera",
            lambda: any("camera front" in r for r in car_metrics(vm_fleet)["failsafe"]["reasons"]),
            timeout=30,
        )
    finally:
        plug(FLEET, "car1", "camera")
    wait_for("the camera back", lambda: car_metrics(vm_fleet)["cameras"]["front"]["reopens"] > before, 60)
    wait_for("driving again", lambda: is_driving(vm_fleet), timeout=60)


def current(state: FleetState) -> str:
    return guest_out(state, f"readlink {RELEASES}/current").strip().rsplit("/", 1)[-1]


def release_states(state: FleetState) -> dict[str, str]:
    script = (
        "import json, pathlib\n"
        f"root = pathlib.Path('{RELEASES}/releases')\n"
        "print(json.dumps({d.name: json.loads((d / 'status.json').read_text())['state']\n"
        "                  for d in root.glob('[!.]*') if (d / 'status.json').exists()}))\n"
    )
    return dict(json.loads(guest_out(state, f"python3 -c {shlex.quote(script)}")))


@pytest.mark.vm_extra
def test_a_power_cut_during_the_soak_boots_the_last_good_release(
    vm_fleet: FleetState, provisioned: Path, driving: str, tmp_path: Path
) -> None:
    """The battery dies 3 s into a new release's soak, while the black box records: at the next boot (a
    real one: the kernel replays its file system's journal) the car drives its last good release, the cut
    release is `interrupted`, and the episode cut mid-write is recovered (or, too short, discarded)."""
    fresh = make_bundle(tmp_path / "fresh", chunk_size=16)
    trial = ""

    def soaking() -> bool:  # the new release runs: its soak has begun; then 3 s into it
        nonlocal trial
        trial = current(vm_fleet)
        if trial == driving or (car_metrics(vm_fleet).get("release") or {}).get("id") != trial:
            return False
        assert release_states(vm_fleet)[trial] == "trial"
        time.sleep(3)
        return True

    deploy = ("deploy.yml", *FORCE, "-e", f"rover_deploy_bundle={fresh}", "-e", "rover_health_soak_s=300")
    cut_the_power_during(vm_fleet, provisioned, deploy, what="in the new release's soak", until=soaking)
    wait_for("driving again", lambda: is_driving(vm_fleet), timeout=180)
    after = car_metrics(vm_fleet)
    assert after["release"]["id"] == driving
    assert current(vm_fleet) == driving
    recorder = after["recorder"]
    assert recorder["episodes_recovered"] + recorder["episodes_discarded"] >= 1, recorder
    assert recorder["last_error"] is None, recorder
    assert "recovery complete" in guest_out(vm_fleet, "sudo -n journalctl -k -b --no-pager")
    states = release_states(vm_fleet)
    assert states[driving] == "good"
    assert states[trial] == "interrupted", states


def test_a_car_that_reboots_comes_back_and_drives(vm_fleet: FleetState, driving: str) -> None:
    """`sudo reboot` (what a role's reboot does): the machine resets, boots again from its disk, the same
    QEMU keeps running, and the runtime drives its release again."""
    boot_id = guest_out(vm_fleet, "cat /proc/sys/kernel/random/boot_id").strip()
    qemu_before = _qemu_of(vm_fleet)
    guest(vm_fleet, "sudo -n systemctl reboot", timeout=30)
    wait_for(
        "the car back with a new boot",
        lambda: (
            guest(vm_fleet, "cat /proc/sys/kernel/random/boot_id", timeout=20).stdout.strip()
            not in ("", boot_id)
        ),
        timeout=300,
    )
    assert _qemu_of(vm_fleet) == qemu_before  # a reset, not a new machine
    wait_for("driving again", lambda: is_driving(vm_fleet), timeout=180)
    assert car_metrics(vm_fleet)["release"]["id"] == current(vm_fleet)


def _qemu_of(state: FleetState) -> int:
    fresh = load_state(state.name)
    assert fresh is not None
    qemu = fresh.host("car1").qemu
    assert qemu is not None
    return qemu.pid


@pytest.mark.vm_extra
def test_the_benchmark_and_collect_playbooks_run_on_the_vm_car(
    vm_fleet: FleetState, driving: str, tmp_path: Path
) -> None:
    """The fleet's other playbooks, unchanged: the car benchmarks its release (its own hostname and figures
    in the report) and brings its drives home (the episodes its black box finished, the one recovered
    after the power cut among them)."""
    inventory = Path(vm_fleet.inventory)
    bench = run_playbook(
        inventory, "benchmark.yml", "-e", "rover_benchmark_force=true",  # the car drives: stop it for this
        "-e", f"rover_benchmark_output_dir={tmp_path / 'bench'}",
        "-e", "rover_benchmark_iterations=10", "-e", "rover_benchmark_warmup=2",
    )  # fmt: skip
    assert bench.rc == 0, bench.report()
    (run_dir,) = (tmp_path / "bench" / "runs").iterdir()
    assert json.loads((run_dir / "car1.json").read_text())["hostname"] == "car1"
    store, dataset = tmp_path / "store", tmp_path / "dataset"
    collect = run_playbook(
        inventory,
        "collect.yml",
        "-e",
        f"rover_collect_store={store}",
        "-e",
        f"rover_collect_dataset={dataset}",
    )
    assert collect.rc == 0, collect.report()
    found = re.search(r"collected (\d+) new episode\(s\)", collect.text)
    assert found, collect.report()
    assert int(found.group(1)) >= 1, collect.report()


# libcamera's virtual camera (its `virtual` pipeline handler: a moving test pattern, frame buffers from the
# kernel's dma-buf heap or udmabuf, which the VM's Debian kernel has and a container car's host may not).
# Debian's libcamera 0.4 builds the handler in but ships no configuration: the test writes one. Small and
# slow: under TCG the pattern is drawn and converted instruction by instruction (at 640x480 and 30 fps, with a
# test run beside it, the car was too starved to pass its gate: inference p95 1.27 s, the loop at 4.2 Hz,
# frames up to 3.5 s old; at 320x240 it passed).
VIRTUAL_CAMERA = """%YAML 1.1
---
"Virtual0":
  supported_formats:
    - width: 320
      height: 240
      frame_rates:
        - 10
  test_pattern: "lines"
  location: "CameraLocationFront"
  model: "Virtual Video Device"
"""
VIRTUAL_CONFIG = "/usr/share/libcamera/pipeline/virtual/virtual.yaml"


def test_the_runtime_drives_from_a_libcamera_camera(
    vm_fleet: FleetState, driving: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """camera.source = "libcamera", as on a car with the Pi's camera module: provisioning installs
    python3-libcamera and gives the venv only that package and the video group the frame buffer heaps; a
    deploy's gate passes with the runtime (its sandbox, as the rover user) reading libcamera's virtual camera,
    with driver timestamps; then the car goes back to its V4L2 camera. Runs last: it changes the camera."""
    inventory = Path(vm_fleet.inventory)
    config = shlex.quote(VIRTUAL_CAMERA)
    guest_out(
        vm_fleet,
        f"sudo mkdir -p {Path(VIRTUAL_CONFIG).parent} && printf %s {config} | sudo tee {VIRTUAL_CONFIG}",
    )
    libcamera = ("-e", "rover_runtime_service_camera_source=libcamera")
    small = [
        f"rover_runtime_service_camera_{k}={v}" for k, v in (("width", 320), ("height", 240), ("fps", 10))
    ]
    run = run_playbook(
        inventory, "provision.yml", "--tags", "rover_python_libcamera", *libcamera, timeout=1800
    )
    assert run.rc == 0, run.report()
    guest_out(vm_fleet, f"{VENV}/bin/python -c 'import libcamera'")
    assert guest_out(vm_fleet, "stat -c %G:%a /dev/dma_heap/system").strip() == "video:660"
    # The venv sees libcamera and nothing else of the system's packages.
    assert guest(vm_fleet, f"{VENV}/bin/python -c 'import apt_pkg'").returncode != 0
    bundle = make_bundle(tmp_path_factory.mktemp("vm-libcamera") / "bundle", chunk_size=10)
    try:
        sized = [arg for setting in small for arg in ("-e", setting)]
        run = run_playbook(
            inventory, "deploy.yml", "-e", f"rover_deploy_bundle={bundle}", *FORCE, *libcamera, *sized
        )
        assert run.rc == 0, run.report()
        wait_for("driving from libcamera", lambda: is_driving(vm_fleet), timeout=120)
        front = car_metrics(vm_fleet)["cameras"]["front"]
        assert front["source"] == "libcamera camera 0", front
        assert front["frames"] > 0, front
        assert front["timestamps"] == "driver", front
        unit = guest_out(vm_fleet, "systemctl cat rover-runtime.service")
        assert "DeviceAllow=char-dma_heap rw" in unit
    finally:
        back = run_playbook(inventory, "deploy.yml", "-e", f"rover_deploy_bundle={bundle}", *FORCE)
        assert back.rc == 0, back.report()
