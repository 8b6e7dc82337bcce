"""Camera frame and command state -> the bundle's model inputs (see `rover_runtime.bundle`).

Image: OpenCV BGR uint8 H x W x 3 -> RGB, resized to the bundle's (H, W) with area interpolation, float32
in [0, 1], NCHW with a batch of one. State: the last command sent, [steering, throttle], float32 [1, 2].
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from rover_runtime.bundle import ImageInput


def preprocess_image(image_bgr: NDArray[Any], spec: ImageInput) -> NDArray[Any]:
    import cv2  # noqa: PLC0415 - a runtime dependency, kept out of `import rover_runtime`

    if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image_bgr.shape}")
    _, height, width = spec.shape
    if image_bgr.shape[:2] != (height, width):
        image_bgr = cv2.resize(image_bgr, (width, height), interpolation=cv2.INTER_AREA)
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)
    chw = np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)
    chw *= 1.0 / 255.0
    return chw[np.newaxis]


def preprocess_state(steering: float, throttle: float) -> NDArray[Any]:
    return np.array([[steering, throttle]], dtype=np.float32)
