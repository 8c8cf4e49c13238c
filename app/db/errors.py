"""What a database error means for the caller: refused data, a refused statement, or neither.

PostgreSQL names every error with a SQLSTATE whose first two characters are its class. The
asyncpg dialect of SQLAlchemy turns only some asyncpg errors into the matching DBAPI types
(integrity and syntax errors); a data exception (class 22: a NaN or a NUL inside jsonb, a number
out of range) arrives as a plain ``DBAPIError``. So callers never test exception types: they
ask this module, which reads the SQLSTATE of SQLAlchemy-wrapped and raw asyncpg errors alike.

- :func:`refusal` is ``"value"`` when Postgres refused what the statement carries (classes 22
  data exception, 23 integrity constraint, 54 program limit, e.g. an index row too large);
  ``"statement"`` for class 42 (syntax or access rule: a bug or a missing migration, not the
  caller's data); ``None`` for everything else (connection, timeout, serialisation, a server
  shutting down): those may pass on a retry.
- :func:`is_data_error`: either kind of refusal. Repeating the same statement cannot succeed.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError

Refusal = Literal["value", "statement"]

VALUE_CLASSES = frozenset({"22", "23", "54"})
STATEMENT_CLASSES = frozenset({"42"})
_MAX_CHAIN = 8


def _chain(exc: BaseException) -> list[BaseException]:
    """The error, what it wraps (``orig``), and their causes: a SQLAlchemy error wraps the
    dialect's adapted error, whose ``__cause__`` is asyncpg's own."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo and len(seen) < _MAX_CHAIN:
        current = todo.pop(0)
        if current is None or any(current is s for s in seen):
            continue
        seen.append(current)
        orig = getattr(current, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, current.__cause__]
    return seen


def sqlstate(exc: BaseException) -> str | None:
    """The five-character SQLSTATE Postgres sent with the error, if it came from Postgres."""
    for err in _chain(exc):
        code = getattr(err, "sqlstate", None)
        if isinstance(code, str) and len(code) == 5:
            return code
    return None


def refusal(exc: BaseException) -> Refusal | None:
    """``"value"``, ``"statement"`` or ``None``: see the module docstring. asyncpg raises a
    value it cannot encode for the wire (text with a lone surrogate, an int out of its
    parameter's range) as its class-22 ``DataError`` too, so that counts as a value refused."""
    code = sqlstate(exc)
    if code is None:  # a driver that maps errors to the DBAPI types but sends no SQLSTATE
        if isinstance(exc, DataError | IntegrityError):
            return "value"
        return "statement" if isinstance(exc, ProgrammingError) else None
    if code[:2] in VALUE_CLASSES:
        return "value"
    return "statement" if code[:2] in STATEMENT_CLASSES else None


def is_data_error(exc: BaseException) -> bool:
    """Postgres (or the driver) refused this statement for what it says or carries."""
    return refusal(exc) is not None


def describe(exc: BaseException) -> str:
    """A short name for logs and error records: the innermost error's class and its SQLSTATE
    (never its message, which may quote the refused value)."""
    innermost = _chain(exc)[-1]
    code = sqlstate(exc)
    return f"{type(innermost).__name__} ({code})" if code else type(innermost).__name__
