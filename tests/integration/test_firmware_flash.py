"""Flashing the car's Arduino for real: `rover-runtime firmware flash` runs avrdude through the bootloader of
a simulated board (the ATmega328P on simavr with Optiboot or the old Nano's ATmegaBOOT, its flash kept in a
file, reset when its port is opened), and the firmware that answers afterwards is the one just written.

Covered: a new board (no program) flashed; an upgrade to a new version and protocol and the rollback to the
old one; the flash skipped when the board already runs the image; a flash cut halfway (the bootloader stays,
the next flash succeeds); every board setting against both bootloaders (the right one flashes, a wrong one is
refused by the bootloader's silence and nothing is written); and images refused before the board is touched
(generated damage: checksums, truncation, a record that reaches the bootloader, another board or MCU, a sha256
that does not match, a port in use, no port), each with one line and the flash unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import serial

from fleet_firmware.build import build
from rover_runtime.firmware import (
    BOARDS,
    HEX_NAME,
    MANIFEST_NAME,
    avrdude_command,
    board_named,
    program_extent,
)
from simfleet.board import BOOTLOADERS, SimBoard, build_board

pytestmark = pytest.mark.slow

NEW = {"ROVER_FIRMWARE_VERSION": '"2.1.0"', "ROVER_PROTOCOL_VERSION": "3"}
PROGRAM_BYTES = 0x7E00  # the flash below Optiboot, compared before and after a refused flash


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for tool, package in (("avrdude", "avrdude"), ("avr-gcc", "gcc-avr avr-libc arduino-core-avr")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: apt-get install {package}")
    if not Path("/usr/include/simavr/sim_avr.h").exists():
        pytest.skip("simavr headers missing: apt-get install libsimavr-dev")
    root = tmp_path_factory.mktemp("firmware")
    build_board(root / "build")
    return root


@pytest.fixture(scope="module")
def images(builds: Path) -> Callable[[str, bool], Path]:
    """(board, new) -> a firmware directory: the sketch as it is (2.0.0, protocol 2), or built as 2.1.0 with
    protocol 3 (`new`)."""
    made: dict[tuple[str, bool], Path] = {}

    def image(board: str, new: bool = False) -> Path:
        if (board, new) not in made:
            out = builds / "images" / f"{board}-{'new' if new else 'old'}"
            made[board, new] = build(board, out, build_dir=builds / "build", defines=NEW if new else None)
        return made[board, new]

    return image


@pytest.fixture
def board(builds: Path, tmp_path: Path) -> Iterator[SimBoard]:
    """A new Uno (Optiboot, nothing flashed yet)."""
    with SimBoard(builds / "build", tmp_path / "flash.bin", tmp_path / "tty", "optiboot") as b:
        yield b


def firmware(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rover_runtime", "firmware", *args],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def flash(board: SimBoard, image: Path, *extra: str, setting: str = "uno") -> dict[str, Any]:
    run = firmware("flash", "--port", str(board.port), "--board", setting, "--firmware", str(image), *extra)
    report: dict[str, Any] = json.loads(run.stdout) if run.stdout.strip() else {}
    report["exit"], report["stderr"] = run.returncode, run.stderr
    return report


def answer(board: SimBoard) -> dict[str, Any] | None:
    run = firmware("identify", "--port", str(board.port))
    return json.loads(run.stdout)["answer"]


def program(board: SimBoard) -> bytes:
    """The flash below the bootloader, as the board last saved it."""
    return board.flash.read_bytes()[:PROGRAM_BYTES]


def test_a_new_board_answers_nothing_until_flashed_then_runs_the_image(
    board: SimBoard, images: Callable[[str, bool], Path]
) -> None:
    assert answer(board) is None
    report = flash(board, images("uno", False))
    assert report["exit"] == 0, report
    assert report["ok"]
    assert report["flashed"]
    assert report["attempts"] == 1
    assert report["before"] is None
    assert report["after"]["version"] == "2.0.0"
    assert report["after"]["protocol"] == 2
    assert answer(board) == report["after"]
    hex_size = board_named("uno").max_program_bytes
    assert program(board)[:16] != b"\xff" * 16
    assert len(program(board)) <= hex_size


def test_upgrade_to_a_new_version_and_protocol_then_roll_back(
    board: SimBoard, images: Callable[[str, bool], Path]
) -> None:
    assert flash(board, images("uno", False))["ok"]
    old_program = program(board)
    up = flash(board, images("uno", True))
    assert up["exit"] == 0, up
    assert up["flashed"], up
    assert (up["before"]["version"], up["after"]["version"], up["after"]["protocol"]) == ("2.0.0", "2.1.0", 3)
    assert answer(board)["version"] == "2.1.0"  # type: ignore[index]
    back = flash(board, images("uno", False))
    assert back["exit"] == 0, back
    assert back["flashed"], back
    assert back["after"]["version"] == "2.0.0"
    assert back["after"]["protocol"] == 2
    assert program(board) == old_program  # the same bytes as before the upgrade


def test_a_board_that_runs_the_image_is_not_flashed_unless_forced(
    board: SimBoard, images: Callable[[str, bool], Path]
) -> None:
    assert flash(board, images("uno", False))["ok"]
    resets = board.resets()
    same = flash(board, images("uno", False))
    assert same["exit"] == 0, same
    assert same["ok"], same
    assert not same["flashed"], same
    assert same["attempts"] == 0, same
    assert board.resets() == resets + 1  # only the identifying open
    forced = flash(board, images("uno", False), "--force")
    assert forced["ok"], forced
    assert forced["flashed"], forced


def _pages_written(board: SimBoard) -> int:
    data = program(board)
    return sum(data[i : i + 128] != b"\xff" * 128 for i in range(0, len(data), 128))


def test_a_flash_cut_halfway_leaves_the_bootloader_and_the_next_flash_succeeds(
    board: SimBoard, images: Callable[[str, bool], Path]
) -> None:
    """avrdude killed while it writes (a pulled cable, the car's power) onto a new board: part of the program
    is written, nothing answers, the bootloader is whole, and the next flash writes the image and the
    firmware answers with it."""
    image = images("uno", True)
    full = -(-program_extent((image / HEX_NAME).read_text(), "image") // 128)  # its 128-byte pages
    bootloader = board.flash.read_bytes()[PROGRAM_BYTES:]
    command = avrdude_command("avrdude", board_named("uno"), str(board.port), image / HEX_NAME)
    cut = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while _pages_written(board) < full // 3:  # a third written (the board saves within 50 ms)
            assert cut.poll() is None, "avrdude did not write a third"
            assert time.monotonic() < deadline, "avrdude did not write a third"
            time.sleep(0.02)
    finally:
        cut.kill()
        cut.wait()
    time.sleep(0.2)
    assert full // 3 <= _pages_written(board) < full - 2
    assert board.flash.read_bytes()[PROGRAM_BYTES:] == bootloader
    assert answer(board) is None  # half a program does not answer
    report = flash(board, image)
    assert report["exit"] == 0, report
    assert report["flashed"], report
    assert report["before"] is None
    assert report["after"]["version"] == "2.1.0"
    assert board.flash.read_bytes()[PROGRAM_BYTES:] == bootloader


@pytest.mark.parametrize("actual", sorted(BOOTLOADERS))
@pytest.mark.parametrize("setting", sorted(BOARDS))
def test_every_board_setting_against_every_bootloader(
    builds: Path, images: Callable[[str, bool], Path], tmp_path: Path, setting: str, actual: str
) -> None:
    """The board setting's bootloader and speed against the board's real one: the right one flashes; a wrong
    one gets no answer from the bootloader ("not in sync"), fails with one line, and writes
    nothing (the program is the one flashed before, which still answers)."""
    flash_file = tmp_path / "flash.bin"
    right = next(name for name, b in BOARDS.items() if b.bootloader == actual)
    with SimBoard(builds / "build", flash_file, tmp_path / "tty", actual) as b:
        assert flash(b, images(right, False), setting=right)["ok"]  # a program to keep
        before = program(b)
        # One attempt: avrdude's ten tries to sync at a wrong speed take a minute.
        report = flash(b, images(setting, True), "--attempts", "1", setting=setting)
        if BOARDS[setting].bootloader == actual:
            assert report["exit"] == 0, report
            assert report["after"]["version"] == "2.1.0", report
        else:
            assert report["exit"] == 1, report
            assert not report["ok"], report
            assert not report["flashed"], report
            assert report["attempts"] == 1
            assert report["error"].startswith("avrdude failed: avrdude error: ")
            assert report["error"].endswith(
                "(the bootloader never answered: a wrong board setting, or no bootloader)"
            )
            assert report["stderr"].splitlines()[-1].startswith("rover-runtime: flash failed: avrdude failed")
            assert program(b) == before
            assert answer(b)["version"] == "2.0.0"  # type: ignore[index]


def _records(hex_text: str) -> list[str]:
    return [line for line in hex_text.splitlines() if line]


def _record(address: int, kind: int, data: bytes) -> str:
    body = bytes([len(data)]) + address.to_bytes(2, "big") + bytes([kind]) + data
    return ":" + (body + bytes([-sum(body) & 0xFF])).hex().upper()


def _bad_checksum(text: str) -> str:
    lines = _records(text)
    line = lines[3]
    lines[3] = line[:-2] + f"{(int(line[-2:], 16) + 1) & 0xFF:02X}"
    return "\n".join(lines) + "\n"


def _flipped_data(text: str) -> str:
    lines = _records(text)
    line = lines[5]
    digit = "0" if line[9] != "0" else "1"
    lines[5] = line[:9] + digit + line[10:]
    return "\n".join(lines) + "\n"


# name -> (how the hex is damaged, how the manifest is changed, words of the refusal)
DAMAGE: dict[str, tuple[Callable[[str], str], Callable[[dict[str, Any]], None], str]] = {
    "checksum": (_bad_checksum, lambda m: None, "checksum mismatch"),
    "flipped data bit": (_flipped_data, lambda m: None, "checksum mismatch"),
    "truncated": (lambda t: "\n".join(_records(t)[:-20]) + "\n", lambda m: None, "no end-of-file record"),
    "not hex": (lambda t: t.replace(":", ";", 1), lambda m: None, "not an Intel hex record"),
    "over the bootloader": (
        lambda t: "\n".join([*_records(t)[:-1], _record(0x7E00, 0, b"\x00" * 16), _records(t)[-1]]) + "\n",
        lambda m: None,
        "would overwrite the bootloader",
    ),
    "another mcu": (lambda t: t, lambda m: m.update(mcu="m2560"), "built for the m2560"),
    "another board": (lambda t: t, lambda m: m.update(board="nano_old_bootloader"), "built for the board"),
    "sha256 of another image": (
        lambda t: t,
        lambda m: m.update(sha256="0" * 64),
        "is not the 000000000000... its firmware.json names",
    ),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_bad_image_is_refused_before_the_board_is_touched(
    board: SimBoard, images: Callable[[str, bool], Path], tmp_path: Path, damage: str
) -> None:
    before, resets = program(board), board.resets()
    bad = tmp_path / "bad"
    shutil.copytree(images("uno", True), bad)
    change_hex, change_manifest, words = DAMAGE[damage]
    text = change_hex((bad / HEX_NAME).read_text())
    (bad / HEX_NAME).write_text(text)
    manifest = json.loads((bad / MANIFEST_NAME).read_text())
    manifest["sha256"] = hashlib.sha256(text.encode()).hexdigest()  # the damage is in the image, not its sum
    change_manifest(manifest)
    (bad / MANIFEST_NAME).write_text(json.dumps(manifest))
    report = flash(board, bad, "--output", str(tmp_path / "result.json"))
    assert report["exit"] == 2, report
    assert report["stderr"].startswith("rover-runtime: firmware refused, the board untouched: ")
    assert words in report["stderr"], report["stderr"]
    assert report["stderr"].count("\n") == 1, report["stderr"]
    assert json.loads((tmp_path / "result.json").read_text())["ok"] is False
    assert board.resets() == resets  # never opened
    assert program(board) == before


def test_a_port_in_use_or_missing_is_refused(board: SimBoard, images: Callable[[str, bool], Path]) -> None:
    before = program(board)
    resets = board.resets() + 1  # with the open below
    with serial.Serial(str(board.port), 115200):  # the runtime, still driving
        deadline = time.monotonic() + 10
        while board.resets() < resets:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        report = flash(board, images("uno", True))
        assert report["exit"] == 2, report
        assert f"is open in process(es) {os.getpid()}" in report["stderr"], report
        assert "never flash a car that drives" in report["stderr"]
        assert board.resets() == resets
    missing = firmware(
        "flash", "--port", str(board.port) + "-gone", "--board", "uno", "--firmware", str(images("uno", True))
    )
    assert missing.returncode == 2
    assert "does not exist: no Arduino on this car" in missing.stderr
    assert program(board) == before


def test_a_bootloader_that_runs_past_the_flash_is_refused(builds: Path, tmp_path: Path) -> None:
    """Debian's own optiboot_atmega328.hex (arduino-core-avr 1.8.7, rebuilt with gcc-avr 5.4) runs past the
    end of the flash: no board can hold it, and the simulated board says so instead of starting (the build
    makes its own Optiboot from the same source, which fits)."""
    debian = Path("/usr/share/arduino/hardware/arduino/avr/bootloaders/optiboot/optiboot_atmega328.hex")
    run = subprocess.run(
        [str(builds / "build" / "simavr_board"), "--flash", str(tmp_path / "flash.bin"), "--link",
         str(tmp_path / "tty"), "--bootloader", str(debian), "--boot-address", "0x7e00"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "the bootloader does not fit" in run.stderr
    assert "outside the boot section 0x7e00..0x7fff" in run.stderr
    assert not (tmp_path / "flash.bin").exists()
    assert not (tmp_path / "tty").exists()


@pytest.mark.parametrize(
    ("image_board", "new", "car_board", "refusal"),
    [
        ("uno", False, None, None),
        ("uno", False, "nano", "built for the board 'uno', the car has 'nano'"),
        ("nano_old_bootloader", False, "nano_old_bootloader", None),
        ("uno", True, "uno", "speaks protocol 3, this runtime protocol 2: the car would not drive"),
    ],
)
def test_check_takes_only_firmware_the_car_would_drive_with(
    images: Callable[[str, bool], Path],
    image_board: str,
    new: bool,
    car_board: str | None,
    refusal: str | None,
) -> None:
    """`rover-runtime firmware check` (what a deploy runs on the controller and, with the release's own
    runtime, on the car): the image for the car's board (default: the one it is built for) that speaks this
    runtime's protocol, else exit 2 with one line; --output holds the same."""
    image = images(image_board, new)
    run = firmware("check", "--firmware", str(image), *(["--board", car_board] if car_board else []))
    if refusal is None:
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        assert report["ok"] is True
        assert report["board"] == image_board
        assert report["sha256"] == json.loads((image / MANIFEST_NAME).read_text())["sha256"]
    else:
        assert run.returncode == 2, run.stdout
        assert refusal in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def _build_uno(out: Path, build_dir: Path) -> str:
    return str(build("uno", out, build_dir=build_dir))


def test_builds_at_once_into_one_directory_take_turns_and_leave_an_unchanged_build_alone(
    builds: Path, tmp_path: Path
) -> None:
    """Two deploys of one controller (CI's fleet stage and its emulated car, an operator's two terminals)
    build the same firmware at once: they take turns on the build directory, and a build that is already
    there is left as it is, so a deploy copying it never finds it missing or half-replaced."""
    out = tmp_path / "uno"
    _build_uno(out, builds / "build")
    first = {p.name: p.stat().st_ino for p in out.iterdir()}
    with ProcessPoolExecutor(4) as pool:
        done = list(pool.map(_build_uno, [out] * 8, [builds / "build"] * 8))
    assert done == [str(out)] * 8
    assert {p.name: p.stat().st_ino for p in out.iterdir()} == first  # untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["sha256"] == hashlib.sha256((out / HEX_NAME).read_bytes()).hexdigest()


def test_a_build_with_settings_of_its_own_answers_a_version_that_names_them(builds: Path) -> None:
    """A car's wiring (its defines) is part of the version the board answers, so a deploy tells a board
    flashed with other settings apart and flashes it: the same settings give the same version and image, other
    settings another, and the version defines alone keep the plain version."""

    def version(name: str, **defines: str) -> tuple[str, str]:
        out = build("uno", builds / "settings" / name, build_dir=builds / "build", defines=defines)
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        return str(manifest["version"]), str(manifest["sha256"])

    plain, plain_sha = version("plain")
    no_receiver, no_receiver_sha = version("no-receiver", RC_RECEIVER="0")
    again, again_sha = version("again", RC_RECEIVER="0")
    other, _ = version("other", RC_RECEIVER="0", FAILSAFE_TIMEOUT_MS="300")
    bumped, _ = version("bumped", RC_RECEIVER="0", ROVER_FIRMWARE_VERSION='"2.1.0"')
    assert plain == "2.0.0"
    assert no_receiver.startswith("2.0.0+"), no_receiver
    assert (again, again_sha) == (no_receiver, no_receiver_sha)
    assert no_receiver_sha != plain_sha
    assert other.startswith("2.0.0+"), other
    assert other != no_receiver
    assert bumped == "2.1.0" + no_receiver[len("2.0.0") :]
    assert version("protocol-only", ROVER_PROTOCOL_VERSION="2")[0] == "2.0.0"
