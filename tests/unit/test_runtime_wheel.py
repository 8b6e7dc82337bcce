"""The rover_runtime wheel that goes to cars (roles/rover_runtime_service/files/build_wheel.py): the car's
code only. The firmware simulator and the test bundle writer stay on the controller, and changing them does
not make a new wheel for the fleet."""

from __future__ import annotations

import importlib.util
import shutil
import zipfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "roles" / "rover_runtime_service" / "files" / "build_wheel.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_wheel", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_source(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "rover_runtime", source / "rover_runtime", ignore=skip)
    return source


def test_the_cars_wheel_holds_the_runtime_without_its_test_only_modules(tmp_path: Path) -> None:
    build_wheel = _script()
    source = _copy_source(tmp_path)
    result = build_wheel.build(source, tmp_path / "cache")
    names = set(zipfile.ZipFile(result["wheel"]).namelist())
    for shipped in ("vehicle.py", "firmware.py", "serial_link.py", "cli.py", "parts/pilot.py"):
        assert f"rover_runtime/{shipped}" in names
    for test_only in build_wheel.TEST_ONLY:
        assert (source / "rover_runtime" / test_only).is_file()
        assert f"rover_runtime/{test_only}" not in names

    # A test-only module changed: the same wheel. A shipped one changed: a new one.
    (source / "rover_runtime" / "testing.py").write_text("# changed\n", encoding="utf-8")
    assert build_wheel.build(source, tmp_path / "cache") == {**result, "built": False}
    with (source / "rover_runtime" / "vehicle.py").open("a", encoding="utf-8") as f:
        f.write("# changed\n")
    again = build_wheel.build(source, tmp_path / "cache")
    assert again["built"]
    assert again["key"] != result["key"]
