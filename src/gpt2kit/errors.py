"""The one exception type users see: its message is a complete one-line explanation with the fix."""


class Gpt2kitError(Exception):
    """A user-facing error; the CLI prints `error: <message>` and exits with status 1."""
