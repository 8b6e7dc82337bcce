"""fleet_drives receive: the episodes a collect run pulled are published only when every file matches."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from test_recording import INFO, settings, step

from fleet_drives.receive import receive_episodes
from rover_runtime.episode_format import EPISODES, STEPS_FILE, finished_episodes
from rover_runtime.recording import Recorder


def recorded(directory: Path, episodes: int) -> list[Path]:
    """`episodes` finished episodes written by the car's own Recorder."""
    rec = Recorder(settings(directory, episode_max_s=0.5))
    rec.start()
    rec.begin(INFO)
    for i in range(15 * episodes):  # 0.5 s of steps at 30 Hz each
        rec.record(step(i))
    rec.stop()
    found = finished_episodes(directory / EPISODES)
    assert len(found) == episodes
    return found


def test_good_episodes_are_published_and_a_corrupt_one_is_kept_apart(tmp_path: Path) -> None:
    good, bad, replaced = recorded(tmp_path / "car", 3)
    incoming, store = tmp_path / "store" / "car1" / ".incoming", tmp_path / "store" / "car1"
    shutil.copytree(tmp_path / "car" / EPISODES, incoming)
    steps = incoming / bad.name / STEPS_FILE
    data = bytearray(steps.read_bytes())
    data[5] ^= 1  # one bit flipped on the way
    steps.write_bytes(bytes(data))
    (store / f"{replaced.name}.partial").mkdir()  # a corrupt copy from an earlier run
    (store / f"{replaced.name}.partial" / "junk").write_text("x")

    result = receive_episodes(incoming, store, [good.name, bad.name, replaced.name, "never-sent"])

    assert result.published == [good.name, replaced.name]
    assert sorted(p.name for p in (store / good.name).iterdir()) == sorted(p.name for p in good.iterdir())
    assert not (store / f"{replaced.name}.partial").exists()
    assert result.bytes == sum(
        entry["bytes"]
        for ep in (good, replaced)
        for entry in json.loads((ep / "episode.json").read_text())["files"].values()
    )
    assert result.errors == [
        f"episode {bad.name}.partial: {STEPS_FILE} does not match its sha256 (corrupt)"
        f" (quarantined as {bad.name}.partial)",
        "episode never-sent: not received",
    ]
    assert (store / f"{bad.name}.partial" / STEPS_FILE).read_bytes() == bytes(data)
    assert not (store / bad.name).exists()
    assert sorted(p.name for p in incoming.iterdir()) == [".sequence"]  # the car's own file, not an episode


def test_an_episode_already_in_the_store_or_a_bad_name_is_refused(tmp_path: Path) -> None:
    (episode,) = recorded(tmp_path / "car", 1)
    store = tmp_path / "store" / "car1"
    incoming = store / ".incoming"
    shutil.copytree(episode, incoming / episode.name)
    shutil.copytree(episode, store / episode.name)

    result = receive_episodes(incoming, store, [episode.name, "../escape", ".incoming", "x.partial"])

    assert result.published == []
    assert result.errors == [
        f"episode {episode.name}: already in the store ({store / episode.name})",
        "episode '../escape': not an episode name",
        "episode '.incoming': not an episode name",
        "episode 'x.partial': not an episode name",
    ]
    assert (incoming / episode.name).is_dir()  # left where it was


def test_the_cli_prints_json_and_exits_1_when_one_was_not_published(tmp_path: Path) -> None:
    (episode,) = recorded(tmp_path / "car", 1)
    store = tmp_path / "store" / "car1"
    shutil.copytree(episode, store / ".incoming" / episode.name)
    names = tmp_path / "list"
    names.write_text(f"{episode.name}\n\nmissing\n")
    cli = [sys.executable, "-m", "fleet_drives", "receive", "--incoming", str(store / ".incoming")]
    run = subprocess.run(
        [*cli, "--car-store", str(store), "--list", str(names)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 1, run.stderr
    assert json.loads(run.stdout)["published"] == [episode.name]
    assert json.loads(run.stdout)["errors"] == ["episode missing: not received"]
    unreadable = subprocess.run(
        [*cli, "--car-store", str(store), "--list", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert unreadable.returncode == 2
    assert "error: cannot read the list of episodes:" in unreadable.stderr
