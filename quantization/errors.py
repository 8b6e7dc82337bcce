"""Errors the quantization CLI reports as one line and a non-zero exit status."""


class QuantizationError(Exception):
    """Bad input or a failed step; the message names the problem (a file, a key, a count)."""
