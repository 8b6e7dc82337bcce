"""What simfleet says about a car that does not come up: the boot log tail in its error (never an empty
message), a VM image without its kernel."""

from __future__ import annotations

from pathlib import Path

import pytest

from simfleet.errors import SimFleetError
from simfleet.host import log_tail
from simfleet.vm_image import take_boot_files


def test_the_tail_of_a_boot_log_is_its_last_lines_or_says_why_there_are_none(tmp_path: Path) -> None:
    log = tmp_path / "boot.log"
    assert log_tail(log) == "(no log)"
    log.write_text("")
    assert log_tail(log) == "(nothing yet: the car has written no line)"
    log.write_text("\n  \n")
    assert log_tail(log) == "(nothing yet: the car has written no line)"
    log.write_text("".join(f"line {i}\n" for i in range(40)))
    assert log_tail(log, lines=3) == "line 37\nline 38\nline 39"


@pytest.mark.parametrize("kernels", [0, 1, 2])
@pytest.mark.parametrize("initrds", [0, 1, 2])
def test_a_vm_image_takes_exactly_one_kernel_and_initramfs_or_names_what_it_found(
    kernels: int, initrds: int, tmp_path: Path
) -> None:
    """An image root whose kernel package is missing (or that holds two kernels) is refused with what its
    /boot holds, and nothing is copied; one kernel and one initramfs become vmlinuz and initrd.img."""
    boot = tmp_path / "root" / "boot"
    boot.mkdir(parents=True)
    for i in range(kernels):
        (boot / f"vmlinuz-6.12.{i}-amd64").write_bytes(b"kernel %d" % i)
    for i in range(initrds):
        (boot / f"initrd.img-6.12.{i}-amd64").write_bytes(b"initrd %d" % i)
    dest = tmp_path / "image"
    dest.mkdir()
    if (kernels, initrds) == (1, 1):
        take_boot_files(tmp_path / "root", dest)
        assert (dest / "vmlinuz").read_bytes() == b"kernel 0"
        assert (dest / "initrd.img").read_bytes() == b"initrd 0"
        return
    with pytest.raises(SimFleetError, match=r"expected one kernel and one initramfs in the image.s /boot"):
        take_boot_files(tmp_path / "root", dest)
    if kernels + initrds == 0:
        with pytest.raises(SimFleetError, match=r"found nothing$"):
            take_boot_files(tmp_path / "root", dest)
    assert list(dest.iterdir()) == []
