"""The controller's bundle signing key (role rover_release, tasks_from: public_key) on this machine alone, by
ansible-playbook on localhost: made in the private key directory, never beside the caches, and a key that an
older version kept in $ROVER_CACHE/keys moved there once (the cars already trust it). A key held by ssh-agent
alone (a real agent) signs when the setting names its public half."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rover_runtime.testing import write_tiny_bundle

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


def _playbook(
    tmp_path: Path, text: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """ansible-playbook of `text` on localhost, with this test's own caches and key directory."""
    playbook = tmp_path / "play.yml"
    playbook.write_text(text)
    environment = {
        **os.environ,
        **(env or {}),
        "ANSIBLE_CONFIG": str(REPO / "ansible.cfg"),
        "ANSIBLE_ROLES_PATH": str(REPO / "roles"),
        "ANSIBLE_CACHE_PLUGIN_CONNECTION": str(tmp_path / "facts"),
        "ROVER_CACHE": str(tmp_path / "cache"),
        "ROVER_KEYS": str(tmp_path / "keys"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", "localhost,", "-c", "local"]
    return subprocess.run(
        [*command, *args, str(playbook)], capture_output=True, text=True, env=environment, cwd=REPO,
        check=False, timeout=300,
    )  # fmt: skip


def _run(tmp_path: Path) -> str:
    done = _playbook(tmp_path, PLAYBOOK)
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


SIGN_PLAYBOOK = """
- name: Sign a bundle with the controller's key
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Verify and sign
      ansible.builtin.include_role:
        name: rover_release
        tasks_from: controller
    - name: Write the signature
      ansible.builtin.copy:
        content: "{{ hostvars['localhost']['rover_release_controller'].signature }}"
        dest: "{{ signature_out }}"
        mode: "0644"
"""


def _agent(tmp_path: Path) -> dict[str, str]:
    """A real ssh-agent of this test's own (its socket in tmp_path)."""
    socket = tmp_path / "agent.sock"
    done = subprocess.run(["ssh-agent", "-a", str(socket), "-s"], capture_output=True, text=True, check=True)
    pid = next(
        line.split("=", 1)[1].split(";")[0]
        for line in done.stdout.split()
        if line.startswith("SSH_AGENT_PID=")
    )
    return {"SSH_AUTH_SOCK": str(socket), "SSH_AGENT_PID": pid}


def _sign(tmp_path: Path, key: Path, agent: dict[str, str]) -> subprocess.CompletedProcess[str]:
    bundle = write_tiny_bundle(tmp_path / "bundle")
    extra = [
        "-e", f"rover_release_bundle={bundle}", "-e", f"rover_release_signing_key={key}",
        "-e", f"signature_out={tmp_path / 'manifest.json.sig'}",
        "-e", f"rover_release_controller_source={REPO}",
    ]  # fmt: skip
    return _playbook(tmp_path, SIGN_PLAYBOOK, *extra, env=agent)


def test_a_key_held_by_ssh_agent_signs_bundles(tmp_path: Path) -> None:
    """rover_release_signing_key names a public key (`.pub`): the private half is only in ssh-agent (as a
    hardware key's would be), never on disk; the signature verifies against the public key."""
    key = tmp_path / "agent-keys" / "rover"
    _keygen(key)
    agent = _agent(tmp_path)
    try:
        public = Path(f"{key}.pub")
        refused = _sign(tmp_path, public, agent)  # the agent does not hold it yet
        assert refused.returncode != 0
        assert (
            "names a public key whose private half must be in ssh-agent, but the agent does not hold it"
            in (refused.stdout)
        )
        subprocess.run(
            ["ssh-add", "-q", str(key)], env={**os.environ, **agent}, check=True, capture_output=True
        )
        key.unlink()  # the private half now lives in the agent alone
        done = _sign(tmp_path, public, agent)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
        signers = tmp_path / "allowed_signers"
        signers.write_text(f'rover-controller namespaces="rover-bundle" {public.read_text().strip()}\n')
        verify = subprocess.run(
            ["ssh-keygen", "-Y", "verify", "-f", str(signers), "-I", "rover-controller", "-n", "rover-bundle",
             "-s", str(tmp_path / "manifest.json.sig")],
            input=(tmp_path / "bundle" / "manifest.json").read_bytes(), capture_output=True, check=False,
        )  # fmt: skip
        assert verify.returncode == 0, verify.stderr
        assert not (tmp_path / "keys").exists()  # no key was generated beside it
    finally:
        subprocess.run(["kill", agent["SSH_AGENT_PID"]], check=False)
