"""The one exception type that reaches the user as a message, not a stack trace."""
from __future__ import annotations


class PotionError(Exception):
    """A problem with the user's input or environment.

    The message must say what is wrong and how to fix it; the command line prints it
    and exits with status 2. ``detail`` keeps what a library said (torch, a decoder), which
    is long and rarely helps: the command line shows it only with ``--debug``.
    """

    def __init__(self, message: str = "", detail: str | None = None):
        super().__init__(message)
        self.detail = detail


def detail_of(e: BaseException) -> str:
    """What a library's exception said, whole, for ``PotionError(..., detail=...)``."""
    return f"{type(e).__name__}: {str(e).strip()}"
