"""Shared by the deploy and benchmark playbook tests: run ansible-playbook against a simulated fleet,
make test bundles, and look at a car over ssh (testinfra's ansible backend)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import testinfra

from fleet_keys.keys import default_key_dir
from rover_runtime.bundle import open_bundle
from rover_runtime.testing import write_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
RELEASES = "/opt/rover"


def fleet_inventory(request: Any) -> Path:
    """The session's simulated fleet (fixture sim_fleet), or an already running simulated fleet's
    inventory named by $ROVER_FLEET_INVENTORY (to iterate on these tests without booting a new one)."""
    override = os.environ.get("ROVER_FLEET_INVENTORY")
    if override:
        return Path(override).resolve()
    return Path(request.getfixturevalue("sim_fleet").inventory)


# Lines that end one task result in ansible-playbook's default output.
NEXT_RESULT = (
    "TASK [",
    "PLAY",
    "RUNNING HANDLER",
    "ok: [",
    "changed: [",
    "fatal: [",
    "failed: [",
    "skipping: [",
)


@dataclass
class PlaybookRun:
    rc: int
    stdout: str

    @property
    def text(self) -> str:
        """The output with all whitespace runs collapsed (Ansible wraps long messages; YAML's double-quoted
        style folds them with a backslash at the end of the line)."""
        return " ".join(re.sub(r"\\\n\s*", "", self.stdout).split())

    def report(self, tail: int = 3000) -> str:
        """For a failed assertion: every failed task (its TASK line and its whole result, however long the
        run) and then the end of the output."""
        failures: list[str] = []
        task = ""
        lines = self.stdout.splitlines()
        for index, line in enumerate(lines):
            if line.startswith("TASK ["):
                task = line
            elif line.startswith(("fatal: [", "failed: [")):
                block = [line]
                for more in lines[index + 1 :]:
                    if more.startswith(NEXT_RESULT):
                        break
                    block.append(more)
                failures.append("\n".join([task, *block[:80]]))
        head = "\n\n".join(failures) if failures else "(no failed task in the output)"
        return f"failed tasks:\n{head}\n\n... output ends with:\n{self.stdout[-tail:]}"

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP counters per host."""
        out: dict[str, dict[str, int]] = {}
        for line in self.stdout.split("PLAY RECAP")[-1].splitlines():
            match = re.match(r"^(\S+)\s+:\s+(ok=.*)$", line.strip())
            if match:
                out[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
        return out


def playbook_command(inventory: Path, playbook: str, *args: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "ansible-playbook"),
        "-i",
        str(inventory),
        str(REPO / "playbooks" / playbook),
        *args,
    ]


