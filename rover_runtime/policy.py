"""The policy: a verified bundle run by its backend (torch, ONNX Runtime, ExecuTorch), or a loop-test stub.

`load_policy` opens the bundle through `rover_runtime.bundle.open_bundle` (schema and every sha256 checked
before anything is loaded), loads the model, and runs one warm-up inference on the manifest's input shapes
(its state vector and every camera it lists) whose output shape must match the manifest. Any mismatch
raises PolicyError (or BundleError) with a message naming the problem. Which car inputs feed the state and
the cameras is the vehicle's business (`rover_runtime.parts`), not the policy's.

`predict(images_bgr, state)` takes one BGR frame per camera in the order of `PolicyInfo.image_keys` and the
state values in the order of `PolicyInfo.state_names`, and returns the chunk as float32 [chunk_size, 2] =
[steering, throttle].
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from rover_runtime.backends import ModelError, load_model
from rover_runtime.bundle import Bundle, BundleError, open_bundle
from rover_runtime.preprocess import preprocess_image, preprocess_state

log = logging.getLogger(__name__)

# The action columns the car drives, and the names a bundle may give them.
ACTION_ALIASES = (("steering", "steer", "angle"), ("throttle",))


class PolicyError(Exception):
    """A bundle cannot be run by this runtime (wrong inputs, unloadable model, wrong output shape)."""


@dataclass(frozen=True)
class PolicyInfo:
    backend: str  # a bundle backend ("torch", "onnxruntime", "executorch") or "stub"
    engine: str | None
    mode: str  # fp32 / dynamic / static / stub
    content_hash: str | None
    model_bytes: int
    chunk_size: int
    n_action_steps: int
    temporal_ensemble_coeff: float | None
    threads: int
    image_keys: tuple[str, ...] = ("observation.images.front",)  # one frame per camera, in this order
    state_names: tuple[str, ...] = ("steering", "throttle")
    image_shapes: tuple[tuple[int, int, int], ...] = ((3, 96, 128),)  # (3, H, W) per camera, same order
    action_names: tuple[str, ...] = ("steering", "throttle")


class Policy(Protocol):
    info: PolicyInfo

    def predict(self, images_bgr: Sequence[NDArray[Any]], state: Sequence[float]) -> NDArray[Any]: ...


def resolve_engine(requested: str, manifest_engine: str | None, machine: str | None = None) -> str | None:
    """The quantized engine to use: qnnpack on aarch64 for "auto", else the bundle's, else torch's default."""
    machine = machine or platform.machine()
    if requested != "auto":
        return requested
    if machine in ("aarch64", "arm64"):
        return "qnnpack"
    return manifest_engine


def resolve_threads(threads: int, cpu_count: int | None = None) -> int:
    """`threads`, or for 0 every core but one (left to the control loop and camera threads), at least 1."""
    if threads > 0:
        return threads
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, cores - 1)


def action_columns(names: Sequence[str]) -> list[int]:
    """The indices of the steering and throttle columns among the bundle's action names (by name or a
    known alias; the first two columns when the bundle names neither)."""
    columns = []
    for position, aliases in enumerate(ACTION_ALIASES):
        found = [i for i, name in enumerate(names) if name.lower() in aliases]
        columns.append(found[0] if found else position)
    return columns


class BundlePolicy:
    def __init__(self, bundle: Bundle, engine: str, threads: int) -> None:
        m = bundle.manifest
        if m.outputs.action_dim < 2:
            raise PolicyError(f"bundle {bundle.root}: outputs.action_dim is {m.outputs.action_dim}, need 2")
        if not m.inputs.images:
            raise PolicyError(f"bundle {bundle.root}: inputs.images is empty; the car drives from cameras")
        self._columns = action_columns(m.outputs.action_names)
        self.bundle = bundle
        self.image_specs = m.inputs.images
        self.value_range = m.inputs.image_value_range
        self.threads = resolve_threads(threads)
        self.engine = resolve_engine(engine, m.engine)  # torch's quantized engine; other backends ignore it
        try:
            self._model = load_model(bundle, self.threads, self.engine)
        except ModelError as exc:
            raise PolicyError(str(exc)) from exc
        self.info = PolicyInfo(
            backend=m.backend,
            engine=self._model.engine,
            mode=m.mode,
            content_hash=m.content_hash,
            model_bytes=m.model_bytes,
            chunk_size=m.outputs.chunk_size,
            n_action_steps=m.outputs.n_action_steps,
            temporal_ensemble_coeff=m.outputs.temporal_ensemble_coeff,
            threads=self.threads,
            image_keys=tuple(spec.key for spec in m.inputs.images),
            state_names=m.inputs.state_names,
            image_shapes=tuple(spec.shape for spec in m.inputs.images),
            action_names=m.outputs.action_names,
        )
        self._warm_up()

    def _run(self, state: NDArray[Any], images: Sequence[NDArray[Any]]) -> NDArray[Any]:
        return self._model.run([state, *images])

    def preprocess(
        self, images_bgr: Sequence[NDArray[Any]], state: Sequence[float]
    ) -> tuple[NDArray[Any], list[NDArray[Any]]]:
        """Camera frames and state values -> the model's inputs (state, one image tensor per camera)."""
        if len(images_bgr) != len(self.image_specs):
            raise ValueError(f"got {len(images_bgr)} images, the bundle takes {len(self.image_specs)}")
        if len(state) != self.bundle.manifest.inputs.state_dim:
            raise ValueError(f"got {len(state)} state values, the bundle takes {self.info.state_names}")
        images = [
            preprocess_image(image, spec, self.value_range)
            for image, spec in zip(images_bgr, self.image_specs, strict=True)
        ]
        return preprocess_state(state), images

    def _warm_up(self) -> None:
        frames = [np.zeros((spec.shape[1], spec.shape[2], 3), dtype=np.uint8) for spec in self.image_specs]
        state_dim = self.bundle.manifest.inputs.state_dim
        shapes = ", ".join(f"image [1, {', '.join(map(str, spec.shape))}]" for spec in self.image_specs)
        try:
            out = self._run(*self.preprocess(frames, [0.0] * state_dim))
        except Exception as exc:
            raise PolicyError(
                f"bundle {self.bundle.root}: the model fails on the manifest's input shapes "
                f"(state [1, {state_dim}], {shapes}): {exc}"
            ) from exc
        outputs = self.bundle.manifest.outputs
        expected = (1, outputs.chunk_size, outputs.action_dim)
        if tuple(out.shape) != expected:
            raise PolicyError(
                f"bundle {self.bundle.root}: the model outputs shape {list(out.shape)}, "
                f"the manifest says {list(expected)}"
            )

    def infer(self, state: NDArray[Any], images: Sequence[NDArray[Any]]) -> NDArray[Any]:
        """Raw model call on preprocessed inputs: [1, chunk, action_dim]."""
        return np.asarray(self._run(state, images))

    def predict(self, images_bgr: Sequence[NDArray[Any]], state: Sequence[float]) -> NDArray[Any]:
        out = self._run(*self.preprocess(images_bgr, state))
        return np.ascontiguousarray(out[0][:, self._columns], dtype=np.float32)


