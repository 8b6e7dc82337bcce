"""The controller's bundle signing key (role rover_release, tasks_from: public_key) on this machine alone, by
ansible-playbook on localhost: made in the private key directory, never beside the caches, and a key that an
older version kept in $ROVER_CACHE/keys moved there once (the cars already trust it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = """
- name: The controller's signing key
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Read the public key (generating or moving the key first)
      ansible.builtin.include_role:
        name: rover_release
        tasks_from: public_key
    - name: Show it
      ansible.builtin.debug:
        msg: "PUBLIC {{ hostvars['localhost']['rover_release_public_key'].text }}"
"""


def _run(tmp_path: Path) -> str:
    playbook = tmp_path / "key.yml"
    playbook.write_text(PLAYBOOK)
    env = {
        **os.environ,
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
        "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(tmp_path / "facts"),
        "ROVER_CACHE": str(tmp_path / "cache"),
        "ROVER_KEYS": str(tmp_path / "keys"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local"]
    done = subprocess.run(
        [*command, str(playbook)], capture_output=True, text=True, env=env, cwd=REPO, check=False, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    return done.stdout


def _keygen(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def test_a_new_key_is_made_in_the_private_key_directory(tmp_path: Path) -> None:
    out = _run(tmp_path)
    key = tmp_path / "keys" / "rover-bundle-signing"
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.parent.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "keys" / "rover-bundle-signing.pub").read_text().split()[1] in out
    assert not (tmp_path / "cache" / "keys").exists()


def test_a_key_kept_beside_the_caches_is_moved_not_replaced(tmp_path: Path) -> None:
    old = tmp_path / "cache" / "keys" / "rover-bundle-signing"
    _keygen(old)
    trusted = Path(f"{old}.pub").read_text().split()[1]  # what the cars' allowed signers hold
    out = _run(tmp_path)
    key = tmp_path / "keys" / "rover-bundle-signing"
    assert Path(f"{key}.pub").read_text().split()[1] == trusted
    assert f"PUBLIC ssh-ed25519 {trusted}" in out
    assert key.stat().st_mode & 0o777 == 0o600
    assert not old.exists()
    assert not Path(f"{old}.pub").exists()
    _run(tmp_path)  # again: nothing to move, the same key
    assert Path(f"{key}.pub").read_text().split()[1] == trusted


def test_a_key_already_in_place_wins_and_the_cached_one_is_left_alone(tmp_path: Path) -> None:
    old = tmp_path / "cache" / "keys" / "rover-bundle-signing"
    new = tmp_path / "keys" / "rover-bundle-signing"
    _keygen(old)
    _keygen(new)
    new.parent.chmod(0o700)
    out = _run(tmp_path)
    assert f"PUBLIC ssh-ed25519 {Path(f'{new}.pub').read_text().split()[1]}" in out
    assert old.exists()
