"""The demo's caches are keyed by the code that makes them and the lock: any edit makes a new entry."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from quantization.code_fingerprint import LOCK_FILE, REPO_DIR, code_fingerprint, package_files
from quantization.demo import BUNDLE_CODE
from quantization.demo_data import GENERATOR_FILES
from quantization.train_demo import TRAIN_FILES


def _tree(root: Path) -> list[Path]:
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "a.py").write_text("A = 1\n")
    (root / "pkg" / "b.py").write_text("B = 2\n")
    (root / "requirements").mkdir()
    (root / "requirements" / LOCK_FILE.name).write_text("torch==2.11.0 --hash=sha256:00\n")
    return package_files("pkg/*.py", root=root)


def test_an_edit_to_any_file_or_to_the_lock_changes_the_fingerprint(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    before = code_fingerprint(files, root=tmp_path)
    assert code_fingerprint(files, root=tmp_path) == before  # stable
    (tmp_path / "pkg" / "b.py").write_text("B = 3\n")
    after_edit = code_fingerprint(files, root=tmp_path)
    assert after_edit != before
    (tmp_path / "requirements" / LOCK_FILE.name).write_text("torch==2.11.1 --hash=sha256:01\n")
    assert code_fingerprint(files, root=tmp_path) not in (before, after_edit)


def test_a_renamed_file_changes_the_fingerprint(tmp_path: Path) -> None:
    files = _tree(tmp_path)
    before = code_fingerprint(files, root=tmp_path)
    shutil.move(tmp_path / "pkg" / "b.py", tmp_path / "pkg" / "c.py")
    assert code_fingerprint(package_files("pkg/*.py", root=tmp_path), root=tmp_path) != before


def test_the_cache_keys_cover_the_code_that_makes_each_artifact() -> None:
    """Every module of quantization and its backends that is loaded here is in the bundles' key, and the
    dataset's and policy's keys name files that exist (a rename would otherwise drop them silently)."""
    bundle_files = set(package_files(*BUNDLE_CODE))
    assert (REPO_DIR / "quantization" / "backends" / "executorch.py") in bundle_files
    assert (REPO_DIR / "rover_runtime" / "backends" / "executorch_model.py") in bundle_files
    loaded = {
        Path(file).resolve()
        for name, module in list(sys.modules.items())
        if name.startswith("quantization") and (file := getattr(module, "__file__", None))
    }
    assert loaded <= bundle_files, loaded - bundle_files
    for name in (*GENERATOR_FILES, *TRAIN_FILES):
        assert (REPO_DIR / name).is_file(), name
    assert LOCK_FILE.is_file()
