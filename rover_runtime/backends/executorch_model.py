"""The executorch backend: an ExecuTorch program (`.pte`, XNNPACK-delegated) run without torch.

ExecuTorch's Python runtime links libtorch, and no CPU torch build for the Pi matches executorch 1.5's, so the
car runs `.pte` files through `rover_executorch`: ExecuTorch's own runtime libraries (libexecutorch, the
XNNPACK backend, the optimized and quantized kernels, its threadpool; about 15 MB) and `librover_et.so`, a
small C interface to them (roles/rover_python/files/rover_et.cpp), called here with ctypes. The controller
builds that package per architecture from the executorch wheel (roles/rover_python/files/executorch_wheel.py).
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rover_runtime.backends import ModelError
from rover_runtime.bundle import Bundle

log = logging.getLogger(__name__)

ABI_VERSION = 1  # rover_et_abi_version() of the librover_et.so this module speaks to
_ERR_LEN = 1024
_MAX_RANK = 8
_Floats = ctypes.POINTER(ctypes.c_float)


def _library() -> Any:
    try:
        import rover_executorch  # noqa: PLC0415 - only cars that run .pte bundles have it
    except ImportError as exc:
        raise ModelError(
            "an ExecuTorch bundle needs the rover-executorch package (the ExecuTorch runtime; "
            "the rover_python role installs it where rover_python_backends lists executorch)"
        ) from exc
    path = Path(rover_executorch.LIBRARY)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise ModelError(f"the ExecuTorch runtime {path} does not load: {exc}") from exc
    lib.rover_et_abi_version.restype = ctypes.c_int
    if lib.rover_et_abi_version() != ABI_VERSION:
        raise ModelError(
            f"the ExecuTorch runtime {path} speaks ABI {lib.rover_et_abi_version()}, "
            f"this runtime ABI {ABI_VERSION}"
        )
    lib.rover_et_open.restype = ctypes.c_void_p
    lib.rover_et_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.rover_et_num_inputs.restype = ctypes.c_int
    lib.rover_et_num_inputs.argtypes = [ctypes.c_void_p]
    lib.rover_et_shape.restype = ctypes.c_int
    lib.rover_et_shape.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int64),
        ctypes.c_int,
    ]
    lib.rover_et_run.restype = ctypes.c_int
    lib.rover_et_run.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(_Floats),
        ctypes.c_int,
        _Floats,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    lib.rover_et_close.restype = None
    lib.rover_et_close.argtypes = [ctypes.c_void_p]
    lib.rover_et_set_threads.restype = ctypes.c_int
    lib.rover_et_set_threads.argtypes = [ctypes.c_uint32]
    return lib


class ExecutorchModel:
    """One loaded `.pte` program; `run` is not reentrant (one inference thread calls it)."""

    engine = None

    def __init__(
        self, lib: Any, handle: int, input_shapes: list[tuple[int, ...]], output_shape: tuple[int, ...]
    ) -> None:
        self._lib = lib
        self._handle: int | None = handle
        self.input_shapes = input_shapes
        self.output_shape = output_shape
        self._err = ctypes.create_string_buffer(_ERR_LEN)

    def run(self, inputs: Sequence[NDArray[Any]]) -> NDArray[Any]:
        if self._handle is None:
            raise ModelError("the ExecuTorch program is closed")
        if len(inputs) != len(self.input_shapes):
            raise ValueError(f"got {len(inputs)} inputs, the program takes {len(self.input_shapes)}")
        arrays = []
        for i, (x, shape) in enumerate(zip(inputs, self.input_shapes, strict=True)):
            array = np.ascontiguousarray(x, dtype=np.float32)
            if array.shape != shape:
                raise ValueError(f"input {i} has shape {list(array.shape)}, the program takes {list(shape)}")
            arrays.append(array)
        pointers = (_Floats * len(arrays))(*(a.ctypes.data_as(_Floats) for a in arrays))
        out = np.empty(self.output_shape, dtype=np.float32)
        status = self._lib.rover_et_run(
            self._handle, pointers, len(arrays), out.ctypes.data_as(_Floats), out.size, self._err, _ERR_LEN
        )
        if status != 0:
            raise RuntimeError(f"ExecuTorch: {self._err.value.decode(errors='replace')}")
        return out

    def close(self) -> None:
        if self._handle is not None:
            self._lib.rover_et_close(self._handle)
            self._handle = None

    def __del__(self) -> None:
        self.close()


def _shape(lib: Any, handle: int, index: int) -> tuple[int, ...]:
    dims = (ctypes.c_int64 * _MAX_RANK)()
    rank = lib.rover_et_shape(handle, index, dims, _MAX_RANK)
    if not 0 <= rank <= _MAX_RANK:
        raise ModelError(f"the ExecuTorch program reports rank {rank} for {'output' if index < 0 else index}")
    return tuple(int(d) for d in dims[:rank])


def open_program(path: Path, threads: int) -> ExecutorchModel:
    """Load a `.pte` program, XNNPACK's threadpool at `threads` threads (one threadpool per process)."""
    lib = _library()
    if lib.rover_et_set_threads(max(1, threads)) != 0:
        log.warning("ExecuTorch: could not set its threadpool to %d threads", threads)
    err = ctypes.create_string_buffer(_ERR_LEN)
    handle = lib.rover_et_open(str(path).encode(), err, _ERR_LEN)
    if not handle:
        raise ModelError(
            f"ExecuTorch program {path.name} does not load: {err.value.decode(errors='replace')}"
        )
    count = lib.rover_et_num_inputs(handle)
    return ExecutorchModel(
        lib, handle, [_shape(lib, handle, i) for i in range(count)], _shape(lib, handle, -1)
    )


def load(bundle: Bundle, threads: int, engine: str | None) -> ExecutorchModel:
    del engine  # torch's quantized engine: not used by ExecuTorch
    try:
        model = open_program(bundle.model_path, threads)
    except ModelError as exc:
        raise ModelError(f"bundle {bundle.root}: {exc}") from exc
    expected = 1 + len(bundle.manifest.inputs.images)
    if len(model.input_shapes) != expected:
        model.close()
        raise ModelError(
            f"bundle {bundle.root}: the ExecuTorch program has {len(model.input_shapes)} inputs, expected "
            f"{expected} (the state and {expected - 1} camera(s), as the manifest lists)"
        )
    return model
