"""The one exception type for bad user input (config, data, files, arguments).

The CLI turns it into exit code 2 with a single line on stderr; the Python API lets it
propagate so that notebooks see the same message.
"""


class InputError(ValueError):
    """Bad input: the message names what is wrong and what was expected, on one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class AlreadyComplete(Exception):
    """Resume asked for a run that already finished (nothing to do; not an error for a sweep)."""
