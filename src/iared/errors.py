"""User-facing errors: the CLI prints these as one line and exits with code 2."""


class UserError(ValueError):
    """A mistake in what the user gave (a path, a file, a flag); the message is one line."""


class ErrorOnOtherRank(UserError):
    """Under torchrun: a user error that another rank reported. Rank 0 prints the message
    once; the other ranks exit with code 2 without printing it again."""


def prints_here() -> bool:
    """Whether this process prints user errors: always, except on the non-zero ranks of a
    torchrun job (every rank meets the same bad argument; one line is enough)."""
    import os

    return os.environ.get("RANK", "0") == "0"
