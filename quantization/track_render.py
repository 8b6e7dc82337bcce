"""A toy RC-car track: the car's motion, a simple expert driver and the front camera's view.

Conventions (all in the road's frame, metres and radians):
- ``offset``: the car's lateral distance from the lane centre, positive = right of centre.
- ``heading``: the car's heading relative to the road direction, positive = pointing right.
- ``curvature``: the road's curvature ahead, positive = the road bends right.
- ``steering`` in [-1, 1], positive = turn right; ``throttle`` in [0, 1].

The camera is a pinhole at ``CAMERA_HEIGHT_M`` looking along the car's heading with the horizon at a fixed
row; every ground pixel is mapped back to a point on the ground and coloured by where that point lies
relative to the lane (asphalt, white edge lines, dashed yellow centre line, grass), with world-fixed
texture, per-episode lighting and per-frame sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

LANE_WIDTH_M = 0.8
EDGE_LINE_M = 0.05
CENTRE_LINE_M = 0.04
DASH_PERIOD_M = 0.6
CAMERA_HEIGHT_M = 0.25
MAX_VIEW_M = 8.0
MAX_STEER_CURVATURE = 1.6  # 1/m at steering = +-1 (a 0.6 m turning radius)
MAX_SPEED_MPS = 2.0
HORIZON_FRACTION = 0.3


@dataclass
class CarState:
    """Where the car is on the track."""

    distance: float  # metres driven along the road
    offset: float
    heading: float
    speed: float


@dataclass(frozen=True)
class Lighting:
    """Per-episode appearance: overall brightness, a colour tint and the texture's strength."""

    brightness: float
    tint: tuple[float, float, float]
    texture: float
    sensor_noise: float


class RoadProfile:
    """Road curvature as a smooth random function of the distance travelled (a sum of sinusoids)."""

    def __init__(self, rng: np.random.Generator, max_curvature: float = 0.9) -> None:
        n = 3
        self._wavelengths = rng.uniform(4.0, 14.0, size=n)
        self._phases = rng.uniform(0.0, 2 * math.pi, size=n)
        amplitudes = rng.uniform(0.3, 1.0, size=n)
        self._amplitudes = amplitudes / amplitudes.sum() * max_curvature * rng.uniform(0.6, 1.0)

    def curvature(self, distance: FloatArray | float) -> FloatArray:
        s = np.asarray(distance, dtype=np.float64)[..., None]
        waves = self._amplitudes * np.sin(2 * math.pi * s / self._wavelengths + self._phases)
        result: FloatArray = waves.sum(axis=-1)
        return result


def expert_action(state: CarState, road: RoadProfile) -> tuple[float, float]:
    """The demonstrator: steer back toward the lane centre and along the road, slow down in curves.

    Steering feeds forward the road's curvature a little ahead and corrects offset and heading; throttle
    drops with the curvature of the coming stretch.
    """
    lookahead = road.curvature(state.distance + np.array([0.3, 0.8, 1.5]))
    feedforward = float(lookahead[0]) / MAX_STEER_CURVATURE
    correction = -(2.2 * state.offset + 1.4 * state.heading)
    steering = float(np.clip(feedforward + correction, -1.0, 1.0))
    sharpest = float(np.max(np.abs(lookahead)))
    throttle = float(np.clip(0.85 - 0.55 * sharpest / 0.9 - 0.3 * abs(state.offset), 0.15, 1.0))
    return steering, throttle


def step_car(
    state: CarState, *, steering: float, throttle: float, road: RoadProfile, dt: float, slip: float
) -> CarState:
    """Advance a kinematic bicycle model by ``dt`` seconds; ``slip`` is a lateral disturbance (m/s)."""
    target_speed = MAX_SPEED_MPS * throttle
    speed = state.speed + (target_speed - state.speed) * min(1.0, 3.0 * dt)
    curvature = float(road.curvature(state.distance))
    heading = state.heading + speed * (steering * MAX_STEER_CURVATURE - curvature) * dt
    offset = state.offset + (speed * math.sin(heading) + slip) * dt
    distance = state.distance + speed * math.cos(heading) * dt
    return CarState(distance=distance, offset=offset, heading=heading, speed=speed)


