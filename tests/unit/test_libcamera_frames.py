"""The libcamera source's frame conversion (rover_runtime.libcamera_source.to_bgr) on frames laid out as
libcamera hands them over: each plane in its own buffer, rows padded to the stream's stride, generated for
sizes and paddings a camera may choose (odd strides, widths that are not multiples of 16), in every format
the source asks for. The reference is OpenCV's conversion of the same unpadded frame.

(A real camera through libcamera, its timestamps and reconnects: tests/integration/test_vm_car.py, on a VM
car whose kernel has udmabuf, with libcamera's virtual camera.)"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from rover_runtime.camera import CameraError, make_source, plausible
from rover_runtime.config import load_config
from rover_runtime.libcamera_source import PIXEL_FORMATS, LibcameraSource, to_bgr

RNG = np.random.default_rng(20261206)
# (width, height, row padding in bytes): generated, even sizes (4:2:0 needs them), paddings 0..63
CASES = [
    (int(w) * 2, int(h) * 2, int(pad))
    for w, h, pad in zip(
        RNG.integers(8, 330, 6), RNG.integers(6, 250, 6), RNG.integers(0, 64, 6), strict=True
    )
]


def padded(rows: NDArray[Any], stride: int) -> NDArray[np.uint8]:
    """`rows` (count x used bytes) as a plane whose rows are `stride` bytes apart, the padding garbage."""
    out = RNG.integers(0, 256, (rows.shape[0], stride), dtype=np.uint8)
    out[:, : rows.shape[1]] = rows
    return out.reshape(-1)


def frame(width: int, height: int) -> NDArray[np.uint8]:
    """A smooth test image (4:2:0 keeps its colours) with noise on top."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], axis=-1)
    return np.clip(image + RNG.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(("width", "height", "pad"), CASES)
@pytest.mark.parametrize("pixel_format", PIXEL_FORMATS)
def test_every_format_converts_like_opencv_whatever_the_stride(
    pixel_format: str, width: int, height: int, pad: int
) -> None:
    bgr = frame(width, height)
    expected: Any
    if pixel_format == "RGB888":
        stride = width * 3 + pad
        planes = [padded(bgr.reshape(height, width * 3), stride)]
        expected = bgr
    elif pixel_format == "YUYV":
        yuv = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV)  # packed 4:2:2 from full-resolution YUV
        packed = np.empty((height, width, 2), np.uint8)
        packed[:, :, 0] = yuv[:, :, 0]
        packed[:, 0::2, 1] = yuv[:, 0::2, 1]
        packed[:, 1::2, 1] = yuv[:, 0::2, 2]
        stride = width * 2 + pad
        planes = [padded(packed.reshape(height, width * 2), stride)]
        expected = cv2.cvtColor(packed, cv2.COLOR_YUV2BGR_YUYV)
    elif pixel_format in ("NV12", "YUV420"):
        i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)
        luma = i420[:height]
        chroma = i420[height:].reshape(-1)
        u = chroma[: width * height // 4].reshape(height // 2, width // 2)
        v = chroma[width * height // 4 :].reshape(height // 2, width // 2)
        expected = cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420)
        stride = width + pad * 2  # even: YUV420's chroma rows are stride / 2 apart
        if pixel_format == "NV12":
            uv = np.stack([u, v], axis=-1).reshape(height // 2, width)
            planes = [padded(luma, stride), padded(uv, stride)]
        else:
            planes = [padded(luma, stride), padded(u, stride // 2), padded(v, stride // 2)]
    else:  # MJPEG: the plane is the JPEG, no stride
        ok, jpeg = cv2.imencode(".jpg", bgr)
        assert ok
        stride, planes = 0, [jpeg.reshape(-1)]
        expected = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
    image = to_bgr(pixel_format, planes, width, height, stride)
    assert image.shape == (height, width, 3)
    assert image.dtype == np.uint8
    np.testing.assert_array_equal(image, expected)


def test_a_frame_that_is_not_what_was_configured_is_refused() -> None:
    with pytest.raises(CameraError, match="a 64x48 MJPEG frame did not decode"):
        to_bgr("MJPEG", [np.zeros(100, np.uint8)], 64, 48, 0)
    ok, jpeg = cv2.imencode(".jpg", frame(32, 24))
    assert ok
    with pytest.raises(CameraError, match="a 64x48 MJPEG frame did not decode"):
        to_bgr("MJPEG", [jpeg.reshape(-1)], 64, 48, 0)
    with pytest.raises(CameraError, match="pixel format XRGB8888 is not one of RGB888"):
        to_bgr("XRGB8888", [np.zeros(64 * 48 * 4, np.uint8)], 64, 48, 64 * 4)


@pytest.mark.parametrize(
    ("age", "kept"), [(0.0, True), (0.03, True), (9.9, True), (10.0, False), (-0.001, False), (3600.0, False)]
)
def test_only_plausible_capture_times_are_kept(age: float, kept: bool) -> None:
    now = 1000.0
    assert (plausible(now - age, now) is not None) is kept
    assert plausible(None, now) is None


def test_without_libcamera_s_bindings_the_source_says_what_to_install() -> None:
    """On a machine without python3-libcamera (this controller's venv), opening the source names the package
    and the role variable that gives it to the venv; the capture thread keeps that as the camera's error."""
    if importlib.util.find_spec("libcamera") is not None:
        pytest.skip("libcamera's bindings are importable here")
    config = dataclasses.replace(load_config(None).camera, source="libcamera", device="0")
    source = make_source(config)
    assert isinstance(source, LibcameraSource)
    with pytest.raises(CameraError, match=r"apt-get install python3-libcamera.*rover_python_libcamera"):
        source.open()
    source.close()  # closing a source that never opened is harmless
