"""scripts/bootstrap.sh picks the controller's Python itself and refuses one below 3.12 without changing
anything (no venv is created). Only its interpreter search runs here: the cache has no venv, so the
search is the first thing it does after the (already installed) Debian packages."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BOOTSTRAP = REPO_ROOT / "scripts" / "bootstrap.sh"
SYSTEM_PYTHON_311 = Path("/usr/bin/python3.11")


def _bootstrap(cache: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "PYENV_ROOT")}
    return subprocess.run(
        ["bash", str(BOOTSTRAP)], env={**base, "ROVER_CACHE": str(cache), **env},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


# The system's own directories: python3.12 / python3.13 there (a trixie machine) would be found, so skip then.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SYSTEM_HAS_312 = any(shutil.which(name, path=SYSTEM_PATH) for name in ("python3.12", "python3.13"))


@pytest.mark.skipif(not SYSTEM_PYTHON_311.exists(), reason="needs a Python 3.11 to offer")
def test_python_below_312_is_refused_in_one_line(tmp_path: Path) -> None:
    done = _bootstrap(tmp_path / "cache", PYTHON=str(SYSTEM_PYTHON_311))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: PYTHON={SYSTEM_PYTHON_311} is not a working Python >= 3.12 (the controller needs it for "
        "lerobot 0.6 and ansible-core 2.21)"
    ]
    assert not (tmp_path / "cache" / "venv").exists()


@pytest.mark.skipif(SYSTEM_HAS_312, reason="this system's own directories hold a Python >= 3.12")
def test_no_suitable_python_anywhere_says_what_to_install(tmp_path: Path) -> None:
    empty_pyenv = tmp_path / "pyenv"
    (empty_pyenv / "versions").mkdir(parents=True)
    done = _bootstrap(
        tmp_path / "cache", PATH=SYSTEM_PATH, PYENV_ROOT=str(empty_pyenv), ROVER_INSTALL_PYTHON="0"
    )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert "no Python >= 3.12 found" in errors[0]
    assert "uv: ROVER_INSTALL_PYTHON=0" in errors[0]
    assert "install python3.12 or python3.13" in errors[0]
    assert not (tmp_path / "cache" / "venv").exists()


def _reaches(host: str, port: int = 443) -> bool:
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(SYSTEM_HAS_312, reason="this system's own directories hold a Python >= 3.12")
@pytest.mark.skipif(_reaches("github.com"), reason="uv would install CPython from GitHub here (minutes)")
def test_without_python_312_bootstrap_tries_uv_and_says_why_it_could_not(tmp_path: Path) -> None:
    """uv itself comes from PyPI (reachable from this machine); the CPython it installs comes from GitHub's
    python-build-standalone releases, which this machine cannot reach: one line says what was tried."""
    empty_pyenv = tmp_path / "pyenv"
    (empty_pyenv / "versions").mkdir(parents=True)
    done = _bootstrap(tmp_path / "cache", PATH=SYSTEM_PATH, PYENV_ROOT=str(empty_pyenv))
    assert done.returncode != 0
    assert "installing CPython 3.12 with uv" in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert "uv: uv python install 3.12 failed (" in errors[0], errors
    assert (tmp_path / "cache" / "uv" / "bin" / "uv").exists()  # uv itself came from PyPI
    assert not (tmp_path / "cache" / "venv").exists()
