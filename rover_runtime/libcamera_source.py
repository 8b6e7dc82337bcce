"""A camera through libcamera (`camera.source = "libcamera"`): the Raspberry Pi Camera Module on a Pi 5's CSI
connector, which only libcamera can read there, and any other camera libcamera serves (a USB UVC webcam).

It uses libcamera's own Python bindings (`import libcamera`: Debian's and Raspberry Pi OS's
`python3-libcamera`, what Picamera2 is built on), so the runtime needs no Picamera2. `camera.device` picks the
camera: its index among libcamera's cameras ("0") or its libcamera id (`cam --list`). Frames come as BGR, as
from the V4L2 source: RGB888 where the camera gives it (bytes B, G, R), else converted (PIXEL_FORMATS).

Timestamps, as for the V4L2 source, are capture times on the `time.monotonic()` clock: the request's
`SensorTimestamp` (the start of the exposure, on CLOCK_BOOTTIME, converted), else the buffer's timestamp, when
plausible (not in the future and less than 10 s old); else none, and the frame counts from its dequeue.
A camera that goes away (a USB camera pulled) stops completing requests: the capture thread (camera.Camera)
closes the source after its silence and reopens it, which finds the camera again once libcamera lists it.
"""

from __future__ import annotations

import logging
import mmap
import select
import time
from typing import Any

import numpy as np
from numpy.typing import NDArray

from rover_runtime.camera import CameraError, Captured, plausible
from rover_runtime.config import CameraConfig

log = logging.getLogger(__name__)

# The formats asked for, in turn, until the camera takes one: RGB888 (bytes B, G, R: OpenCV's order, what a
# Pi's ISP gives), then what cameras without an ISP give (a UVC webcam: YUYV or MJPEG; libcamera's virtual
# camera: NV12), converted to BGR with OpenCV.
PIXEL_FORMATS = ("RGB888", "YUV420", "NV12", "YUYV", "MJPEG")
BUFFERS = 4
INSTALL_HINT = (
    "libcamera's Python bindings are not installed: apt-get install python3-libcamera (Raspberry Pi OS: "
    "from its archive; Debian: trixie, or bookworm-backports), and give the runtime's venv the system's "
    "package (role rover_python: rover_python_libcamera)"
)


