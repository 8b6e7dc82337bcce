"""Write a model bundle atomically through `rover_runtime.bundle`: stage next to the output, then rename.

The staging directory is `.<output name>.staging-*` in the output's parent (same file system, so the final
`rename` is atomic). If anything fails, the staging directory is removed and the output is untouched; an
existing output is only replaced with `force`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from quantization.errors import QuantizationError
from rover_runtime.bundle import Bundle, Manifest, Verification, file_entries, open_bundle, write_manifest

log = logging.getLogger(__name__)


def check_output(output: Path, force: bool) -> None:
    """Refuse an existing output directory unless `force`."""
    if output.exists() and not force:
        raise QuantizationError(f"output {output} already exists (use --force to replace it)")
    if output.exists() and not output.is_dir():
        raise QuantizationError(f"output {output} exists and is not a directory")


def staging_prefix(output: Path) -> str:
    return f".{output.name}.staging-"


def publish_directory(stage: Path, output: Path, force: bool) -> None:
    """Rename a finished staging directory to `output`, replacing an existing one only with `force`."""
    check_output(output, force)
    old: Path | None = None
    if output.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
        output.rename(old / output.name)
    stage.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_bundle(
    output: Path,
    model_file: str,
    write_model: Callable[[Path], Manifest],
    force: bool = False,
    verify: Callable[[Bundle], Verification] | None = None,
) -> Bundle:
    """Write the model file with `write_model(path)`, which returns the manifest; hash, write it, check it.

    The manifest's `files` is ignored and recomputed from what was written. `verify` gets the staged bundle
    as the car would open it; what it returns is recorded in the manifest, and what it raises leaves nothing.
    """
    output = output.absolute()
    check_output(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=staging_prefix(output), dir=output.parent))
    try:
        manifest = write_model(stage / model_file)
        if manifest.model_file != model_file or not (stage / model_file).is_file():
            raise QuantizationError(f"the model file {model_file} was not written")
        write_manifest(stage, replace(manifest, files=file_entries(stage)))
        staged = open_bundle(stage)  # the reader a car uses must accept it
        if verify is not None:
            write_manifest(stage, replace(staged.manifest, verification=verify(staged)))
            open_bundle(stage)
        publish_directory(stage, output, force)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info("wrote bundle %s", output)
    return open_bundle(output)
