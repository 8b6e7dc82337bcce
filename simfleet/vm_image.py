"""The disk image a virtual-machine car boots (`simfleet up --kind vm`), built once per release and cached.

The same Debian root as a container car (image.build_root: the same packages and `pi` user) plus Debian's
own kernel (linux-image-amd64, whose modules include ftdi_sio, usbserial, cdc_acm, uvcvideo and vivid) and
its initramfs, then what a machine needs that a container gets from the controller:

- `/etc/fstab` mounting the root by its label, systemd-networkd taking an address by DHCP from QEMU's
  user-mode network (DNS at 10.0.2.3), the ssh port forwarded from 127.0.0.1 on the controller;
- vivid, the kernel's virtual video driver, loaded at boot as one webcam-like capture device
  (/dev/video0), the car's camera;
- `simfleet-seed.service`: at the first boot it copies the car's identity (hostname, ssh host key, the
  fleet's key for `pi`, the Pi tool stand-ins) from a small read-only disk labelled `simseed` that
  `up` writes per car (vm.write_seed), so every car shares this image read-only and differs only there.

The result is `disk.raw` (a sparse ext4 file system, labelled rover-root), `vmlinuz` and `initrd.img` in
`$ROVER_CACHE/images/<release>-amd64-vm-<key>/`, made in `<that>.building` and renamed when complete.
Each car boots a copy-on-write qcow2 overlay of `disk.raw`: the image itself is never written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from simfleet.errors import SimFleetError
from simfleet.image import MASKED_UNITS, PACKAGES, build_root, check_release, chroot
from simfleet.paths import images_dir

log = logging.getLogger(__name__)

VM_IMAGE_VERSION = 1
ARCH = "amd64"
VM_PACKAGES = ("linux-image-amd64", "initramfs-tools")
DISK_SIZE = "8G"
ROOT_LABEL = "rover-root"
SEED_LABEL = "simseed"
# Where the seed disk's files go (copied over /) and the mark that they were.
SEED_DONE = "/var/lib/simfleet/seeded"
# The camera: one vivid instance with one video-capture node whose inputs are all webcams.
VIVID_OPTIONS = "n_devs=1 node_types=0x1 input_types=0x0"
PI_UID = 1000
# The initramfs holds only what mounting the root needs (Debian's default, MODULES=most, packs every
# storage and file-system driver: 36 MB, which QEMU keeps mapped for reboots, counted in every car's
# memory). The disk's drivers and ext4: modules in bookworm's kernel, virtio_pci built into trixie's (where
# loading it is a no-op).
INITRAMFS_FILES = {
    "/etc/initramfs-tools/conf.d/simfleet.conf": "# simfleet: the hook's modules only\nMODULES=list\n",
    "/etc/initramfs-tools/hooks/simfleet": """#!/bin/sh
# simfleet: a VM car's root is ext4 on a virtio disk.
case "$1" in prereqs) exit 0 ;; esac
. /usr/share/initramfs-tools/hook-functions
force_load virtio_pci
force_load virtio_blk
manual_add_modules ext4
""",
}

SEED_UNIT = f"""[Unit]
Description=simfleet: this car's identity from its seed disk (first boot only)
DefaultDependencies=no
After=local-fs.target
Before=sysinit.target ssh.service systemd-networkd.service
ConditionPathExists=!{SEED_DONE}

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/udevadm wait --timeout=60 /dev/disk/by-label/{SEED_LABEL}
ExecStart=/usr/bin/mkdir -p /run/simfleet-seed
ExecStart=/usr/bin/mount -o ro /dev/disk/by-label/{SEED_LABEL} /run/simfleet-seed
ExecStart=/usr/bin/cp -a /run/simfleet-seed/root/. /
ExecStart=/usr/bin/umount /run/simfleet-seed
ExecStart=/usr/bin/touch {SEED_DONE}