def to_bgr(
    pixel_format: str, planes: list[NDArray[np.uint8]], width: int, height: int, stride: int
) -> NDArray[np.uint8]:
    """One frame as H x W x 3 BGR from its planes (each the plane's bytes, rows `stride` bytes apart; a
    chroma plane of YUV420 has rows stride/2 apart; MJPEG's one plane is the JPEG)."""
    import cv2  # noqa: PLC0415 - the runtime's camera library

    def rows(plane: NDArray[np.uint8], count: int, row_stride: int, used: int) -> NDArray[np.uint8]:
        return plane[: count * row_stride].reshape(count, row_stride)[:, :used]

    if pixel_format == "RGB888":
        return rows(planes[0], height, stride, width * 3).reshape(height, width, 3).copy()
    if pixel_format == "YUYV":
        packed = rows(planes[0], height, stride, width * 2).reshape(height, width, 2)
        return np.asarray(cv2.cvtColor(packed, cv2.COLOR_YUV2BGR_YUYV))
    if pixel_format == "NV12":
        luma = rows(planes[0], height, stride, width)
        chroma = rows(planes[1], height // 2, stride, width)
        return np.asarray(cv2.cvtColor(np.concatenate([luma, chroma]), cv2.COLOR_YUV2BGR_NV12))
    if pixel_format == "YUV420":
        luma = rows(planes[0], height, stride, width).reshape(-1)
        u = rows(planes[1], height // 2, stride // 2, width // 2).reshape(-1)
        v = rows(planes[2], height // 2, stride // 2, width // 2).reshape(-1)
        i420 = np.concatenate([luma, u, v]).reshape(height * 3 // 2, width)
        return np.asarray(cv2.cvtColor(i420, cv2.COLOR_YUV2BGR_I420))
    if pixel_format == "MJPEG":
        image = cv2.imdecode(planes[0], cv2.IMREAD_COLOR)
        if image is None or image.shape[:2] != (height, width):
            raise CameraError(f"a {width}x{height} MJPEG frame did not decode")
        return np.asarray(image)
    raise CameraError(f"pixel format {pixel_format} is not one of {', '.join(PIXEL_FORMATS)}")


def _import_libcamera() -> Any:
    try:
        import libcamera  # type: ignore[import-not-found]  # noqa: PLC0415 - a car's system package
    except ImportError as exc:
        raise CameraError(f"{INSTALL_HINT} ({exc})") from None
    return libcamera


def _boottime_offset() -> float:
    """CLOCK_BOOTTIME minus CLOCK_MONOTONIC (time spent suspended; 0 on a car that never sleeps)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - time.monotonic()


class LibcameraSource:
    """A FrameSource (rover_runtime.camera) reading one libcamera camera."""

    def __init__(self, config: CameraConfig) -> None:
        self.config = config
        self.name = f"libcamera camera {config.device}"
        self.period_s = 1.0 / config.fps
        self._lc: Any = None
        self._manager: Any = None
        self._camera: Any = None
        self._allocator: Any = None
        self._stream: Any = None
        self._maps: dict[tuple[int, int], mmap.mmap] = {}  # (buffer, plane) -> its mapping
        self._format = ""
        self._shape = (0, 0, 0)  # height, width, stride
        self._started = False

    def _pick(self, cameras: list[Any]) -> Any:
        device = self.config.device
        ids = [c.id for c in cameras]
        if not cameras:
            raise CameraError(f"{self.name}: libcamera lists no camera (is it connected and enabled?)")
        if device.isdigit():
            index = int(device)
            if index >= len(cameras):
                raise CameraError(f"{self.name}: libcamera lists {len(cameras)} camera(s): {', '.join(ids)}")
            return cameras[index]
        for camera in cameras:
            if camera.id == device:
                return camera
        raise CameraError(f"{self.name}: no such camera; libcamera lists {', '.join(ids)}")

    def open(self) -> None:
        lc = self._lc = _import_libcamera()
        self._manager = lc.CameraManager.singleton()
        camera = self._pick(list(self._manager.cameras))
        try:
            camera.acquire()
        except Exception as exc:  # libcamera raises RuntimeError with errno text (EBUSY)
            raise CameraError(
                f"{self.name}: cannot be acquired ({exc}): is another process using it?"
            ) from None
        self._camera = camera
        try:
            self._configure()
            self._start()
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        lc, c = self._lc, self.config
        config = self._camera.generate_configuration([lc.StreamRole.VideoRecording])
        stream_config = config.at(0)
        offered = []
        for name in PIXEL_FORMATS:
            stream_config.pixel_format = lc.PixelFormat(name)
            stream_config.size = lc.Size(c.width, c.height)
            stream_config.buffer_count = BUFFERS
            status = config.validate()
            offered.append(str(stream_config.pixel_format))
            if status != lc.CameraConfiguration.Status.Invalid and str(stream_config.pixel_format) == name:
                break
        else:
            raise CameraError(
                f"{self.name}: gives none of {', '.join(PIXEL_FORMATS)} at {c.width}x{c.height} "
                f"(libcamera offers {', '.join(dict.fromkeys(offered))})"
            )
        size = stream_config.size
        if (size.width, size.height) != (c.width, c.height):
            log.warning("%s: %dx%d asked, libcamera gives %dx%d", self.name, c.width, c.height, size.width,
                        size.height)  # fmt: skip
        self._camera.configure(config)
        self._stream = stream_config.stream
        self._format = str(stream_config.pixel_format)
        self._shape = (size.height, size.width, stream_config.stride)
        log.info("%s: %dx%d %s", self.name, size.width, size.height, self._format)

    def _start(self) -> None:
        lc = self._lc
        self._allocator = lc.FrameBufferAllocator(self._camera)
        if self._allocator.allocate(self._stream) <= 0:
            raise CameraError(
                f"{self.name}: no frame buffers could be allocated (no dma-buf heap or udmabuf?)"
            )
        requests = []
        for index, buffer in enumerate(self._allocator.buffers(self._stream)):
            for number, plane in enumerate(buffer.planes):
                mapped = mmap.mmap(plane.fd, plane.offset + plane.length, mmap.MAP_SHARED, mmap.PROT_READ)
                self._maps[index, number] = mapped
            request = self._camera.create_request(index)
            request.add_buffer(self._stream, buffer)
            requests.append(request)
        frame_us = int(1_000_000 / self.config.fps)
        try:
            self._camera.start({lc.controls.FrameDurationLimits: (frame_us, frame_us)})
        except Exception as exc:  # a camera without a frame duration control runs at its own rate
            log.info("%s: started without FrameDurationLimits (%s)", self.name, exc)
            self._camera.start()
        self._started = True
        for request in requests:
            self._camera.queue_request(request)

    def read(self) -> Captured | None:
        if not self._started:
            return None
        ready, _, _ = select.select([self._manager.event_fd], [], [], 2 * self.period_s)
        if not ready:
            return None
        requests = self._manager.get_ready_requests()
        done = [r for r in requests if r.status == self._lc.Request.Status.Complete]
        try:
            return self._capture(done[-1]) if done else None
        finally:
            for request in requests:  # every buffer goes back: only the newest frame is kept
                request.reuse()
                self._camera.queue_request(request)

    def _capture(self, request: Any) -> Captured:
        height, width, stride = self._shape
        buffer = request.buffers[self._stream]
        planes = []
        for number, plane in enumerate(buffer.planes):
            # A compressed frame (MJPEG) fills only what the metadata says; an image plane all of its length.
            length = buffer.metadata.planes[number].bytes_used if self._format == "MJPEG" else plane.length
            mapped = self._maps[request.cookie, number]
            planes.append(np.frombuffer(mapped, dtype=np.uint8, count=length, offset=plane.offset))
        image = to_bgr(self._format, planes, width, height, stride)
        now = time.monotonic()
        sensor_ns = request.metadata.get(self._lc.controls.SensorTimestamp)
        stamp = plausible(sensor_ns / 1e9 - _boottime_offset(), now) if sensor_ns else None
        if stamp is None and buffer.metadata.timestamp:
            stamp = plausible(buffer.metadata.timestamp / 1e9, now)
        return Captured(image, stamp)

    def close(self) -> None:
        camera, self._camera = self._camera, None
        if camera is not None:
            if self._started:
                try:
                    camera.stop()
                except Exception as exc:  # a camera gone away cannot stop: release it all the same
                    log.warning("%s: stop failed: %s", self.name, exc)
            try:
                camera.release()
            except Exception as exc:
                log.warning("%s: release failed: %s", self.name, exc)
        self._started = False
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()
        self._allocator = None
        self._stream = None
