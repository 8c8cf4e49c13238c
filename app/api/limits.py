"""Request-body limits, enforced as a pure ASGI middleware before any route reads the body.

In order: a declared ``Content-Length`` over the limit → 413 without reading a byte; a POST, PUT
or PATCH body that is not ``application/json`` (or ``+json``) → 415 without reading it; the body
is then read chunk by chunk and reading stops with 413 as soon as the limit is passed (chunked
bodies included). The buffered JSON is checked before FastAPI parses it:

- nesting deeper than :data:`MAX_DEPTH`, found by scanning brackets outside strings (no
  recursion, so no dependence on Python's recursion limit);
- malformed JSON or non-UTF-8 bytes, ``NaN``/``Infinity`` and numbers overflowing a double
  (``1e400``), duplicate object keys, NUL characters (PostgreSQL ``jsonb`` rejects them) and lone
  UTF-16 surrogates (``"\\ud800"``, which cannot be encoded as UTF-8).

Each of those is a 422. Error bodies have the usual ``{"error", "message", "details"}`` shape and
never echo the body.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import domain_response
from app.errors import (
    BadRequest,
    ConveyorError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)

MAX_DEPTH = 32
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})

_SPECIAL = re.compile(rb'[\[\]{}"\\]')
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # a string, on valid JSON
_OPEN, _CLOSE = frozenset(b"[{"), frozenset(b"]}")
_QUOTE, _BACKSLASH = ord('"'), ord("\\")


def _invalid(message: str, kind: str) -> InvalidInput:
    return InvalidInput(message, details=[{"loc": ["body"], "msg": message, "type": kind}])


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit``; stops at the first excess.

    One linear pass over the structural characters (a regex over whole strings could backtrack
    quadratically on an unterminated one).
    """
    depth, in_string, escaped_at = 0, False, -1
    for match in _SPECIAL.finditer(body):
        pos = match.start()
        if pos == escaped_at:
            continue
        char = body[pos]
        if in_string:
            if char == _BACKSLASH:
                escaped_at = pos + 1
            elif char == _QUOTE:
                in_string = False
        elif char == _QUOTE:
            in_string = True
        elif char in _OPEN:
            depth += 1
            if depth > limit:
                return True
        elif char in _CLOSE:
            depth -= 1
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed in JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _check_text(value: str) -> None:
    if "\x00" in value:
        raise ValueError("NUL characters are not allowed in strings")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("lone UTF-16 surrogates are not allowed in strings") from None


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError("duplicate object key")
        _check_text(key)
        obj[key] = value
    return obj


def _check_strings(document: Any) -> None:
    """Check every string value, iteratively (keys were checked while parsing)."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            _check_text(node)
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def plainly_acceptable(body: bytes, max_depth: int = MAX_DEPTH) -> bool:
    """The common case, fast: orjson parses the body (so it is UTF-8 JSON with no ``NaN``,
    infinity or lone surrogate), nothing nests deeper than ``max_depth``, no string holds a
    NUL (in valid JSON only the escape ``\\u0000`` can make one), and no object repeats a
    key (the keys orjson kept are as many as the colons outside strings). ``False`` only means
    "look closer": :func:`check_json` then finds the fault, if there is one."""
    if b"\\u0000" in body:
        return False
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    keys = _count_keys(document, max_depth)
    if keys < 0:
        return False
    colons = body.count(b":")
    return colons == keys or _STRING.sub(b"", body).count(b":") == keys


def _count_keys(document: Any, max_depth: int) -> int:
    """The number of object keys, level by level; -1 when containers nest too deep."""
    keys, depth, level = 0, 1, [document]
    while level:
        nested: list[Any] = []
        for node in level:
            kind = type(node)
            if kind is dict:
                keys += len(node)
                nested.extend(node.values())
            elif kind is list:
                nested.extend(node)
            else:
                continue
            if depth > max_depth:
                return -1
        level, depth = nested, depth + 1
    return keys


def check_json(body: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`InvalidInput` (422) unless ``body`` is JSON the API can store as-is."""
    if plainly_acceptable(body, max_depth):
        return
    if json_depth_exceeds(body, max_depth):
        raise _invalid(f"JSON nesting is deeper than {max_depth} levels", "json_too_deep")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("the body is not valid UTF-8", "json_invalid") from None
    try:
        document = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite,
            object_pairs_hook=_unique_object,
        )
        _check_strings(document)
    except json.JSONDecodeError as exc:
        raise _invalid(f"malformed JSON: {exc.msg}", "json_invalid") from None
    except (ValueError, RecursionError) as exc:
        # only our own hooks' messages and int() digit-limit errors: they never quote the input
        message = str(exc) if not isinstance(exc, RecursionError) else "JSON nesting too deep"
        raise _invalid(f"unacceptable JSON: {message}", "json_value") from None


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"content-type"})


def _body_headers(scope: Scope) -> dict[bytes, str]:
    """The headers that describe the body, in one pass (the first of each name counts)."""
    found: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _BODY_HEADERS and name not in found:
            found[name] = value.decode("latin-1")
    return found


def _declared_length(headers: dict[bytes, str]) -> int | None:
    raw = headers.get(b"content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit():
        raise BadRequest("invalid Content-Length header")
    return int(raw)


class BodyLimits:
    """Pure ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_depth: int = MAX_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            body = await self._admit(scope, receive)
        except ConveyorError as exc:
            await domain_response(exc)(scope, receive, send)
            return
        except _Disconnected:
            return
        await self.app(scope, receive if body is None else _replay(body, receive), send)

    async def _admit(self, scope: Scope, receive: Receive) -> bytes | None:
        """The buffered body to pass on, or None to pass the request through untouched."""
        headers = _body_headers(scope)
        declared = _declared_length(headers)
        if declared is not None and declared > self.max_bytes:
            raise self._too_large()
        chunked = "chunked" in headers.get(b"transfer-encoding", "").lower()
        if not (chunked or (declared or 0) > 0) or scope["method"] not in BODY_METHODS:
            return None
        if not _is_json(headers.get(b"content-type")):
            raise UnsupportedMediaType(
                "request bodies must be application/json",
                details={"accepted": ["application/json"]},
            )
        body = await self._read(receive)
        if body:
            check_json(body, self.max_depth)
        return body

    async def _read(self, receive: Receive) -> bytes:
        """Read the body, stopping as soon as it passes the limit."""
        buffer = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            buffer += message.get("body", b"")
            if len(buffer) > self.max_bytes:
                raise self._too_large()
            if not message.get("more_body", False):
                return bytes(buffer)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"the request body exceeds {self.max_bytes} bytes",
            details={"max_bytes": self.max_bytes},
        )


class _Disconnected(Exception):
    """The client went away while the body was being read."""


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
