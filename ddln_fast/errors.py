"""The one exception type for bad user input (config, data, files, arguments).

The CLI turns it into exit code 2 with a single line on stderr; the Python API lets it
propagate so that notebooks see the same message.
"""

from pathlib import Path


class InputError(ValueError):
    """Bad input: the message names what is wrong and what was expected, on one line.

    ``cli_message``, when given, is the same message worded for the command line (naming its
    options, e.g. ``--resume``); the Python message names the function arguments instead.
    """

    def __init__(self, message: str, cli_message: str | None = None):
        super().__init__(" ".join(str(message).split()))
        self.cli_message = " ".join(cli_message.split()) if cli_message else None

    def for_cli(self) -> str:
        """The message as ``ddln`` prints it."""
        return self.cli_message or str(self)


def existing_file(path, what: str, expected: str) -> Path:
    """``path`` as a Path, or an InputError naming ``what`` (e.g. "config file") when it does not
    exist or is a directory (``expected`` says what it should be, e.g. "a TOML file")."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path} does not exist")
    if path.is_dir():
        raise InputError(f"{what} {path} is a directory, expected {expected}")
    return path


class AlreadyComplete(Exception):
    """Resume asked for a run that already finished (the message says so; nothing to do, not
    an error for a sweep)."""
