"""Unit tests for plugins/module_utils/release_state.py (the car-side release state helper).

The script is standard-library only and not part of a package: it is imported by path, and a few cases run
it as a subprocess exactly as ``ansible.builtin.script`` would.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "plugins" / "module_utils" / "release_state.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("release_state", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["release_state"] = module  # dataclasses look the module up while the class is created
    spec.loader.exec_module(module)
    return module


rs = _load()


def call(capsys, root: Path, *args: str) -> tuple[int, dict]:
    """Run main() in-process; (exit code, the single JSON object printed on stdout)."""
    rc = rs.main(["--root", str(root), *args])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 1, out
    result = json.loads(lines[0])
    if rc == 0:
        assert "error" not in result
        assert err == ""
    else:
        assert set(result) == ({"error", "held"} if rc == 3 else {"error"})
        assert result["error"] in err
    return rc, result


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def make_release(
    root: Path,
    rid: str,
    *,
    bundle: str = "b1",
    created_at: float = 1000.0,
    state: str | None = None,
    reason: str = "",
    activated_at: float | None = None,
    gated_at: float | None = None,
) -> Path:
    """A published release (and its bundle) as Ansible leaves it; status.json only when state is given."""
    (root / "bundles" / bundle).mkdir(parents=True, exist_ok=True)
    (root / "bundles" / bundle / "manifest.json").write_text("{}")
    path = root / "releases" / rid
    (path / "lib").mkdir(parents=True)
    (path / "bundle").symlink_to(f"../../bundles/{bundle}")
    release = {
        "id": rid,
        "bundle": bundle,
        "runtime": "rt1",
        "config_sha256": "0" * 64,
        "created_at": created_at,
    }
    (path / "release.json").write_text(json.dumps(release))
    if state is not None:
        status = {"state": state, "reason": reason, "activated_at": activated_at, "gated_at": gated_at}
        (path / "status.json").write_text(json.dumps(status))
    return path


def set_current(root: Path, rid: str) -> None:
    (root / "current").symlink_to(f"releases/{rid}")


def age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)


def status_of(root: Path, rid: str) -> dict:
    return json.loads((root / "releases" / rid / "status.json").read_text())


# ---------------------------------------- lock


def test_lock_creates_root_and_owner(tmp_path, capsys):
    root = tmp_path / "opt" / "rover"
    rc, out = call(capsys, root, "lock", "--run", "r1", "--owner", "alice@ctl", "--stale-after", "600")
    assert rc == 0
    assert out["changed"] is True
    assert "broke" not in out
    owner = json.loads((root / ".deploy.lock" / "owner.json").read_text())
    assert owner["run"] == "r1"
    assert owner["owner"] == "alice@ctl"
    assert abs(owner["since"] - time.time()) < 5
    assert out["lock"] == owner
    assert oct(root.stat().st_mode & 0o777) == oct(0o755 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_lock_same_run_reenters_without_change(tmp_path, capsys):
    call(capsys, tmp_path, "lock", "--run", "r1", "--owner", "alice", "--stale-after", "600")
    before = (tmp_path / ".deploy.lock" / "owner.json").read_text()
    rc, out = call(capsys, tmp_path, "lock", "--run", "r1", "--owner", "alice", "--stale-after", "600")
    assert (rc, out["changed"]) == (0, False)
    assert "broke" not in out
    assert (tmp_path / ".deploy.lock" / "owner.json").read_text() == before


def test_lock_contention_names_owner_and_how_to_break(tmp_path, capsys):
    call(capsys, tmp_path, "lock", "--run", "r1", "--owner", "alice@laptop", "--stale-after", "600")
    rc, out = call(capsys, tmp_path, "lock", "--run", "r2", "--owner", "bob", "--stale-after", "600")
    assert rc == 3  # busy: a retry later, not a failure
    msg = out["error"]
    assert msg.startswith("deploy lock held by alice@laptop (run r1) since ")
    assert "Z, 0 s ago: another deploy is running on this car" in msg
    assert "pass -e rover_release_break_lock=true" in msg
    owner = json.loads((tmp_path / ".deploy.lock" / "owner.json").read_text())
    assert owner["run"] == "r1"  # untouched


def test_lock_stale_is_taken_over(tmp_path, capsys):
    (tmp_path / ".deploy.lock").mkdir()
    old = {"run": "r0", "owner": "ci", "since": time.time() - 3600}
    (tmp_path / ".deploy.lock" / "owner.json").write_text(json.dumps(old))
    rc, out = call(capsys, tmp_path, "lock", "--run", "r1", "--owner", "alice", "--stale-after", "600")
    assert (rc, out["changed"]) == (0, True)
    assert out["broke"] == {
        **old,
        "boot_id": "",
        "pid": None,
        "pid_start": None,
        "controller": None,
        "why": "older than 600 s",
    }
    assert json.loads((tmp_path / ".deploy.lock" / "owner.json").read_text())["run"] == "r1"


def test_lock_break_takes_a_fresh_lock(tmp_path, capsys):
    call(capsys, tmp_path, "lock", "--run", "r1", "--owner", "alice", "--stale-after", "600")
    rc, out = call(
        capsys, tmp_path, "lock", "--run", "r2", "--owner", "bob", "--stale-after", "600", "--break"
    )
    assert rc == 0
    assert out["broke"]["run"] == "r1"
    assert out["lock"]["run"] == "r2"


def test_lock_without_owner_file_is_stale_only_by_mtime(tmp_path, capsys):
    ldir = tmp_path / ".deploy.lock"
    ldir.mkdir()
    (ldir / "owner.json").write_text("{not json")
    rc, out = call(capsys, tmp_path, "lock", "--run", "r1", "--owner", "alice", "--stale-after", "600")
    assert rc == 3
    assert "unknown owner" in out["error"]
    assert "owner.json unreadable" in out["error"]
    age(ldir, 3600)
    rc, out = call(capsys, tmp_path, "lock", "--run", "r1", "--owner", "alice", "--stale-after", "600")
    assert rc == 0
    assert out["broke"]["run"] is None
    assert "owner.json unreadable" in out["broke"]["error"]


def test_unlock_only_removes_own_lock(tmp_path, capsys):
    call(capsys, tmp_path, "lock", "--run", "r1", "--owner", "alice", "--stale-after", "600")
    rc, out = call(capsys, tmp_path, "unlock", "--run", "r2")
    assert (rc, out["changed"]) == (0, False)
    assert out["lock"]["run"] == "r1"
    assert (tmp_path / ".deploy.lock" / "owner.json").is_file()
    rc, out = call(capsys, tmp_path, "unlock", "--run", "r1")
    assert (rc, out["changed"]) == (0, True)
    assert not (tmp_path / ".deploy.lock").exists()
    rc, out = call(capsys, tmp_path, "unlock", "--run", "r1")
    assert (rc, out["changed"]) == (0, False)


# ---------------------------------------- status


def test_status_of_a_car_without_releases(tmp_path, capsys):
    rc, out = call(capsys, tmp_path / "missing", "status")
    assert rc == 0
    assert out["current"] is None
    assert out["releases"] == []
    assert out["staging"] == []
    assert out["lock"] is None
    assert out["rollback_target"] is None


def test_status_orders_releases_and_reports_staging(tmp_path, capsys):
    make_release(tmp_path, "never", created_at=5000.0)
    make_release(tmp_path, "older", state="good", activated_at=100.0, created_at=10.0)
    make_release(tmp_path, "newer", state="bad", reason="crash", activated_at=200.0, created_at=20.0)
    make_release(tmp_path, "neverold", created_at=1.0)
    set_current(tmp_path, "newer")
    (tmp_path / "releases" / ".incoming-x-r9").mkdir()
    (tmp_path / "bundles" / ".incoming-h-r9").mkdir()
    rc, out = call(capsys, tmp_path, "status")
    assert rc == 0
    assert [r["id"] for r in out["releases"]] == ["newer", "older", "never", "neverold"]
    assert out["releases"][0]["state"] == "bad"
    assert out["releases"][0]["reason"] == "crash"
    assert out["releases"][2]["state"] == "new"
    assert out["current"] == "newer"
    assert out["current_missing"] is False
    assert out["rollback_target"] == "older"
    assert out["staging"] == ["bundles/.incoming-h-r9", "releases/.incoming-x-r9"]


def test_corrupt_release_json_is_bad_and_never_a_target(tmp_path, capsys):
    make_release(tmp_path, "broken", state="good", activated_at=500.0)
    (tmp_path / "releases" / "broken" / "release.json").write_text("{trunc")
    make_release(tmp_path, "nojson", state="good", activated_at=400.0)
    (tmp_path / "releases" / "nojson" / "release.json").unlink()
    make_release(tmp_path, "cur", state="good", activated_at=600.0)
    set_current(tmp_path, "cur")
    rc, out = call(capsys, tmp_path, "status")
    assert rc == 0
    by_id = {r["id"]: r for r in out["releases"]}
    for rid in ("broken", "nojson"):
        assert by_id[rid]["state"] == "bad"
        assert by_id[rid]["reason"].startswith("release.json unreadable: ")
    assert out["rollback_target"] is None
    rc, out = call(capsys, tmp_path, "rollback-target")
    assert rc == 1
    assert out["error"].startswith("no good release to roll back to (releases: ")
    assert "broken (bad)" in out["error"]
    rc, out = call(capsys, tmp_path, "switch", "--to", "broken")
    assert rc == 1
    assert "release.json unreadable" in out["error"]
    # End to end: a corrupt file gives JSON, never a traceback.
    proc = cli(tmp_path, "rollback-target", "--to", "bro")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "broken" in json.loads(proc.stdout)["error"]


def test_current_pointing_at_missing_release(tmp_path, capsys):
    (tmp_path / "releases").mkdir()
    set_current(tmp_path, "gone")
    rc, out = call(capsys, tmp_path, "status")
    assert rc == 0
    assert out["current"] == "gone"
    assert out["current_missing"] is True


def test_status_reads_the_runtime_metrics(tmp_path, capsys):
    make_release(tmp_path, "cur", state="good", activated_at=1.0)
    set_current(tmp_path, "cur")
    metrics = tmp_path / "metrics.json"
    rc, out = call(capsys, tmp_path, "status")
    assert rc == 0
    assert out["metrics"] is None
    rc, out = call(capsys, tmp_path, "status", "--metrics", str(metrics))
    assert rc == 0
    assert out["metrics"] is None  # no metrics file: nothing runs (yet)
    metrics.write_text(json.dumps({"release": {"id": "cur"}, "driving": False}))
    rc, out = call(capsys, tmp_path, "status", "--metrics", str(metrics))
    assert out["metrics"] == {"release": {"id": "cur"}, "driving": False}
    assert out["current"] == "cur"
    # A torn or foreign file says nothing about what runs: null, never an error that stops the deploy.
    for text in ("{trunc", "[1, 2]"):
        metrics.write_text(text)
        rc, out = call(capsys, tmp_path, "status", "--metrics", str(metrics))
        assert rc == 0
        assert out["metrics"] is None


def test_status_reads_the_venvs_engines_fact(tmp_path, capsys):
    fact = tmp_path / "rover_python.fact"
    rc, out = call(capsys, tmp_path, "status", "--engines-fact", str(fact))
    assert rc == 0
    assert out["engines_fact"] is None  # a car provisioned before the fact existed: not checked
    fact.write_text(json.dumps({"python": "3.13", "architecture": "aarch64", "engines": ["onnxruntime"]}))
    rc, out = call(capsys, tmp_path, "status", "--engines-fact", str(fact))
    assert out["engines_fact"]["engines"] == ["onnxruntime"]
    rc, out = call(capsys, tmp_path, "status")
    assert out["engines_fact"] is None  # not asked for
    fact.write_text('{"engines": [')  # torn
    rc, out = call(capsys, tmp_path, "status", "--engines-fact", str(fact))
    assert rc == 0
    assert out["engines_fact"] is None


# ---------------------------------------- switch / mark


def test_switch_relative_symlink_previous_and_idempotent(tmp_path, capsys):
    make_release(tmp_path, "a", state="good", reason="ok", activated_at=1.0, gated_at=2.0)
    make_release(tmp_path, "b")
    rc, out = call(capsys, tmp_path, "switch", "--to", "a")
    assert out == {"changed": True, "previous": None, "current": "a"}
    assert str((tmp_path / "current").readlink()) == "releases/a"
    st = status_of(tmp_path, "a")
    assert st["state"] == "good"
    assert st["reason"] == "ok"
    assert st["gated_at"] == 2.0
    assert abs(st["activated_at"] - time.time()) < 5

    rc, out = call(capsys, tmp_path, "switch", "--to", "b")
    assert out == {"changed": True, "previous": "a", "current": "b"}
    assert str((tmp_path / "current").readlink()) == "releases/b"
    assert status_of(tmp_path, "b")["state"] == "trial"  # until its gate passes
    assert status_of(tmp_path, "b")["activated_boot"] == rs.boot_id()
    assert not list(tmp_path.glob(".current-*"))

    before = (tmp_path / "releases" / "b" / "status.json").read_text()
    rc, out = call(capsys, tmp_path, "switch", "--to", "b")
    assert (rc, out) == (0, {"changed": False, "previous": "b", "current": "b"})
    assert (tmp_path / "releases" / "b" / "status.json").read_text() == before


def test_switch_to_unknown_release_lists_present_ones(tmp_path, capsys):
    make_release(tmp_path, "a")
    rc, out = call(capsys, tmp_path, "switch", "--to", "zzz")
    assert rc == 1
    assert "release zzz is not on this car (releases: a (new))" in out["error"]
    assert not (tmp_path / "current").exists()
    rc, out = call(capsys, tmp_path, "switch", "--to", "../a")
    assert rc == 1


def test_mark_keeps_activation_and_reports_change(tmp_path, capsys):
    make_release(tmp_path, "a", state="new", activated_at=42.0)
    rc, out = call(capsys, tmp_path, "mark", "--id", "a", "--state", "good", "--reason", "gate passed")
    assert (rc, out["changed"]) == (0, True)
    st = status_of(tmp_path, "a")
    assert (st["state"], st["reason"], st["activated_at"]) == ("good", "gate passed", 42.0)
    assert abs(st["gated_at"] - time.time()) < 5
    rc, out = call(capsys, tmp_path, "mark", "--id", "a", "--state", "good", "--reason", "gate passed")
    assert out["changed"] is False
    rc, out = call(capsys, tmp_path, "mark", "--id", "a", "--state", "bad", "--reason", "latency")
    assert out["changed"] is True
    assert status_of(tmp_path, "a")["state"] == "bad"


# ---------------------------------------- rollback


def test_rollback_target_skips_bad_and_current(tmp_path, capsys):
    make_release(tmp_path, "cur", state="good", activated_at=400.0)
    make_release(tmp_path, "badnew", state="bad", reason="crash", activated_at=300.0, gated_at=301.0)
    make_release(tmp_path, "goodold", state="good", activated_at=100.0)
    make_release(tmp_path, "goodmid", state="good", activated_at=200.0)
    make_release(tmp_path, "fresh", created_at=9999.0)
    set_current(tmp_path, "cur")
    rc, out = call(capsys, tmp_path, "rollback-target")
    assert (rc, out) == (0, {"target": "goodmid", "current": "cur"})


def test_rollback_target_by_prefix(tmp_path, capsys):
    make_release(tmp_path, "abc111", state="good", activated_at=1.0)
    make_release(tmp_path, "abc222", state="good", activated_at=2.0)
    make_release(tmp_path, "dead00", state="bad", reason="too slow: 80 ms", activated_at=3.0, gated_at=0.0)
    rc, out = call(capsys, tmp_path, "rollback-target", "--to", "abc")
    assert rc == 1
    assert "'abc' matches 2 releases (abc111, abc222)" in out["error"]
    rc, out = call(capsys, tmp_path, "rollback-target", "--to", "abc2")
    assert (rc, out) == (0, {"target": "abc222", "current": None})
    rc, out = call(capsys, tmp_path, "rollback-target", "--to", "zz")
    assert rc == 1
    assert "no release on this car starts with 'zz'" in out["error"]
    rc, out = call(capsys, tmp_path, "rollback-target", "--to", "dead")
    assert rc == 1
    assert out["error"] == (
        "release dead00 failed its health gate on 1970-01-01T00:00:00Z: too slow: 80 ms; "
        "not rolling back to it"
    )


def test_rollback_target_none_available(tmp_path, capsys):
    make_release(tmp_path, "cur", state="good", activated_at=1.0)
    make_release(tmp_path, "b", state="bad", activated_at=2.0)
    set_current(tmp_path, "cur")
    rc, out = call(capsys, tmp_path, "rollback-target")
    assert rc == 1
    assert out["error"] == "no good release to roll back to (releases: b (bad), cur (good))"


# ---------------------------------------- prune


def test_prune_ranks_current_good_new_bad(tmp_path, capsys):
    make_release(tmp_path, "cur", bundle="h-cur", state="bad", reason="x", activated_at=500.0)
    make_release(tmp_path, "good1", bundle="h-g1", state="good", activated_at=100.0)
    make_release(tmp_path, "good2", bundle="h-g2", state="good", activated_at=200.0)
    make_release(tmp_path, "bad1", bundle="h-b1", state="bad", activated_at=400.0)
    make_release(tmp_path, "new1", bundle="h-g2", created_at=300.0)
    set_current(tmp_path, "cur")
    rc, out = call(capsys, tmp_path, "prune", "--keep", "3", "--run", "r1", "--stale-after", "600")
    assert rc == 0
    assert out["changed"] is True
    assert out["kept"] == ["cur", "good2", "good1"]
    assert sorted(out["removed"]) == ["bundles/h-b1", "releases/bad1", "releases/new1"]
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["cur", "good1", "good2"]
    # h-g2 is shared by the removed new1 and the kept good2: it stays.
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == ["h-cur", "h-g1", "h-g2"]

    rc, out = call(capsys, tmp_path, "prune", "--keep", "1", "--run", "r1", "--stale-after", "600")
    assert out["kept"] == ["cur"]  # current kept even though it is bad
    rc, out = call(capsys, tmp_path, "prune", "--keep", "1", "--run", "r1", "--stale-after", "600")
    assert (out["changed"], out["removed"]) == (False, [])


def test_prune_drops_bad_before_good(tmp_path, capsys):
    make_release(tmp_path, "badrecent", state="bad", activated_at=900.0, created_at=900.0)
    make_release(tmp_path, "goodold", state="good", activated_at=1.0, created_at=1.0)
    rc, out = call(capsys, tmp_path, "prune", "--keep", "1", "--run", "r1", "--stale-after", "600")
    assert rc == 0
    assert out["kept"] == ["goodold"]
    assert out["removed"] == ["releases/badrecent"]


def test_prune_staging_and_orphaned_bundles(tmp_path, capsys):
    make_release(tmp_path, "cur", bundle="h1", state="good", activated_at=1.0)
    set_current(tmp_path, "cur")
    (tmp_path / "bundles" / "orphan").mkdir()
    rel, bun = tmp_path / "releases", tmp_path / "bundles"
    stale_other = rel / ".incoming-x-r0"
    fresh_other = rel / ".incoming-y-r2"
    own_old = rel / ".incoming-z-r1"
    stale_bundle = bun / ".incoming-h9-r0"
    own_bundle = bun / ".incoming-h8-r1"
    for p in (stale_other, fresh_other, own_old, stale_bundle, own_bundle):
        p.mkdir()
    # The fresh staging of another run refers to a published bundle: the bundle must stay.
    (bun / "h-staged").mkdir()
    (fresh_other / "bundle").symlink_to("../../bundles/h-staged")
    for p in (stale_other, own_old, stale_bundle, own_bundle):
        age(p, 3600)
    rc, out = call(capsys, tmp_path, "prune", "--keep", "3", "--run", "r1", "--stale-after", "600")
    assert rc == 0
    assert sorted(out["removed"]) == [
        "bundles/.incoming-h9-r0",
        "bundles/orphan",
        "releases/.incoming-x-r0",
    ]
    assert not stale_other.exists()
    assert not stale_bundle.exists()
    assert fresh_other.is_dir()
    assert own_old.is_dir()
    assert own_bundle.is_dir()
    assert (bun / "h1").is_dir()
    assert (bun / "h-staged").is_dir()


def test_prune_refuses_keep_zero(tmp_path):
    proc = cli(tmp_path, "prune", "--keep", "0", "--run", "r1", "--stale-after", "600")
    assert proc.returncode == 2
    assert "at least 1" in proc.stderr


# ---------------------------------------- publish


def test_publish_moves_then_is_idempotent(tmp_path, capsys):
    (tmp_path / "releases").mkdir()
    src = tmp_path / "releases" / ".incoming-abc-r1"
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "x.py").write_text("print(1)\n")
    rc, out = call(capsys, tmp_path, "publish", "--from", "releases/.incoming-abc-r1", "--to", "releases/abc")
    assert (rc, out["changed"]) == (0, True)
    assert (tmp_path / "releases" / "abc" / "lib" / "x.py").read_text() == "print(1)\n"
    assert not src.exists()
    # Same id again: the new staging is dropped, the published release is untouched.
    (src / "lib").mkdir(parents=True)
    (src / "lib" / "x.py").write_text("other\n")
    rc, out = call(capsys, tmp_path, "publish", "--from", "releases/.incoming-abc-r1", "--to", "releases/abc")
    assert (rc, out["changed"]) == (0, False)
    assert not src.exists()
    assert (tmp_path / "releases" / "abc" / "lib" / "x.py").read_text() == "print(1)\n"


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        ("releases/../../etc", "releases/abc"),
        ("releases/.incoming-abc-r1", "releases/../abc"),
        ("/etc", "releases/abc"),
        ("releases/.incoming-abc-r1", "/tmp/abc"),
    ],
)
def test_publish_refuses_escaping_paths(tmp_path, capsys, src, dst):
    (tmp_path / "releases" / ".incoming-abc-r1").mkdir(parents=True)
    rc, out = call(capsys, tmp_path, "publish", "--from", src, "--to", dst)
    assert rc == 1
    assert "without '..'" in out["error"]
    assert (tmp_path / "releases" / ".incoming-abc-r1").is_dir()
    assert not (tmp_path / "abc").exists()


# ---------------------------------------- CLI end to end


def test_cli_lock_contention_end_to_end(tmp_path):
    first = cli(tmp_path, "lock", "--run", "r1", "--owner", "alice", "--stale-after", "600")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["changed"] is True
    second = cli(tmp_path, "lock", "--run", "r2", "--owner", "bob", "--stale-after", "600")
    assert second.returncode == 3
    assert len(second.stdout.splitlines()) == 1
    error = json.loads(second.stdout)["error"]
    assert "deploy lock held by alice (run r1)" in error
    assert error in second.stderr


def test_cli_switch_and_status_end_to_end(tmp_path):
    make_release(tmp_path, "rel1", state="good", activated_at=1.0)
    proc = cli(tmp_path, "switch", "--to", "rel1")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"changed": True, "current": "rel1", "previous": None}
    proc = cli(tmp_path, "status")
    assert proc.returncode == 0
    status = json.loads(proc.stdout)
    assert status["current"] == "rel1"
    assert status["releases"][0]["state"] == "good"


def test_cli_bad_arguments_exit_2(tmp_path):
    proc = cli(tmp_path, "mark", "--id", "a", "--state", "ugly")
    assert proc.returncode == 2


def lock(
    capsys, root: Path, run: str, *extra: str, owner: str = "alice", stale: str = "600"
) -> tuple[int, dict]:
    """`lock --run RUN --owner OWNER --stale-after STALE [extra]` in-process."""
    return call(capsys, root, "lock", "--run", run, "--owner", owner, "--stale-after", stale, *extra)


# ---------------------------------------- boots: trial releases and locks from an earlier boot


@pytest.fixture
def boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A stand-in for /proc/sys/kernel/random/boot_id; `boot("new-id")` reboots the car."""
    path = tmp_path / "boot_id"
    path.write_text("boot-1\n")
    monkeypatch.setattr(rs, "BOOT_ID_FILE", path)

    def reboot(new_id: str) -> None:
        path.write_text(new_id + "\n")

    return reboot


