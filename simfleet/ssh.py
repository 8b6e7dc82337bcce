"""Running commands on a simulated host over ssh, as Ansible does (user pi, the fleet's key)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SshTarget:
    label: str
    port: int
    key: Path
    known_hosts: Path
    user: str = "pi"
    address: str = "127.0.0.1"

    def options(self) -> list[str]:
        """The ssh options (also written to the inventory as ansible_ssh_common_args)."""
        return [
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "IdentitiesOnly=yes",
        ]

    def argv(self, command: list[str]) -> list[str]:
        return [
            "ssh",
            "-i",
            str(self.key),
            "-p",
            str(self.port),
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=5",
            *self.options(),
            f"{self.user}@{self.address}",
            "--",
            *command,
        ]


def ssh_run(
    target: SshTarget, command: list[str], timeout: float = 60, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs `command` (joined by the remote shell, as ssh does) and returns its result; a timeout is
    reported as exit status 255 like other ssh failures."""
    try:
        return subprocess.run(
            target.argv(command),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        return subprocess.CompletedProcess(err.cmd, 255, "", f"ssh timed out after {timeout:.0f} s")
