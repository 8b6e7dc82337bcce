"""Errors the quantization CLI reports as one line and a non-zero exit status."""


class QuantizationError(Exception):
    """Bad input or a failed step; the message names the problem (a file, a key, a count)."""


def one_line(exc: BaseException, limit: int = 400) -> str:
    """A library's exception as one line a user can read: its type and its first non-empty line (torch's
    and ExecuTorch's errors run to pages of graph dumps), shortened to `limit` characters."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