def test_the_real_boot_id_is_read() -> None:
    assert len(rs.boot_id()) == 36  # a UUID: the kernel's (or the container's own)


def test_lock_from_an_earlier_boot_is_stale_at_once(tmp_path, capsys, boot):
    root = tmp_path / "r"
    lock(capsys, root, "r1", owner="pull@car", stale="3600")
    rc, out = lock(capsys, root, "r2", owner="bob", stale="3600")
    assert rc == 3  # the same boot: held
    boot("boot-2")
    rc, out = lock(capsys, root, "r2", owner="bob", stale="3600")
    assert (rc, out["changed"]) == (0, True), out
    assert out["broke"]["why"] == "it was taken before the car last booted"
    assert out["lock"]["boot_id"] == "boot-2"


def test_lock_of_a_process_that_ended_is_stale_at_once(tmp_path, capsys, boot):
    root = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rc, out = call(
            capsys,
            root,
            "lock",
            "--run",
            "r1",
            "--owner",
            "pull",
            "--stale-after",
            "3600",
            "--pid",
            str(holder.pid),
        )
        assert (rc, out["lock"]["pid"]) == (0, holder.pid)
        assert out["lock"]["pid_start"] == rs.process_start(holder.pid)
        rc, out = lock(capsys, root, "r2", owner="bob", stale="3600")
        assert rc == 3, out  # its holder runs
    finally:
        holder.kill()
        holder.wait()
    rc, out = lock(capsys, root, "r2", owner="bob", stale="3600")
    assert (rc, out["changed"]) == (0, True), out
    assert out["broke"]["why"] == f"its process {holder.pid} has ended"


