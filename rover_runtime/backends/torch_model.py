"""The torch backend: a TorchScript bundle (FP32, or eager-mode INT8 for a quantized engine)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rover_runtime.backends import ModelError
from rover_runtime.bundle import Bundle


class TorchModel:
    def __init__(self, module: Any, engine: str | None) -> None:
        self._module = module
        self.engine = engine

    def run(self, inputs: Sequence[NDArray[Any]]) -> NDArray[Any]:
        import torch  # noqa: PLC0415 - imported by load already

        if self.engine is not None:
            torch.backends.quantized.engine = self.engine
        with torch.inference_mode():
            out = self._module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in inputs))
        return np.asarray(out.detach().numpy())


def load(bundle: Bundle, threads: int, engine: str | None) -> TorchModel:
    try:
        import torch  # noqa: PLC0415 - the car installs torch only where it runs torch bundles
    except ImportError as exc:
        raise ModelError("a TorchScript bundle needs torch (pip install 'rover-fleet[torch]')") from exc
    torch.set_num_threads(threads)
    if engine is not None:
        supported = torch.backends.quantized.supported_engines
        if engine not in supported:
            raise ModelError(
                f"config policy.engine: {engine!r} is not available in this torch build "
                f"(available: {', '.join(e for e in supported if e != 'none')})"
            )
        torch.backends.quantized.engine = engine
    try:
        module = torch.jit.load(str(bundle.model_path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as exc:
        raise ModelError(f"bundle {bundle.root}: TorchScript model does not load: {exc}") from exc
    module.eval()
    return TorchModel(module, engine)