def playbook_env(inventory: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0", ANSIBLE_NOCOLOR="1")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # Each fleet's own fact cache: the test fleets' cars share names (car1, car2: the session's, the mixed,
    # pull and arm64 fleets, another developer's run); one fleet's cached facts must not answer for another's.
    env["ANSIBLE_CACHE_PLUGIN_CONNECTION"] = str(inventory.parent / "ansible-facts")
    # Each fleet's own monitor files (the intended release a deploy records), never the developer's.
    env["ROVER_MONITOR_DIR"] = str(inventory.parent / "monitor")
    return env


def run_playbook(inventory: Path, playbook: str, *args: str, timeout: float = 900) -> PlaybookRun:
    done = subprocess.run(
        playbook_command(inventory, playbook, *args),
        cwd=REPO,
        env=playbook_env(inventory),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return PlaybookRun(rc=done.returncode, stdout=done.stdout + done.stderr)


def run_infra_suite(inventory: Path, timeout: float = 1800) -> PlaybookRun:
    """The testinfra suite (tests/infra) against every car of `inventory`, as a user checks a real fleet;
    -rA lists every test's outcome (PASSED/SKIPPED/FAILED with its node id) at the end."""
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", "tests/infra", "-p", "no:cacheprovider", "-q", "-rA",
            "--hosts=rovers", f"--ansible-inventory={inventory}", "--connection=ansible",
        ],
        cwd=REPO, env=playbook_env(inventory), capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    return PlaybookRun(rc=done.returncode, stdout=done.stdout + done.stderr)


def make_bundle(target: Path, chunk_size: int, manifest_chunk_size: int | None = None) -> Path:
    """A tiny ONNX bundle; a different chunk size gives different model bytes (another release).
    With `manifest_chunk_size` the manifest (correct hashes) describes a chunk the model does not produce:
    the runtime raises at every inference, so the health gate fails."""
    return write_tiny_bundle(
        target,
        "onnx",
        chunk_size=chunk_size,
        n_action_steps=chunk_size,
        manifest_chunk_size=manifest_chunk_size,
    )


def corrupt_copy(bundle: Path, target: Path) -> Path:
    """A copy of `bundle` whose model file has one byte changed (same size, so only the sha256 differs)."""
    shutil.copytree(bundle, target)
    manifest = json.loads((target / "manifest.json").read_text())
    model = target / manifest["model_file"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    return target


def content_hash(bundle: Path) -> str:
    return open_bundle(bundle).manifest.content_hash


def car(inventory: Path, name: str) -> Any:
    # testinfra's ansible backend runs ansible-inventory / ansible from PATH with this project's config.
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ.setdefault("ANSIBLE_CONFIG", str(REPO / "ansible.cfg"))
    return testinfra.get_host(f"ansible://{name}?ansible_inventory={inventory}", sudo=True)


def current_release(host: Any) -> str:
    """The id of the release `current` points at ("" before the first release)."""
    out = host.run(f"readlink {RELEASES}/current")
    return str(out.stdout).strip().rsplit("/", 1)[-1] if out.rc == 0 else ""


def current_bundle(host: Any) -> str:
    """The content hash of the active release's model bundle."""
    return str(host.check_output(f"readlink -f {RELEASES}/current/bundle")).rsplit("/", 1)[-1]


def releases(host: Any) -> dict[str, dict[str, Any]]:
    """Every published release on the car: its release.json with its status.json (state, reason) merged in."""
    script = (
        "import json, pathlib, sys\n"
        "out = {}\n"
        f"for d in sorted(pathlib.Path('{RELEASES}/releases').glob('[!.]*')):\n"
        "    info = json.loads((d / 'release.json').read_text())\n"
        "    s = d / 'status.json'\n"
        "    info.update(json.loads(s.read_text()) if s.exists() else {'state': 'new'})\n"
        "    out[d.name] = info\n"
        "print(json.dumps(out))\n"
    )
    return dict(json.loads(host.check_output(f"python3 -c {shlex.quote(script)}")))


def leftovers(host: Any) -> list[str]:
    """Staging directories and the deploy lock: what a finished run must not leave behind."""
    out = host.run(
        f"ls -d {RELEASES}/releases/.incoming-* {RELEASES}/bundles/.incoming-* {RELEASES}/.deploy.lock"
    )
    return str(out.stdout).split()


def fleet_state(inventory: Path) -> dict[str, Any]:
    """The simulated fleet's state.json, beside the key its inventory names."""
    key = re.search(r"ansible_ssh_private_key_file: (\S+)/id_ed25519", inventory.read_text())
    assert key, f"{inventory} is not a simfleet inventory"
    return dict(json.loads((Path(key.group(1)) / "state.json").read_text()))


def container_pid(inventory: Path, name: str) -> int:
    """The simulated car's init process as seen from this machine (to enter its mount namespace)."""
    host = next(h for h in fleet_state(inventory)["hosts"] if h["name"] == name)
    return int(host["init"]["pid"])


def metrics(host: Any) -> dict[str, Any]:
    return dict(json.loads(host.check_output("cat /run/rover/metrics.json")))


def metrics_if_any(host: Any) -> dict[str, Any] | None:
    """The runtime's metrics, or None while there are none (the file goes while the runtime restarts: read
    once, as a check that it exists and a read after it may see it go in between)."""
    out = host.run("cat /run/rover/metrics.json")
    return dict(json.loads(out.stdout)) if out.rc == 0 else None


def runs_healthy(sample: dict[str, Any] | None, release: str) -> bool:
    """Whether a metrics sample is of a process that runs `release` and is healthy."""
    if sample is None:
        return False
    return (sample.get("release") or {}).get("id") == release and bool(sample.get("healthy"))


def journal(host: Any) -> str:
    return str(host.run("journalctl -u rover-runtime --no-pager -n 40").stdout)


def signing_key() -> Path:
    """The controller's bundle signing key the deploy and provisioning use by default (role rover_release):
    in the private key directory, beside fleet_keys' update keys."""
    return default_key_dir() / "rover-bundle-signing"


def sign_manifest(bundle: Path, key: Path) -> Path:
    """Sign `bundle`'s manifest.json as the deploy does (`ssh-keygen -Y sign -n rover-bundle`), beside it."""
    subprocess.run(
        ["ssh-keygen", "-Y", "sign", "-f", str(key), "-n", "rover-bundle", str(bundle / "manifest.json")],
        check=True,
        capture_output=True,
    )
    return bundle / "manifest.json.sig"


def new_signing_key(target: Path) -> Path:
    """A fresh ed25519 key pair (no passphrase) at `target` and `target`.pub: a key the cars do not trust."""
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "not-the-controller", "-f", str(target)],
        check=True,
        capture_output=True,
    )
    return target


