"""Exception helpers shared by the edges."""

from __future__ import annotations

__all__ = ["sole_exception"]


def sole_exception(exc: BaseException) -> BaseException | None:
    """The one exception inside nested single-member groups (or ``exc`` itself), else None.

    Nurseries wrap a start-up failure in groups; an operator should read
    "Address already in use", not a tree.
    """
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) != 1:
            return None
        exc = exc.exceptions[0]
    return exc
