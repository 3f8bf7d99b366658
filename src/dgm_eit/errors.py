"""The one exception type for bad user input; the CLI turns it into one line and exit code 2."""


class InputError(ValueError):
    """Bad input named in the message (shape, value, file, config key)."""
