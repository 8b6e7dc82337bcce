"""The roles as the Ansible collection rover.fleet (galaxy.yml): built with `ansible-galaxy collection build`,
installed into an empty collections path, and run by fully qualified names from a directory that has
neither this project's ansible.cfg nor its roles: what AWX / ansible-navigator do with it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from rover_runtime.bundle import open_bundle
from rover_runtime.testing import write_tiny_bundle

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KEPT = "{{ {'controller': rover_release_controller, 'key': rover_release_public_key} | to_json }}"


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built collection's tarball."""
    out = tmp_path_factory.mktemp("dist")
    build = _run(
        [str(BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(out)],
        REPO,
        os.environ.copy(),
    )
    assert build.returncode == 0, build.stdout + build.stderr
    version = yaml.safe_load((REPO / "galaxy.yml").read_text())["version"]
    tarball = out / f"rover-fleet-{version}.tar.gz"
    assert tarball.is_file(), build.stdout
    return tarball


@pytest.fixture(scope="module")
def installed(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A working directory outside the project and the environment that runs the installed collection."""
    work = tmp_path_factory.mktemp("awx-like")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(
        PATH=f"{BIN}:{env.get('PATH', '')}",
        ANSIBLE_COLLECTIONS_PATH=str(work / "collections"),
        ANSIBLE_ROLES_PATH=str(work / "no-roles"),  # the project's roles/ must not be what answers
        ANSIBLE_NOCOLOR="1",
        ANSIBLE_CALLBACKS_ENABLED="rover.fleet.rover_recap",
        ROVER_PROJECT=str(REPO),  # the controller's Python side (rover_runtime), as the EE sets it
    )
    # --no-deps: ansible.posix comes with the `ansible` package (Galaxy is not reachable from here).
    install = _run(
        [
            str(BIN / "ansible-galaxy"),
            "collection",
            "install",
            "--no-deps",
            "-p",
            str(work / "collections"),
            str(collection),
        ],
        work,
        env,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return work, env


def test_the_collection_holds_the_ansible_content_and_nothing_else(collection: Path) -> None:
    with tarfile.open(collection) as tar:
        names = set(tar.getnames())
    for expected in (
        "MANIFEST.json",
        "meta/runtime.yml",
        "roles/rover_release/tasks/controller.yml",
        "roles/rover_release/meta/argument_specs.yml",
        "roles/rover_runtime_service/templates/rover-runtime.service.j2",
        "playbooks/deploy.yml",
        "playbooks/provision.yml",
        "playbooks/reachable.yml",
        "plugins/callback/rover_recap.py",
        "plugins/modules/rover_release_state.py",
        "plugins/module_utils/release_state.py",
        "roles/rover_deploy/tasks/main.yml",
    ):
        assert expected in names, expected
    tops = {name.split("/")[0] for name in names}
    assert tops <= {
        "MANIFEST.json",
        "FILES.json",
        "CHANGELOG.md",
        "meta",
        "roles",
        "playbooks",
        "plugins",
        "docs",
    }, tops
    assert not [name for name in names if name.endswith(".pyc") or "__pycache__" in name]


def test_roles_run_by_their_fully_qualified_names(installed: tuple[Path, dict[str, str]]) -> None:
    """rover.fleet.rover_release verifies and signs a bundle on the controller: the signature it makes
    verifies against the public key it reports, and the content hash is the bundle's."""
    work, env = installed
    bundle = write_tiny_bundle(work / "bundle")
    key = work / "keys" / "bundle-signing"
    playbook = work / "sign.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Sign a bundle with the collection's role",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "vars": {"rover_release_signing_key": str(key), "rover_release_bundle": str(bundle)},
                    "tasks": [
                        {
                            "name": "Read the signing key",
                            "ansible.builtin.include_role": {
                                "name": "rover.fleet.rover_release",
                                "tasks_from": "public_key",
                            },
                        },
                        {
                            "name": "Verify and sign the bundle",
                            "ansible.builtin.include_role": {
                                "name": "rover.fleet.rover_release",
                                "tasks_from": "controller",
                            },
                        },
                        {
                            "name": "Write what the role kept",
                            "ansible.builtin.copy": {
                                "content": KEPT,
                                "dest": str(work / "kept.json"),
                                "mode": "0644",
                            },
                        },
                    ],
                }
            ]
        )
    )
    run = _run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook)], work, env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    kept = json.loads((work / "kept.json").read_text())
    assert kept["controller"]["info"]["content_hash"] == open_bundle(bundle).manifest.content_hash
    signers = work / "allowed_signers"
    signers.write_text(f'rover-controller namespaces="rover-bundle" {kept["key"]["text"]}\n')
    (work / "manifest.sig").write_text(kept["controller"]["signature"] + "\n")
    verify = subprocess.run(
        [
            "ssh-keygen",
            "-Y",
            "verify",
            "-f",
            str(signers),
            "-I",
            "rover-controller",
            "-n",
            "rover-bundle",
            "-s",
            str(work / "manifest.sig"),
        ],
        input=(bundle / "manifest.json").read_bytes(),
        capture_output=True,
        check=False,
    )
    assert verify.returncode == 0, verify.stderr


