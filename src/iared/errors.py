"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(ValueError):
    """A mistake in what the user gave (a path, a file, a flag); the message is one line."""