def test_lock_naming_a_process_reused_by_another_is_stale(tmp_path, capsys, boot):
    (tmp_path / ".deploy.lock").mkdir()
    mine = os.getpid()  # alive, but not started at the recorded time: another process with the same pid
    owner = {
        "run": "r0",
        "owner": "pull",
        "since": time.time(),
        "boot_id": "boot-1",
        "pid": mine,
        "pid_start": 1,
    }
    (tmp_path / ".deploy.lock" / "owner.json").write_text(json.dumps(owner))
    rc, out = lock(capsys, tmp_path, "r1", owner="bob", stale="3600")
    assert (rc, out["broke"]["why"]) == (0, f"its process {mine} has ended")


def test_lock_for_a_process_that_does_not_exist_is_refused_and_leaves_nothing(tmp_path, capsys, boot):
    root = tmp_path / "r"
    root.mkdir()
    rc, out = lock(capsys, root, "r1", "--pid", "999999999", owner="x", stale="9")
    assert rc == 1
    assert "no such process on this car" in out["error"]
    assert not (root / ".deploy.lock").exists()


def _boot_check(capsys, root: Path) -> tuple[int, dict]:
    return call(capsys, root, "boot-check")


def test_boot_check_starts_a_good_release_and_a_trial_of_this_boot(tmp_path, capsys, boot):
    make_release(tmp_path, "a", state="good", activated_at=1.0, gated_at=2.0)
    make_release(tmp_path, "b", created_at=2000.0)
    call(capsys, tmp_path, "switch", "--to", "a")
    assert _boot_check(capsys, tmp_path) == (0, {"start": True, "current": "a", "state": "good"})
    call(capsys, tmp_path, "switch", "--to", "b")
    rc, out = _boot_check(capsys, tmp_path)  # the deploy's restart onto b: under its gate
    assert (rc, out["current"], out["state"]) == (0, "b", "trial")
    assert status_of(tmp_path, "b")["state"] == "trial"


