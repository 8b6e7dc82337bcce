"""playbooks/collect.yml against the simulated fleet: the cars' black boxes record while they drive (a car
without a receiver records all the time), collect fetches only the new finished episodes verified by
checksum, a second run moves nothing, a corrupt episode is skipped with its error, an unreachable car is
reported while the others complete, the merged dataset loads with lerobot, and a hostile car's symlinks and
escaping paths bring nothing from outside into the store."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest
import yaml
from deploy_helpers import car, provision_and_deploy, run_playbook

pytestmark = [pytest.mark.fleet, pytest.mark.slow]

EPISODES = "/var/lib/rover/recordings/episodes"
# Short episodes, so that a test sees several finish (the default is 60 s).
RECORD = json.dumps({"rover_runtime_service_extra_config": {"record": {"episode_max_s": 2.0}}})


def finished(host: object, minimum: int) -> list[str]:
    names: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = host.run(f"ls {EPISODES} 2>/dev/null")  # type: ignore[attr-defined]
        names = sorted(n for n in out.stdout.split() if not n.endswith(".partial"))
        if len(names) >= minimum:
            return names
        time.sleep(1)
    status = host.run(  # type: ignore[attr-defined]
        'python3 -c \'import json; d = json.load(open("/run/rover/metrics.json")); '
        'print(d.get("recorder"), d.get("rc"), d.get("failsafe"))\'; '
        "journalctl -u rover-runtime -n 30 --no-pager"
    )
    raise AssertionError(
        f"only {names} finished on the car; metrics and journal:\n{status.stdout}{status.stderr}"
    )


def home(car_store: Path) -> list[str]:
    """The episodes in a car's store (not its staging area .incoming/ and the list beside it)."""
    return sorted(p.name for p in car_store.iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def recorded_fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    inventory = provision_and_deploy(request, tmp_path_factory, "-e", RECORD)
    for name in ("car1", "car2"):
        finished(car(inventory, name), 2)
    return inventory


def test_collect_brings_new_episodes_home_once_and_skips_a_corrupt_one(
    recorded_fleet: Path, tmp_path: Path, demo_dataset: Path
) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset  # noqa: PLC0415

    inventory = recorded_fleet
    car1, car2 = car(inventory, "car1"), car(inventory, "car2")
    for host in (car1, car2):  # parked: nothing new is recorded between the two runs
        host.check_output("systemctl stop rover-runtime")
    try:
        on_car1, on_car2 = finished(car1, 2), finished(car2, 2)
        bad = on_car2[0]
        car2.check_output(
            f"python3 -c \"p='{EPISODES}/{bad}/steps.jsonl'; d=bytearray(open(p,'rb').read()); "
            f"d[5]^=1; open(p,'wb').write(bytes(d))\""
        )  # one bit flipped on the car's card
        store, dataset = tmp_path / "store", tmp_path / "dataset"
        args = ("-e", f"rover_collect_store={store}", "-e", f"rover_collect_dataset={dataset}")
        training = ("-e", f"rover_collect_training_dataset={demo_dataset}")
        run = run_playbook(inventory, "collect.yml", "--limit", "car1,car2", *args, *training)
        assert run.rc == 0, run.report()
        assert home(store / "car1") == on_car1
        home2 = home(store / "car2")
        assert f"{bad}.partial" in home2  # kept for a look, never published
        assert sorted(n for n in home2 if not n.endswith(".partial")) == on_car2[1:]
        assert f"episode {bad}.partial: steps.jsonl does not match its sha256 (corrupt)" in run.text, (
            run.report()
        )
        for name in ("car1", "car2"):  # one rsync per car; nothing left in its staging area
            assert list((store / name / ".incoming").iterdir()) == []
        merge = json.loads((tmp_path / "merge.json").read_text())
        assert merge["episodes"] == len(on_car1) + len(on_car2) - 1
        rows = [
            json.loads(line) for line in (dataset / "meta" / "rover_episodes.jsonl").read_text().splitlines()
        ]
        assert {r["car"] for r in rows} == {
            car1.check_output("hostname").strip(),
            car2.check_output("hostname").strip(),
        }
        assert all(r["release"] for r in rows)
        report = json.loads((tmp_path / "report" / "report.json").read_text())  # the drive report
        assert {g["car"] for g in report["groups"]} == {r["car"] for r in rows}
        assert sum(g["frames"] for g in report["groups"]) >= merge["frames"]
        assert (tmp_path / "report" / "actions.png").is_file()
        assert len(LeRobotDataset("rover/fleet_drives", root=dataset)) == merge["frames"] > 0

        again = run_playbook(inventory, "collect.yml", "--limit", "car1,car2", *args)
        assert again.rc == 0, again.report()
        assert again.text.count("collected 0 new episode(s), 0 bytes") == 2, again.stdout[-3000:]

        removed = run_playbook(
            inventory, "collect.yml", "--limit", "car1", *args, "-e", "rover_collect_remove=true"
        )
        assert removed.rc == 0, removed.report()
        assert car1.run(f"ls {EPISODES}").stdout.split() == []  # delivered, verified, deleted
        assert len(finished(car2, 2)) == len(on_car2)  # not asked: nothing removed
    finally:
        for host in (car1, car2):
            host.run("systemctl start rover-runtime")


def test_an_unreachable_car_is_reported_and_the_others_complete(recorded_fleet: Path, tmp_path: Path) -> None:
    finished(car(recorded_fleet, "car1"), 1)  # (an earlier test may have collected and removed its episodes)
    inventory = yaml.safe_load(recorded_fleet.read_text())
    rovers = inventory["all"]["children"]["rovers"]["hosts"]
    rovers["car9"] = {**rovers["car1"], "ansible_port": 1}  # nothing listens there: a car out of range
    extended = tmp_path / "hosts.yml"
    extended.write_text(yaml.safe_dump(inventory))
    for name in ("group_vars", "host_vars"):
        if (recorded_fleet.parent / name).exists():
            (tmp_path / name).symlink_to(recorded_fleet.parent / name)
    store = tmp_path / "store"
    run = run_playbook(
        extended,
        "collect.yml",
        "--limit",
        "car1,car9",
        "-e",
        f"rover_collect_store={store}",
        "-e",
        f"rover_collect_dataset={tmp_path / 'dataset'}",
    )
    assert run.rc == 4, run.report()  # ansible-playbook's "some hosts were unreachable"
    assert "car9" in run.text, run.report()
    assert "unreachable" in run.text, run.report()
    assert home(store / "car1")  # car1 completed
    assert (tmp_path / "dataset" / "meta" / "info.json").is_file()  # and the merge ran


# Run on the car as root: add `extra` to an episode's listed files, then rewrite every listed file's size and
# sha256 as it reads now (following symlinks), as a hostile car that knows the format would.
RESEAL = """
import hashlib, json, os, sys
episode, extra = sys.argv[1], json.loads(sys.argv[2])
meta = json.load(open(os.path.join(episode, "episode.json")))
meta["files"].update(extra)
for name in list(meta["files"]):
    path = os.path.join(episode, name)
    if os.path.isfile(path) and name not in extra:
        data = open(path, "rb").read()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
json.dump(meta, open(os.path.join(episode, "episode.json"), "w"))
"""


def test_a_hostile_car_gets_nothing_outside_the_store_and_its_episodes_quarantined(
    recorded_fleet: Path, tmp_path: Path
) -> None:
    car2 = car(recorded_fleet, "car2")
    car2.check_output("systemctl stop rover-runtime")  # parked: only the episodes made below are new
    try:
        real = finished(car2, 1)[-1]
        linked, outside_file, escaping = (f"29990101T00000{i}Z-car2-99999{i}" for i in range(3))
        # An episode that is a symlink out of the recordings, one whose frames file is a symlink to
        # /etc/shadow, one whose episode.json lists ../../../../../../etc/shadow.
        car2.check_output(
            f"set -e; cd {EPISODES}; mkdir -p /var/tmp/elsewhere; cp -r {real} /var/tmp/elsewhere/{linked}; "
            f"ln -s /var/tmp/elsewhere/{linked} {linked}; "
            f"cp -r {real} {outside_file}; ln -sf /etc/shadow {outside_file}/front.jpg.bin; "
            f"cp -r {real} {escaping}; "
            f"python3 -c {shlex.quote(RESEAL)} {outside_file} '{{}}'; "
            f"python3 -c {shlex.quote(RESEAL)} {escaping} "
            + shlex.quote(json.dumps({"../../../../../../etc/shadow": {"bytes": 1, "sha256": "0" * 64}}))
        )
        store = tmp_path / "store"
        run = run_playbook(
            recorded_fleet, "collect.yml", "--limit", "car2", "-e", f"rover_collect_store={store}",
            "-e", f"rover_collect_dataset={tmp_path / 'dataset'}",
        )  # fmt: skip
        assert run.rc == 0, run.report()
        names = home(store / "car2")
        assert linked not in names  # never listed, never fetched
        assert f"{linked}.partial" not in names
        assert f"{outside_file}.partial" in names  # quarantined: rsync did not take the symlink
        assert f"{outside_file}.partial: front.jpg.bin is missing" in run.text, run.report()
        assert f"{escaping}.partial" in names
        assert f"{escaping}.partial: ../../../../../../etc/shadow resolves to " in run.text, run.report()
        assert f"outside the episode (quarantined as {escaping}.partial)" in run.text, run.report()
        assert real in names  # the good ones still come home
        for path in store.rglob("*"):
            assert not path.is_symlink(), f"{path} is a symlink"
        rows = (tmp_path / "dataset" / "meta" / "rover_episodes.jsonl").read_text()
        assert "29990101" not in rows
    finally:
        car2.run(f"rm -rf {EPISODES}/29990101T* /var/tmp/elsewhere")
        car2.run("systemctl start rover-runtime")