[Install]
WantedBy=sysinit.target
"""


@dataclass(frozen=True)
class VmImage:
    """A built image: its directory holds disk.raw, vmlinuz and initrd.img."""

    path: Path

    @property
    def disk(self) -> Path:
        return self.path / "disk.raw"

    @property
    def kernel(self) -> Path:
        return self.path / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.path / "initrd.img"

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.kernel, self.initrd))


def vm_image_key(release: str) -> str:
    packages = ",".join(PACKAGES + VM_PACKAGES)
    masked = ",".join(MASKED_UNITS)
    initramfs = json.dumps(INITRAMFS_FILES, sort_keys=True)
    text = f"vm{VM_IMAGE_VERSION}|{release}|{ARCH}|{packages}|{masked}|{DISK_SIZE}|{VIVID_OPTIONS}"
    text += f"|{initramfs}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def vm_image_path(release: str) -> VmImage:
    return VmImage(images_dir() / f"{release}-{ARCH}-vm-{vm_image_key(release)}")


def ensure_vm_image(release: str) -> tuple[VmImage, float]:
    """The cached image for `release` (built when missing) and the seconds spent building it."""
    check_release(release)
    image = vm_image_path(release)
    if image.complete():
        return image, 0.0
    image.path.parent.mkdir(parents=True, exist_ok=True)
    with image.path.with_name(image.path.name + ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two fleets coming up at once build it once
        if image.complete():
            return image, 0.0
        return image, _build(release, image)


def _build(release: str, image: VmImage) -> float:
    if shutil.which("mkfs.ext4") is None:
        raise SimFleetError("mkfs.ext4 not found: apt-get install e2fsprogs")
    tmp = image.path.with_name(image.path.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.monotonic()
    log.info("building the %s virtual-machine image in %s (once; cached)", release, image.path)
    root = tmp / "root"
    try:
        tmp.mkdir(parents=True)
        build_root(ARCH, release, root, PACKAGES + VM_PACKAGES, files_first=INITRAMFS_FILES)
        _customize_vm(root)
        take_boot_files(root, tmp)
        _make_disk(root, tmp / "disk.raw")
        shutil.rmtree(root)
        shutil.rmtree(image.path, ignore_errors=True)
        tmp.rename(image.path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.monotonic() - started
    log.info("virtual-machine image %s built in %.1f s", image.path.name, seconds)
    return seconds


def _customize_vm(root: Path) -> None:
    etc = root / "etc"
    uid = _uid_of(root, "pi")
    if uid != PI_UID:
        raise SimFleetError(
            f"the image's pi user has uid {uid}, expected {PI_UID} (the seed disk assumes it)"
        )
    (etc / "fstab").write_text(f"LABEL={ROOT_LABEL} / ext4 defaults,errors=remount-ro 0 1\n")
    network = etc / "systemd" / "network" / "10-simfleet.network"
    network.parent.mkdir(parents=True, exist_ok=True)
    network.write_text(
        "# simfleet: QEMU's user-mode network (address, gateway and DNS by DHCP).\n"
        "[Match]\nType=ether\n\n[Network]\nDHCP=ipv4\n"
    )
    resolv = etc / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text("nameserver 10.0.2.3\n")
    (etc / "modules-load.d" / "simfleet-camera.conf").write_text("# simfleet: the car's camera\nvivid\n")
    (etc / "modprobe.d").mkdir(exist_ok=True)
    (etc / "modprobe.d" / "simfleet-camera.conf").write_text(f"options vivid {VIVID_OPTIONS}\n")
    (etc / "systemd" / "system" / "simfleet-seed.service").write_text(SEED_UNIT)
    chroot(root, "systemctl", "enable", "--quiet", "simfleet-seed.service", "systemd-networkd.service")


def _uid_of(root: Path, user: str) -> int:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2])
    raise SimFleetError(f"{root}/etc/passwd has no user {user!r}")


def take_boot_files(root: Path, dest: Path) -> None:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    initrds = sorted((root / "boot").glob("initrd.img-*"))
    if len(kernels) != 1 or len(initrds) != 1:
        found = ", ".join(p.name for p in kernels + initrds) or "nothing"
        raise SimFleetError(f"expected one kernel and one initramfs in the image's /boot, found {found}")
    shutil.copyfile(kernels[0], dest / "vmlinuz")
    shutil.copyfile(initrds[0], dest / "initrd.img")


def _make_disk(root: Path, disk: Path) -> None:
    """An ext4 file system made from the root directory (mke2fs -d: no loop device, no mount)."""
    result = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-d", str(root), str(disk), DISK_SIZE],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SimFleetError(f"mkfs.ext4 -d {root} failed: {(result.stderr or result.stdout).strip()}")