def test_a_trial_cut_by_a_reboot_is_set_aside_for_the_newest_good_release(tmp_path, capsys, boot):
    make_release(tmp_path, "old", state="good", activated_at=1.0, gated_at=2.0)
    make_release(tmp_path, "a", state="good", activated_at=5.0, gated_at=6.0)
    make_release(tmp_path, "b", created_at=2000.0)
    call(capsys, tmp_path, "switch", "--to", "a")
    call(capsys, tmp_path, "switch", "--to", "b")
    boot("boot-2")  # the power came back
    rc, out = _boot_check(capsys, tmp_path)
    assert (rc, out["current"], out["set_aside"]) == (0, "a", "b"), out
    assert "release b was on trial (active since " in out["reason"]
    assert str((tmp_path / "current").readlink()) == "releases/a"
    st = status_of(tmp_path, "b")
    assert st["state"] == "interrupted"
    assert "the next deploy or pull gates it again" in st["reason"]
    assert status_of(tmp_path, "a")["activated_boot"] == "boot-2"
    # The next deploy of b: a trial of this boot again, which boot-check lets start and the gate judges.
    rc, out = call(capsys, tmp_path, "switch", "--to", "b")
    assert status_of(tmp_path, "b")["state"] == "trial"
    assert _boot_check(capsys, tmp_path)[1]["current"] == "b"
    # Nothing left over from the switch-back.
    assert not list(tmp_path.glob(".current-*"))


