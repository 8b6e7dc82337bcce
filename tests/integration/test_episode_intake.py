"""Collect intake trusts no car: what `fleet_drives receive`, the merge and the drive report do with an
episode a broken or hostile car sent. Episodes are recorded by the car's own Recorder, then tampered with and
re-sealed (their sizes and sha256 in episode.json recomputed, as a hostile car would), so each check below
is the one that catches them, not the checksums."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_fleet_drives_merge import record

from fleet_drives.merge import find_episodes, merge_episodes
from fleet_drives.receive import receive_episodes
from rover_runtime.episode_format import EPISODE_FILE, STEPS_FILE, EpisodeError, open_episode

pytestmark = pytest.mark.slow


def seal(episode: Path, meta: dict[str, Any] | None = None) -> None:
    """Write episode.json with every listed regular file's size and sha256 as it is now."""
    meta = meta if meta is not None else json.loads((episode / EPISODE_FILE).read_text())
    for name in meta["files"]:
        path = episode / name
        if path.is_file():
            data = path.read_bytes()
            meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (episode / EPISODE_FILE).write_text(json.dumps(meta))


def receive_one(tmp_path: Path, episode: Path, **kwargs: Any) -> tuple[Path, list[str]]:
    """Put `episode` in a car's staging area as rsync would, receive it; returns the car store, errors."""
    car_store = tmp_path / "store" / "car1"
    incoming = car_store / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    shutil.move(episode, incoming / episode.name)
    result = receive_episodes(incoming, car_store, [episode.name], **kwargs)
    assert result.published == []
    return car_store, result.errors


def test_a_good_episode_is_published(tmp_path: Path) -> None:
    episode = record(tmp_path / "car", "car1", 8)
    car_store = tmp_path / "store" / "car1"
    (car_store / ".incoming").mkdir(parents=True)
    shutil.move(episode, car_store / ".incoming" / episode.name)
    result = receive_episodes(car_store / ".incoming", car_store, [episode.name], quota_bytes=10**9)
    assert (result.published, result.errors) == ([episode.name], [])
    assert open_episode(car_store / episode.name).steps()


def test_an_episode_that_is_a_symlink_is_removed_unread(tmp_path: Path) -> None:
    outside = record(tmp_path / "elsewhere", "car1", 5)  # a real episode, outside the store
    link = tmp_path / "car" / "car1" / outside.name
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    car_store, errors = receive_one(tmp_path, link)
    assert errors == [f"episode {outside.name}: a symlink, removed unread"]
    assert [p.name for p in car_store.iterdir()] == [".incoming"]
    assert list((car_store / ".incoming").iterdir()) == []
    assert open_episode(outside).steps(), "what the link pointed to is untouched"


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("symlinked file", "front.jpg.bin resolves to /etc/hostname, outside the episode"),
        ("listed outside", "../../../../../../etc/hostname resolves to /"),
        ("listed absolute", "/etc/hostname resolves to /etc/hostname, outside the episode"),
        ("unlisted file", "notes.txt is not listed in episode.json"),
        ("symlinked directory", "sub is a symlink"),
        ("fifo", "pipe is not a regular file"),
        ("deep", "episode.json is nested too deeply to parse"),
        ("huge", "episode.json is 1048577 bytes, more than the 1048576 allowed"),
        ("duplicate key", "episode.json has the key 'car' twice in one object"),
        ("camera name", "episode.json has a bad cameras"),
        ("modes", "episode.json has a bad modes"),
        ("takeovers", "episode.json has a bad takeovers"),
        ("file entry", "episode.json lists 'steps.jsonl' without its bytes and sha256"),
    ],
)
def test_a_hostile_episode_is_quarantined_naming_why(tmp_path: Path, tamper: str, message: str) -> None:
    episode = record(tmp_path / "car", "car1", 5)
    meta = json.loads((episode / EPISODE_FILE).read_text())
    text: str | None = None
    if tamper == "symlinked file":
        (episode / "front.jpg.bin").unlink()
        (episode / "front.jpg.bin").symlink_to("/etc/hostname")
    elif tamper in ("listed outside", "listed absolute"):
        name = "../../../../../../etc/hostname" if tamper == "listed outside" else "/etc/hostname"
        meta["files"][name] = {"bytes": 1, "sha256": "0" * 64}
    elif tamper == "unlisted file":
        (episode / "notes.txt").write_text("hello")
    elif tamper == "symlinked directory":
        (episode / "sub").symlink_to("/etc")
    elif tamper == "fifo":
        import os  # noqa: PLC0415

        os.mkfifo(episode / "pipe")
    elif tamper == "deep":
        text = "[" * 100_000 + "]" * 100_000
    elif tamper == "huge":
        text = json.dumps(meta)
        text = text[:-1] + ', "pad": "' + "x" * (2**20 - len(text) - 10) + '"}'
        assert len(text) == 2**20 + 1
    elif tamper == "duplicate key":
        text = json.dumps(meta)[:-1] + ', "car": "car9"}'
    elif tamper == "camera name":
        meta["cameras"][0]["name"] = "../../front"
    elif tamper == "modes":
        meta["modes"] = "all of them"
    elif tamper == "takeovers":
        meta["takeovers"] = [[1]]
    elif tamper == "file entry":
        meta["files"]["steps.jsonl"] = ["bytes", 3]
        text = json.dumps(meta)  # not sealed: that would write a proper entry
    if text is None:
        seal(episode, meta)
    else:
        (episode / EPISODE_FILE).write_text(text)
    name = episode.name
    car_store, errors = receive_one(tmp_path, episode)
    assert len(errors) == 1
    assert errors[0].startswith(f"episode {name}.partial: "), errors
    assert message in errors[0], errors
    assert errors[0].endswith(f"(quarantined as {name}.partial)")
    assert sorted(p.name for p in car_store.iterdir()) == [".incoming", f"{name}.partial"]
    assert find_episodes(tmp_path / "store") == [], "a quarantined episode is never merged"