# Every car of the session's fleet in one batch (deploy.yml's default is a canary, 25 %, then the rest: one
# health gate after another). For the fixtures that only need a release running; the batches have their tests.
ONE_BATCH = ("-e", json.dumps({"rover_deploy_serial": ["100%"]}))
# A simulated car drives all the time (its policy commands throttle): changing its release needs force.
FORCE = ("-e", "rover_deploy_force=true")


def provision_and_deploy(request: Any, tmp_path_factory: Any, *deploy_args: str) -> Path:
    """The session's fleet provisioned (fixture fleet_provisioned) and running a release of a tiny bundle,
    deployed to every car in one batch (forced past the driving guard: simulated cars drive all the time);
    `deploy_args` go to deploy.yml. Returns the inventory."""
    request.getfixturevalue("fleet_provisioned")
    inventory = fleet_inventory(request)
    bundle = make_bundle(tmp_path_factory.mktemp("release") / "bundle", chunk_size=10)
    run = run_playbook(
        inventory,
        "deploy.yml",
        "-e",
        f"rover_deploy_bundle={bundle}",
        "-e",
        "rover_deploy_force=true",
        *ONE_BATCH,
        *deploy_args,
    )
    assert run.rc == 0, run.report()
    return inventory


def wait_driving(host: Any, timeout: float = 30) -> dict[str, Any]:
    """Metrics of the runtime once a cycle of it drove. A loaded machine has cycles that hold the car for a
    moment (an old frame, a late reply): `driving` is that cycle's; the deploy's guard allows for them with
    `rover_release_driving_grace_s`, and a test waits for the car to be on the road again."""
    deadline = time.monotonic() + timeout
    sample: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        sample = metrics_if_any(host)
        if sample is not None and sample.get("driving") is True:
            return sample
        time.sleep(0.5)
    raise AssertionError(f"not driving within {timeout} s: {sample}\n{journal(host)}")


def wait_running(host: Any, release: str, timeout: float = 60) -> dict[str, Any]:
    """Metrics of the runtime once its process reports `release` and is healthy."""
    deadline = time.monotonic() + timeout
    m: dict[str, Any] = {}
    while time.monotonic() < deadline:
        sample = metrics_if_any(host)
        if sample is not None:
            m = sample
            if runs_healthy(m, release):
                return m
        time.sleep(1)
    raise AssertionError(f"not running {release} within {timeout} s: {m.get('release')}\n{journal(host)}")