@pytest.mark.parametrize("restart_first", [False, True], ids=["gate-first", "unit-restart-first"])
def test_a_failed_gate_rolls_back_to_the_newest_good_release_whoever_moves_current_first(
    tmp_path, capsys, boot, restart_first
):
    """The race CI hit twice: the gate marks the trial bad while systemd restarts the failing runtime; the
    restart's boot-check moves `current` off the bad release onto the newest good one before the rollback
    asks where to go. "The newest good release other than the active one" then named the one before it; the
    gate's rollback names the release it leaves, and lands on the newest good one either way."""
    make_release(tmp_path, "older", state="good", activated_at=1.0, gated_at=2.0)
    make_release(tmp_path, "last", state="good", activated_at=5.0, gated_at=6.0)
    make_release(tmp_path, "trial", created_at=2000.0)
    call(capsys, tmp_path, "switch", "--to", "last")
    call(capsys, tmp_path, "switch", "--to", "trial")
    call(capsys, tmp_path, "mark", "--id", "trial", "--state", "bad", "--reason", "crash loop")
    if restart_first:
        rc, out = _boot_check(capsys, tmp_path)
        assert (rc, out["current"], out["set_aside"]) == (0, "last", "trial"), out
    rc, out = call(capsys, tmp_path, "rollback-target", "--leaving", "trial")
    assert (rc, out["target"]) == (0, "last"), out
    rc, out = call(capsys, tmp_path, "switch", "--to", out["target"])
    assert (rc, out["current"], out["changed"]) == (0, "last", not restart_first), out
    # A rollback by hand (rollback.yml, nothing named) still leaves the active release.
    rc, out = call(capsys, tmp_path, "rollback-target")
    assert (rc, out) == (0, {"target": "older", "current": "last"})