def test_an_episode_past_the_cars_quota_is_not_taken(tmp_path: Path) -> None:
    first, second = record(tmp_path / "car", "car1", 10), record(tmp_path / "car", "car1", 10)
    size = sum(p.stat().st_size for p in first.iterdir())
    car_store = tmp_path / "store" / "car1"
    incoming = car_store / ".incoming"
    incoming.mkdir(parents=True)
    for episode in (first, second):
        shutil.move(episode, incoming / episode.name)
    result = receive_episodes(incoming, car_store, [first.name, second.name], quota_bytes=size + size // 2)
    assert result.published == [first.name]
    assert len(result.errors) == 1
    assert f"episode {second.name}: " in result.errors[0]
    assert f"would pass the car's quota of {size + size // 2} bytes ({size} in its store)" in result.errors[0]
    assert sorted(p.name for p in car_store.iterdir()) == [".incoming", first.name]


@pytest.mark.parametrize("name", ["..", ".", ".hidden", "a/b", "", "x.partial", "-rf", "a\nb"])
def test_names_that_are_not_episode_names_are_refused(tmp_path: Path, name: str) -> None:
    car_store = tmp_path / "store" / "car1"
    (car_store / ".incoming").mkdir(parents=True)
    result = receive_episodes(car_store / ".incoming", car_store, [name])
    assert result.errors == [f"episode {name!r}: not an episode name"]
    assert [p.name for p in car_store.iterdir()] == [".incoming"]


# Bad values for the fields of a step line that the merge and the report read; the line's other fields
# stay as recorded. Generated: every field gets every bad value of its kind.
BAD_NUMBERS: list[Any] = ["1", None, True, float("nan"), [1.0]]
BAD_STEP_FIELDS: dict[str, list[Any]] = {
    "i": ["3", 1.5, None, True],
    "wall": BAD_NUMBERS,
    "driver": [0, "yes", None],
    "state": [[0.1], [0.1, "x"], "0.1,0.2", [0.1, 0.2, 0.3], [float("inf"), 0.0]],
    "applied": [[0.1], {"steering": 0.1}, [None, None]],
    "latency_ms": ["12", [12]],
    "temp_c": ["hot", float("nan")],
    "frames": [None, [], {"front": [0, 10]}, {"front": [-5, 10, 1]}, {"front": [0, 2**40, 1]}, {"front": 7}],
}
STEP_CASES = [(field, value) for field, values in BAD_STEP_FIELDS.items() for value in values]


def test_garbage_step_lines_are_refused_by_the_merge_and_the_report_never_crash_them(tmp_path: Path) -> None:
    from fleet_drives.report import gather  # noqa: PLC0415

    rng = random.Random(20261205)
    store = tmp_path / "store"
    good = record(store, "car1", 6)
    tampered: dict[str, str] = {}
    for field, value in STEP_CASES:
        episode = record(store, "car2", 6)
        lines = (episode / STEPS_FILE).read_text().splitlines()
        row = rng.randrange(len(lines))
        step = json.loads(lines[row])
        step[field] = value
        lines[row] = json.dumps(step)  # NaN and Infinity as Python writes them
        (episode / STEPS_FILE).write_text("\n".join(lines) + "\n")
        seal(episode)
        tampered[episode.name] = f"{STEPS_FILE} line {row + 1}: bad {field}"
        with pytest.raises(EpisodeError, match=f"line {row + 1}: bad {field}"):
            open_episode(episode).steps()
    result = merge_episodes(find_episodes(store), tmp_path / "dataset")
    assert result.episodes == 1
    skipped = {Path(s["episode"]).name: s["error"] for s in result.skipped}
    assert set(skipped) == set(tampered)
    for name, reason in tampered.items():
        assert reason in skipped[name], skipped[name]
    groups, report_skipped = gather(find_episodes(store))
    assert [(g.car, g.episodes) for g in groups] == [("car1", 1)]
    assert {Path(s["episode"]).name for s in report_skipped} == set(tampered)
    assert good.name not in skipped