def test_the_collection_validates_role_arguments(installed: tuple[Path, dict[str, str]]) -> None:
    work, env = installed
    playbook = work / "bad.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "A wrongly typed variable",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Sign with a setting that is not a boolean",
                            "ansible.builtin.include_role": {
                                "name": "rover.fleet.rover_release",
                                "tasks_from": "controller",
                            },
                            "vars": {"rover_release_bundle": "/nonexistent", "rover_release_sign": "perhaps"},
                        }
                    ],
                }
            ]
        )
    )
    run = _run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook)], work, env)
    assert run.returncode == 2
    assert "rover_release_sign" in run.stdout, run.stdout[-3000:]


def test_a_playbook_of_the_collection_runs_by_its_name(installed: tuple[Path, dict[str, str]]) -> None:
    """`ansible-playbook rover.fleet.deploy`: the controller checks of the collection's playbook refuse a
    deploy without a bundle, before any car is touched."""
    work, env = installed
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inventory = work / "fleet.yml"
    car = {"ansible_host": "127.0.0.1", "ansible_port": port, "ansible_user": "pi", "rover_car_id": "car1"}
    inventory.write_text(yaml.safe_dump({"all": {"children": {"rovers": {"hosts": {"car1": car}}}}}))
    run = _run([str(BIN / "ansible-playbook"), "-i", str(inventory), "rover.fleet.deploy"], work, env)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-2000:]
    assert "pass the bundle to deploy: -e rover_deploy_bundle=" in run.stdout, run.stdout[-3000:]


def test_a_role_of_the_collection_runs_its_car_side_modules(installed: tuple[Path, dict[str, str]]) -> None:
    """rover.fleet.rover_release's plan reads the car's releases through the collection's own module
    (rover_release_state over its module_utils), outside the project: what a pull-mode car runs."""
    work, env = installed
    root = work / "car-root"
    root.mkdir()
    playbook = work / "plan.yml"
    playbook.write_text(
        yaml.safe_dump(
            [
                {
                    "name": "Read the releases with the collection's module",
                    "hosts": "localhost",
                    "gather_facts": False,
                    "tasks": [
                        {
                            "name": "Read the releases",
                            "rover.fleet.rover_release_state": {"command": "status", "root": str(root)},
                            "register": "state",
                        },
                        {
                            "name": "Take the lock",
                            "rover.fleet.rover_release_state": {
                                "command": "lock",
                                "root": str(root),
                                "run": "run-1",
                                "owner": "awx",
                                "stale_after": 60,
                            },
                        },
                        {
                            "name": "Show them",
                            "ansible.builtin.debug": {"msg": "releases={{ state.releases | length }}"},
                        },
                    ],
                }
            ]
        )
    )
    run = _run([str(BIN / "ansible-playbook"), "-i", "localhost,", "-c", "local", str(playbook)], work, env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "releases=0" in run.stdout
    assert json.loads((root / ".deploy.lock" / "owner.json").read_text())["run"] == "run-1"


def test_the_execution_environment_installs_what_the_project_pins(collection: Path) -> None:
    """execution-environment.yml (ansible-builder 3) names the collection this build makes, the ansible-core
    of the controller lock, and project files that exist."""
    ee = yaml.safe_load((REPO / "execution-environment.yml").read_text())
    assert ee["version"] == 3
    lock = (REPO / "requirements" / "controller.lock").read_text()
    core = ee["dependencies"]["ansible_core"]["package_pip"]
    assert f"\n{core} " in lock, f"{core} is not the lock's ansible-core"
    files = {Path(item["src"]).name: item for item in ee["additional_build_files"]}
    assert collection.name in files, f"the EE installs another collection file than {collection.name}"
    wanted = [entry["name"] for entry in ee["dependencies"]["galaxy"]["collections"]]
    assert any(name.endswith("/" + collection.name) for name in wanted), wanted
    for item in ee["additional_build_files"]:
        if not item["src"].startswith("out/"):
            assert (REPO / item["src"]).exists(), item["src"]