def test_rollback_target_takes_either_a_release_or_the_one_it_leaves(tmp_path):
    make_release(tmp_path, "a", state="good", activated_at=1.0)
    proc = cli(tmp_path, "rollback-target", "--to", "a", "--leaving", "b")
    assert proc.returncode == 2
    assert "not allowed with argument" in proc.stderr, proc.stderr
    proc = cli(tmp_path, "rollback-target", "--leaving", "../x")
    assert proc.returncode == 1
    assert "invalid release id '../x'" in json.loads(proc.stdout)["error"], proc.stdout


def test_with_no_good_release_the_runtime_does_not_start(tmp_path, capsys, boot):
    make_release(tmp_path, "b")
    call(capsys, tmp_path, "switch", "--to", "b")
    boot("boot-2")
    rc, out = _boot_check(capsys, tmp_path)
    assert rc == 1
    assert out["error"].startswith("the runtime does not start: release b was on trial")
    assert out["error"].endswith("; no good release to start")
    assert status_of(tmp_path, "b")["state"] == "interrupted"
    assert str((tmp_path / "current").readlink()) == "releases/b"  # kept for the next deploy to gate
    rc, out = _boot_check(capsys, tmp_path)  # a manual start later: still not
    assert rc == 1
    assert "release b is interrupted (the car restarted during its trial" in out["error"]


