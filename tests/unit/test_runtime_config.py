"""rover_runtime.config: documented defaults, file + CLI overrides, errors naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rover_runtime import cli
from rover_runtime.config import ConfigError, default_config_text, load_config


def test_defaults_load_and_match_the_documented_file() -> None:
    config = load_config()
    assert config.control.rate_hz == 30.0
    assert config.control.mode == "auto"  # temporal ensembling follows the bundle
    assert config.policy.threads == 0  # every core but one
    assert (config.cameras, config.state) == ((), ())
    assert config.serial.port == "/dev/rover-arduino"
    assert config.serial.throttle_limits == (-0.5, 0.5)
    assert config.metrics.path == "/run/rover/metrics.json"
    assert config.policy.engine == "auto"
    # every key of every section is documented by a comment block in the defaults file
    assert "rate_hz = 30.0" in default_config_text()


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "rover.toml"
    path.write_text(
        '[control]\nrate_hz = 50\nmode = "ensemble"\n[camera]\ndevice = 2\n'
        '[cameras]\nrear = 4\nfront = "/dev/v4l/by-id/front"\n[state]\nvelocity = "wheel_speed_mps"\n'
    )
    config = load_config(path, {"control.rate_hz": 100.0})
    assert config.control.rate_hz == 100.0  # the override wins over the file
    assert config.control.mode == "ensemble"
    assert config.camera.device == "2"  # an integer index is accepted as the device
    assert config.control.period_s == pytest.approx(0.01)
    assert config.cameras == (("front", "/dev/v4l/by-id/front"), ("rear", "4"))
    assert config.state == (("velocity", "wheel_speed_mps"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[control]\nrate_hz = -5\n", "config control.rate_hz: must be > 0, got -5"),
        (
            "[control]\nrate_hz = 2\n",
            "config control.rate_hz: must be >= 5, got 2: the firmware puts the car",
        ),
        (
            '[control]\nmode = "fast"\n',
            "config control.mode: must be one of auto, chunk, ensemble, got 'fast'",
        ),
        ("[cameras]\nrear = true\n", "config cameras.rear: must be a non-empty string, got True"),
        (
            '[record]\nenabled = true\ndirectory = ""\n',
            "config record.directory: must name a directory when record.enabled = true",
        ),
        ("[record]\njpeg_quality = 0\n", "config record.jpeg_quality: must be 1-100, got 0"),
        ("[record]\nmax_gb = 0\n", "config record.max_gb: must be > 0, got 0"),
        ("[record]\nenabled = 1\n", "config record.enabled: must be true or false, got 1"),
        ('[state]\nspeed = ""\n', "config state.speed: must be a non-empty string"),
        ("[smoothing]\nsteering_rate = -1\n", "config smoothing.steering_rate: must be >= 0, got -1"),
        ("[serial]\nmax_ack_age_s = 0\n", "config serial.max_ack_age_s: must be > 0, got 0"),
        ("[control]\nrate = 30\n", "config control.rate: unknown key"),
        ("[motors]\nx = 1\n", "config: unknown section [motors]"),
        ('[camera]\nwidth = "wide"\n', "config camera.width: must be an integer, got 'wide'"),
        ("[serial]\nthrottle_limits = [0.5, -0.5]\n", "config serial.throttle_limits: min 0.5 is greater"),
        ("[serial]\nsteering_limits = [-2, 1]\n", "config serial.steering_limits: must lie within [-1, 1]"),
        ("[policy]\nstub = 1\n", "config policy.stub: must be true or false"),
        ('[camera]\nsource = "file"\n', "config camera.file: must name a video file"),
        ("[control\n", "not valid TOML"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(path)
    assert message in str(excinfo.value)


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(tmp_path / "nope.toml")


def test_seed_flag_aliases_map_to_config_keys() -> None:
    args = cli.build_parser().parse_args(
        ["run", "--camera_id", "0", "--arduino_port", "/dev/ttyUSB0", "--control_freq", "30"]
    )
    overrides = cli._overrides(args)
    assert overrides == {
        "camera.source": "device",
        "camera.device": "0",
        "serial.port": "/dev/ttyUSB0",
        "control.rate_hz": 30.0,
    }
    config = load_config(None, overrides)
    assert (config.camera.device, config.serial.port, config.control.rate_hz) == ("0", "/dev/ttyUSB0", 30.0)


def test_run_with_a_bad_flag_value_exits_2_naming_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--policy-stub", "--rate", "-5"]) == 2
    assert "config control.rate_hz: must be > 0, got -5" in capsys.readouterr().err


def make_release(root: Path, name: str, bundle: str = "bundle") -> Path:
    """/opt/rover/releases/<name>/ in miniature: runtime.toml naming a relative bundle, release.json."""
    release = root / "releases" / name
    release.mkdir(parents=True)
    (release / "runtime.toml").write_text(f'[policy]\nbundle = "{bundle}"\n')
    (release / "release.json").write_text(json.dumps({"id": name}) + "\n")
    return release


def test_source_is_the_resolved_config_file(tmp_path: Path) -> None:
    release = make_release(tmp_path, "r1")
    (tmp_path / "current").symlink_to(release.relative_to(tmp_path))
    config = load_config(tmp_path / "current" / "runtime.toml")
    assert config.source == str((release / "runtime.toml").resolve())
    assert "current" not in config.source
    assert load_config().source == ""  # no file, no source
    assert load_config(None, {"policy.stub": True}).source == ""


def test_relative_bundle_is_pinned_to_the_release_the_symlink_named(tmp_path: Path) -> None:
    old = make_release(tmp_path, "r1")
    new = make_release(tmp_path, "r2")
    current = tmp_path / "current"
    current.symlink_to(old)
    config = load_config(current / "runtime.toml")
    assert config.policy.bundle == str(old.resolve() / "bundle")
    current.unlink()
    current.symlink_to(new)  # `current` switched after start: the loaded config still names r1
    assert config.policy.bundle == str(old.resolve() / "bundle")
    assert load_config(current / "runtime.toml").policy.bundle == str(new.resolve() / "bundle")


def test_relative_bundle_with_subdirectories_and_dots(tmp_path: Path) -> None:
    release = make_release(tmp_path, "r1", bundle="../shared/model")
    config = load_config(release / "runtime.toml")
    assert config.policy.bundle == str(release.resolve() / "../shared/model")


def test_absolute_bundle_and_cli_override_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = make_release(tmp_path, "r1", bundle="/srv/bundles/abc")
    assert load_config(release / "runtime.toml").policy.bundle == "/srv/bundles/abc"
    relative = make_release(tmp_path, "r2")
    monkeypatch.chdir(tmp_path)
    # A --bundle override keeps its meaning (as given, relative to the working directory).
    args = cli.build_parser().parse_args(["run", "--config", str(relative / "runtime.toml"), "--bundle", "b"])
    config = load_config(args.config, cli._overrides(args))
    assert config.policy.bundle == "b"
    assert config.source == str((relative / "runtime.toml").resolve())


def test_config_without_a_bundle_keeps_the_default(tmp_path: Path) -> None:
    path = tmp_path / "rover.toml"
    path.write_text("[policy]\nstub = true\n")
    config = load_config(path)
    assert config.policy.bundle == load_config(None, {"policy.stub": True}).policy.bundle
    assert config.source == str(path.resolve())


def test_a_non_string_bundle_is_still_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "rover.toml"
    path.write_text("[policy]\nbundle = 3.5\n")
    with pytest.raises(ConfigError, match=r"config policy\.bundle: must be a string"):
        load_config(path)


def test_python_m_rover_runtime_is_the_console_script() -> None:
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-P", "-m", "rover_runtime", "run", "--policy-stub", "--rate", "-5"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )
    assert done.returncode == 2  # the exit status is propagated
    assert "rover-runtime: config control.rate_hz: must be > 0, got -5" in done.stderr
