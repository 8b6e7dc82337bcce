"""The model backends the car runs, one module each, behind one small interface.

A backend module has `load(bundle, threads, engine) -> Model`; a `Model` runs the bundle's program on its
positional float32 inputs (the state, then one image per camera, batch 1) and returns the action chunk
[1, chunk_size, action_dim]. `load_model` picks the module by the manifest's `backend`; nothing else
branches on it. A backend whose package the car lacks raises ModelError naming the package.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from importlib import metadata
from typing import Any, Protocol

from numpy.typing import NDArray

from rover_runtime.bundle import BACKENDS, Bundle

# backend name -> (module implementing it, the Python package it needs on the car)
BACKEND_MODULES = {
    "torch": ("rover_runtime.backends.torch_model", "torch"),
    "onnxruntime": ("rover_runtime.backends.onnxruntime_model", "onnxruntime"),
    "executorch": ("rover_runtime.backends.executorch_model", "rover_executorch"),
}
assert set(BACKEND_MODULES) == set(BACKENDS)


class ModelError(Exception):
    """A bundle's model cannot be loaded or run by this car (missing package, unloadable file)."""


class Model(Protocol):
    engine: str | None  # torch's quantized engine, else None

    def run(self, inputs: Sequence[NDArray[Any]]) -> NDArray[Any]: ...


def load_model(bundle: Bundle, threads: int, engine: str | None = None) -> Model:
    """Load `bundle`'s model with the backend its manifest names."""
    module_name, _ = BACKEND_MODULES[bundle.manifest.backend]
    model: Model = importlib.import_module(module_name).load(bundle, threads, engine)
    return model


def installed_backends() -> list[str]:
    """The backends whose package this Python can import (what the car can run), in BACKENDS order."""
    return [name for name, (_, package) in BACKEND_MODULES.items() if importlib.util.find_spec(package)]


def runtime_version(backend: str) -> str:
    """The installed version of the package that runs `backend` on this machine ("absent" without it)."""
    _, package = BACKEND_MODULES[backend]
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"
