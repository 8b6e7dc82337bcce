"""Camera frames and state values -> the bundle's model inputs (see `rover_runtime.bundle`).

Image: OpenCV BGR uint8 H x W x 3 -> RGB, resized to the bundle's (H, W) with area interpolation, float32
scaled to the manifest's `inputs.image_value_range` ([0, 1] unless it says otherwise), NCHW with a batch of
one. State: the values in the order of the manifest's `inputs.state_names`, float32 [1, state_dim].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rover_runtime.bundle import ImageInput


def preprocess_image(
    image_bgr: NDArray[Any], spec: ImageInput, value_range: tuple[float, float] = (0.0, 1.0)
) -> NDArray[Any]:
    import cv2  # noqa: PLC0415 - a runtime dependency, kept out of `import rover_runtime`

    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image_bgr.shape}")
    _, height, width = spec.shape
    if image_bgr.shape[:2] != (height, width):
        image_bgr = cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    low, high = value_range
    chw *= (high - low) / 255.0
    if low:
        chw += low
    return chw[np.newaxis]


def preprocess_state(values: Sequence[float]) -> NDArray[Any]:
    return np.asarray([values], dtype=np.float32)