def test_an_interrupted_release_already_current_is_a_trial_again_when_switched_to(tmp_path, capsys, boot):
    make_release(tmp_path, "b")
    call(capsys, tmp_path, "switch", "--to", "b")
    boot("boot-2")
    _boot_check(capsys, tmp_path)
    assert call(capsys, tmp_path, "switch", "--to", "b")[1] == {
        "changed": False,
        "previous": "b",
        "current": "b",
    }
    st = status_of(tmp_path, "b")
    assert (st["state"], st["activated_boot"]) == ("trial", "boot-2")
    assert _boot_check(capsys, tmp_path)[0] == 0


@pytest.mark.parametrize("state", ["new", "trial", "interrupted", "bad", None])
@pytest.mark.parametrize("same_boot", [True, False])
@pytest.mark.parametrize("has_good", [True, False])
def test_boot_check_drives_only_a_proven_release_or_the_trial_under_its_gate(  # noqa: PLR0917
    tmp_path, capsys, boot, state, same_boot, has_good
):
    """Every state of `current` x whether it was activated in this boot x whether a good release exists."""
    if has_good:
        make_release(tmp_path, "good", state="good", activated_at=1.0, gated_at=2.0)
    status = None if state is None else state
    make_release(tmp_path, "cur", created_at=3000.0, state=status, activated_at=10.0)
    if status is not None:
        st = status_of(tmp_path, "cur")
        st["activated_boot"] = "boot-1" if same_boot else "boot-0"
        (tmp_path / "releases" / "cur" / "status.json").write_text(json.dumps(st))
    set_current(tmp_path, "cur")
    rc, out = _boot_check(capsys, tmp_path)
    runs_cur = state == "trial" and same_boot
    current = str((tmp_path / "current").readlink())
    if runs_cur:
        assert (rc, current) == (0, "releases/cur")
    elif has_good:
        assert (rc, out["current"], current) == (0, "good", "releases/good")
    else:
        assert rc == 1
        assert current == "releases/cur"
    after = rs.read_release(tmp_path / "releases" / "cur").state
    expected = {None: "interrupted", "new": "interrupted", "trial": "trial" if runs_cur else "interrupted"}
    assert after == expected.get(state, state)


