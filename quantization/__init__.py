"""quantization: turn a LeRobot ACT checkpoint into FP32 / INT8 model bundles and measure them."""

__version__ = "0.1.0"
