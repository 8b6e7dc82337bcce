"""The vehicle's parts (`rover_runtime.vehicle.Part`), in the order `rover_runtime.drive` composes them:

| part (status key) | module | reads | writes |
|---|---|---|---|
| CarInput (`serial`) | car.py | the firmware's acks, telemetry, R line | `car.*` |
| CameraPart (`cameras.<name>`) | cameras.py | its camera's newest frame | `image.<name>` |
| TransmitterPart (`rc`) | transmitter.py | `car.transmitter`, `car.mode` | a hold while it has the car |
| StatePart (`state`) | state.py | `car.*` | `state` |
| PilotPart (`inference`) | pilot.py | `image.*`, `state` | `pilot.action`, `pilot.latency_ms` |
| SmoothingPart (`smoothing`) | smoothing.py | `pilot.action`, `car.steering`, `car.throttle` | `command` |
| CarOutput (`command`) | car.py | `command` | `command.sent`, `driving` |
| RecorderPart (`recorder`), when `record.enabled` | recorder.py | all of the above | episodes on disk |

Each part declares the values it reads and writes (`reads`, `writes`: the table above, as code) and the
vehicle refuses, when it is built, a part that reads a value no earlier part writes
(`rover_runtime.vehicle.check_wiring`: "part 'inference' reads 'state', which no earlier part writes (part
'state' writes it, after it)"). Parts derive from `rover_runtime.vehicle.BasePart` (nothing to start, stop
or report unless they say so).

The values (`rover_runtime.vehicle.Cycle.values`), fresh every cycle:
- `car.steering`, `car.throttle` (float): what the car outputs now, from the firmware's last acknowledgement
  (the Pi's command it applied, the driver's sticks, or neutral), normalized to [-1, 1];
- `car.transmitter` (bool): the transmitter side decides the outputs (manual mode, or its signal lost);
  `car.mode` (str | None): the mode the receiver's switch selects (`protocol.MODE_NAMES`);
- `car.wheel_speed_mps`, `car.battery_v` (float | None): the firmware's sensors, None when not fitted;
- `image.<camera>` (`camera.Frame`): the camera's newest frame, when fresh;
- `state` (tuple of float): the policy's state vector, in the bundle's `inputs.state_names` order;
- `pilot.action` (tuple[float, float] | None): the policy's [steering, throttle] for this step;
- `pilot.latency_ms` (float | None): how long the newest chunk's inference took;
- `command` (tuple[float, float]): what to send, after smoothing (neutral when there is a fault or a hold);
- `command.sent` (tuple[float, float] | None): what was written to the serial line (None: nothing was);
- `driving` (bool): the Pi's command was written and the car applies it.
"""

CAR_STEERING = "car.steering"
CAR_THROTTLE = "car.throttle"
CAR_TRANSMITTER = "car.transmitter"
CAR_MODE = "car.mode"
CAR_WHEEL_SPEED = "car.wheel_speed_mps"
CAR_BATTERY = "car.battery_v"
STATE = "state"
PILOT_ACTION = "pilot.action"
PILOT_LATENCY_MS = "pilot.latency_ms"
COMMAND = "command"
COMMAND_SENT = "command.sent"


def image_key(camera: str) -> str:
    return f"image.{camera}"