def load_policy(bundle_dir: Path | str, engine: str = "auto", threads: int = 0) -> BundlePolicy:
    """Verify and load a bundle; raises BundleError or PolicyError naming the problem."""
    bundle = open_bundle(bundle_dir)
    log.info(
        "bundle %s verified: %s %s %s, content hash %s",
        bundle.root,
        bundle.manifest.model_format,
        bundle.manifest.mode,
        bundle.manifest.backend,
        bundle.manifest.content_hash[:12],
    )
    return BundlePolicy(bundle, engine, threads)


class StubPolicy:
    """A policy stand-in for loop tests and benchmarks: a slow sinusoid of steering, constant throttle.

    `latency_s` is slept per call; `stall()` blocks calls until `release()`; `fail(n)` makes the next
    `n` calls raise RuntimeError.
    """

    def __init__(
        self,
        chunk_size: int = 20,
        latency_s: float = 0.005,
        throttle: float = 0.2,
        n_action_steps: int = 0,
        *,
        image_keys: tuple[str, ...] = ("observation.images.front",),
        state_names: tuple[str, ...] = ("steering", "throttle"),
        temporal_ensemble_coeff: float | None = None,
    ) -> None:
        self.latency_s = latency_s
        self.throttle = throttle
        self.calls = 0
        self.stalled_call_started: float | None = None  # when a call began waiting in stall()
        self._go = threading.Event()
        self._go.set()
        self._failures = 0
        self._lock = threading.Lock()
        self.info = PolicyInfo(
            backend="stub",
            engine=None,
            mode="stub",
            content_hash=None,
            model_bytes=0,
            chunk_size=chunk_size,
            n_action_steps=n_action_steps or chunk_size,
            temporal_ensemble_coeff=temporal_ensemble_coeff,
            threads=1,
            image_keys=image_keys,
            state_names=state_names,
            image_shapes=tuple((3, 96, 128) for _ in image_keys),
        )
        self.last_state: tuple[float, ...] = ()  # what the last call was given
        self.last_image_count = 0

    def stall(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def fail(self, count: int = 1) -> None:
        with self._lock:
            self._failures = count

    def predict(self, images_bgr: Sequence[NDArray[Any]], state: Sequence[float]) -> NDArray[Any]:
        self.last_state, self.last_image_count = tuple(float(v) for v in state), len(images_bgr)
        if not self._go.is_set():
            self.stalled_call_started = time.monotonic()
        self._go.wait()
        with self._lock:
            self.calls += 1
            failing = self._failures > 0
            self._failures -= int(failing)
        if failing:
            raise RuntimeError("stub policy: injected inference failure")
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        phase = time.monotonic()
        steps = np.arange(self.info.chunk_size, dtype=np.float32)
        chunk = np.empty((self.info.chunk_size, 2), dtype=np.float32)
        chunk[:, 0] = 0.5 * np.sin(phase + steps * 0.05)
        chunk[:, 1] = self.throttle
        return chunk


__all__ = ["BundleError", "BundlePolicy", "Policy", "PolicyError", "PolicyInfo", "StubPolicy", "load_policy"]
