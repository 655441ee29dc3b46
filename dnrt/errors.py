"""The one exception type for errors a user can cause; the CLI prints its message and exits non-zero."""


class DNRTError(Exception):
    """A user-facing error with a one-line message (bad input, missing file, unknown name)."""
