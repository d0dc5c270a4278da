"""One exception type for every user-facing failure.

The CLI prints ``str(err)`` as a single line and exits with code 2; ``--debug``
shows the traceback. Messages name the file and the tensor or field involved and
what was expected.
"""


class OverspillError(Exception):
    """A bad input or an impossible request, described in one line."""


class CheckpointError(OverspillError):
    """A checkpoint directory, file or tensor is missing, malformed or inconsistent."""


class ConfigError(OverspillError):
    """config.json is missing a field, has a bad value, or names an unsupported architecture."""
