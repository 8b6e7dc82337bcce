"""rover_runtime: drives an RC car with a quantized ACT policy bundle (camera -> policy -> serial)."""

__version__ = "0.1.0"
