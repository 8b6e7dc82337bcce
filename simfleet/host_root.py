"""A host's writable root: an overlay of the cached image (instant, only changes use disk), or a full copy
where overlayfs cannot be mounted. Never delete a directory with a root still mounted under it."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

from simfleet.errors import SimFleetError

log = logging.getLogger(__name__)


def _decode_mount_path(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as octal.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def mounts_under(directory: Path) -> list[Path]:
    """Mount points at or below `directory`, deepest first."""
    base = directory.resolve()
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(_decode_mount_path(line.split()[4]))
        if point == base or base in point.parents:
            found.append(point)
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_all(directory: Path) -> None:
    for point in mounts_under(directory):
        result = subprocess.run(["umount", str(point)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log.warning("umount %s failed (%s); detaching it lazily", point, result.stderr.strip())
            subprocess.run(["umount", "--lazy", str(point)], capture_output=True, text=True, check=False)
    left = mounts_under(directory)
    if left:
        raise SimFleetError(f"cannot unmount {', '.join(map(str, left))}")


def remove_tree(directory: Path) -> None:
    """Unmounts whatever is mounted below `directory`, then deletes it (so an image is never touched)."""
    if directory.exists():
        unmount_all(directory)
        shutil.rmtree(directory)


def make_root(image: Path, host_dir: Path) -> Path:
    """Returns `host_dir/root`: an overlay with the image as its read-only lower layer, else a copy."""
    remove_tree(host_dir)
    root, upper, work = host_dir / "root", host_dir / "upper", host_dir / "work"
    for d in (root, upper, work):
        d.mkdir(parents=True)
    options = f"lowerdir={image},upperdir={upper},workdir={work}"
    result = subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        return root
    log.info("overlayfs not available (%s): copying the image instead", result.stderr.strip())
    root.rmdir()
    copy = subprocess.run(
        ["cp", "--reflink=auto", "-a", str(image), str(root)], capture_output=True, text=True, check=False
    )
    if copy.returncode != 0:
        raise SimFleetError(f"copying {image} to {root} failed: {copy.stderr.strip()}")
    return root
