"""User-facing errors: the CLI prints these as one line and exits with code 2."""

import sys

_program = "iared"  # the prefix of the one line, set by the CLI to the command that runs


class UserError(ValueError):
    """A mistake in what the user gave (a path, a file, a flag); the message is one line."""

    reported = False  # already printed (under torchrun, by rank 0 before any rank exits)


class ErrorOnOtherRank(UserError):
    """Under torchrun: a user error that another rank reported. Rank 0 prints the message
    once; the other ranks exit with code 2 without printing it again."""


def prints_here() -> bool:
    """Whether this process prints user errors: always, except on the non-zero ranks of a
    torchrun job (every rank meets the same bad argument; one line is enough)."""
    import os

    return os.environ.get("RANK", "0") == "0"


def set_program(name: str) -> None:
    """The command named in front of every reported error, e.g. "iared train"."""
    global _program
    _program = name


def report(message: str) -> None:
    """Print a user error as the CLI does: one line on stderr, flushed at once."""
    print(f"{_program}: error: {message}", file=sys.stderr, flush=True)