def test_boot_check_without_any_release_does_not_start(tmp_path, capsys, boot):
    rc, out = _boot_check(capsys, tmp_path / "absent")
    assert rc == 1
    assert "no release" in out["error"]
    proc = cli(tmp_path, "boot-check")  # as the unit's ExecCondition runs it: exit 1 skips the start
    assert proc.returncode == 1
    assert "the runtime does not start: no release is active (no current)" in proc.stderr


def test_a_busy_lock_says_who_holds_it_as_data(tmp_path, capsys, boot):
    lock(capsys, tmp_path, "r1", "--controller", "ctl:42:7")
    rc, out = lock(capsys, tmp_path, "r2", owner="bob")
    assert rc == 3
    assert out["held"]["run"] == "r1"
    assert out["held"]["controller"] == {"host": "ctl", "pid": 42, "start": 7}


def test_take_over_takes_only_the_named_runs_lock(tmp_path, capsys, boot):
    lock(capsys, tmp_path, "r1")
    rc, out = lock(capsys, tmp_path, "r3", "--take-over", "r2", owner="bob")
    assert rc == 3  # r1 holds it, not r2: its controller never said r1 ended
    rc, out = lock(capsys, tmp_path, "r3", "--take-over", "r1", owner="bob")
    assert (rc, out["broke"]["run"]) == (0, "r1")
    assert "an interrupted run" in out["broke"]["why"]


def test_a_run_of_this_machine_whose_process_ended_is_stale_at_once(tmp_path, capsys, boot):
    """Pull mode: the deploy runs on the car itself, so the car can tell its run's process has ended."""
    import socket  # noqa: PLC0415

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    me = f"{socket.gethostname()}:{holder.pid}:{rs.process_start(holder.pid)}"
    try:
        lock(capsys, tmp_path, "r1", "--controller", me, owner="pull")
        assert lock(capsys, tmp_path, "r2", owner="b")[0] == 3
    finally:
        holder.kill()
        holder.wait()
    rc, out = lock(capsys, tmp_path, "r2", owner="b")
    assert (rc, out["broke"]["why"]) == (0, f"its run's process {holder.pid} has ended")


@pytest.mark.parametrize("bad", ["ctl", "ctl:1", "ctl:x:1", ":1:2", "ctl:1:-2"])
def test_a_malformed_controller_process_is_refused(tmp_path, capsys, bad):
    rc, out = lock(capsys, tmp_path, "r1", "--controller", bad, owner="a", stale="6")
    assert rc == 1
    assert "is not <host>:<pid>:<start ticks>" in out["error"]
    assert not (tmp_path / ".deploy.lock").exists()
