"""The one error type the CLI turns into a one-line message and a non-zero exit."""


class SimFleetError(Exception):
    """A problem the user can act on (bad option, missing tool, a host that did not boot)."""