def _hash_noise(a: FloatArray, b: FloatArray, seed: int) -> npt.NDArray[np.float32]:
    """Deterministic pseudo-random values in [0, 1) for integer grid cells (a, b)."""
    x = (a.astype(np.int64) * 73856093) ^ (b.astype(np.int64) * 19349663) ^ (seed * 83492791)
    x = (x ^ (x >> 13)) * 1274126177
    x = x ^ (x >> 16)
    return (x & 0xFFFF).astype(np.float32) / 65536.0


def render_front_camera(
    state: CarState,
    *,
    road: RoadProfile,
    lighting: Lighting,
    height: int,
    width: int,
    rng: np.random.Generator,
    texture_seed: int,
) -> npt.NDArray[np.uint8]:
    """The front camera's RGB view (uint8, shape (height, width, 3)) of the track from ``state``."""
    focal = 0.55 * width
    horizon = HORIZON_FRACTION * height
    rows = np.arange(height, dtype=np.float64) + 0.5
    cols = np.arange(width, dtype=np.float64) + 0.5 - width / 2
    below = rows > horizon + 0.5
    forward = np.full(height, MAX_VIEW_M)
    forward[below] = np.minimum(focal * CAMERA_HEIGHT_M / (rows[below] - horizon), MAX_VIEW_M)

    # Ground point of every pixel in the car's frame, then in the road's frame (small-angle for heading).
    d = forward[:, None]
    lateral_car = cols[None, :] * d / focal
    along = state.distance + d
    road_curv = road.curvature(along[:, 0])[:, None]
    near_curv = float(road.curvature(state.distance))
    centre_in_car = (
        -state.offset - math.tan(state.heading) * d + 0.5 * (0.5 * (near_curv + road_curv)) * d * d
    )
    across = lateral_car - centre_in_car  # distance from the lane centre, positive = right

    half = LANE_WIDTH_M / 2
    dist = np.abs(across)
    on_road = dist < half + EDGE_LINE_M
    edge = on_road & (dist > half - EDGE_LINE_M)
    dash_on = (along % DASH_PERIOD_M) < DASH_PERIOD_M / 2
    centre = (dist < CENTRE_LINE_M / 2 + 0.004 * d) & dash_on

    cell = 0.06
    tex = _hash_noise(np.floor(along / cell) + np.zeros_like(across), np.floor(across / cell), texture_seed)
    tex = (tex - 0.5) * lighting.texture

    image = np.empty((height, width, 3), dtype=np.float32)
    grass = np.array([0.25, 0.45, 0.18], dtype=np.float32)
    asphalt = np.array([0.36, 0.36, 0.38], dtype=np.float32)
    white = np.array([0.92, 0.92, 0.9], dtype=np.float32)
    yellow = np.array([0.9, 0.78, 0.2], dtype=np.float32)
    image[:] = grass
    image[on_road] = asphalt
    image[edge] = white
    image[centre & ~edge] = yellow
    image += tex[..., None].astype(np.float32)

    # Distance haze toward the horizon, then the sky.
    haze = np.clip((d - 2.0) / (MAX_VIEW_M - 2.0), 0.0, 1.0).astype(np.float32)[..., None]
    haze_colour = np.array([0.7, 0.75, 0.8], dtype=np.float32)
    image = image * (1 - 0.6 * haze) + haze_colour * 0.6 * haze
    sky_rows = ~below
    sky_grad = np.linspace(0.95, 0.75, int(sky_rows.sum()), dtype=np.float32)[:, None, None]
    image[sky_rows] = np.array([0.55, 0.7, 0.95], dtype=np.float32) * sky_grad

    image *= lighting.brightness * np.asarray(lighting.tint, dtype=np.float32)
    image += rng.normal(0.0, lighting.sensor_noise, size=image.shape).astype(np.float32)
    frame: npt.NDArray[np.uint8] = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return frame
