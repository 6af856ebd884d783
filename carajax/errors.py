"""`UsageError`: a bad command-line argument found after parsing.

It lives below every layer so that code a command calls (`carajax.replay.runs` plans a replay
from its arguments) can raise it without importing the command line (`carajax.cli`), which
imports that code.
"""

from __future__ import annotations


class UsageError(SystemExit):
    """A bad argument found after parsing (a missing file, an unknown model, ...): `main` prints
    one line, `carajax CMD: error: ...`, and the process exits with status 2, as argparse does
    for what it finds itself. Raised before anything is built or started."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


__all__ = ["UsageError"]
