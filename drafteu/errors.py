"""The one exception type the CLI turns into a one-line message and a non-zero exit code."""


class DraftEUError(Exception):
    """A user-facing error: the message names the problem and how to fix it."""
