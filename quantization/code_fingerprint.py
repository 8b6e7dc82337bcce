"""What the cached demo dataset, policy and bundles depend on: the code that makes them and the locked stack.

A cache entry is keyed by `code_fingerprint(...)` of the files that produce it, together with the controller's
lock (`requirements/controller.lock`, when this is a checkout) and the installed versions of the libraries
that do the numerical work. Any edit to that code, or another torch or lerobot, makes a new entry, so a test
never passes against an artifact that older code wrote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
LOCK_FILE = REPO_DIR / "requirements" / "controller.lock"
LIBRARIES = (
    "torch",
    "torchvision",
    "lerobot",
    "datasets",
    "numpy",
    "onnx",
    "onnxruntime",
    "executorch",
    "torchao",
)


def _installed(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def code_fingerprint(files: Iterable[Path], root: Path = REPO_DIR) -> str:
    """sha256 over `files` (their paths relative to `root`, then their contents), `root`'s lock file and the
    installed versions of the libraries."""
    digest = hashlib.sha256()
    for path in sorted({Path(f).resolve() for f in files}):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    lock = root / LOCK_FILE.relative_to(REPO_DIR)
    if lock.is_file():
        digest.update(b"lock\0" + lock.read_bytes())
    for package in LIBRARIES:
        digest.update(f"{package}={_installed(package)}\0".encode())
    return digest.hexdigest()


def package_files(*patterns: str, root: Path = REPO_DIR) -> list[Path]:
    """Files under `root` matching glob `patterns` relative to it (e.g. "quantization/*.py")."""
    return sorted({path for pattern in patterns for path in root.glob(pattern) if path.is_file()})
