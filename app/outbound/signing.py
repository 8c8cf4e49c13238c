"""Standard Webhooks signatures (https://www.standardwebhooks.com), for every request Conveyor
sends: ``http.request`` calls and completion callbacks.

Headers: ``webhook-id`` (the message id, the same on every retry of one message),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature: v1,<base64>``, the HMAC-SHA256 of
``"{webhook-id}.{webhook-timestamp}.{body}"``. The key is ``CONVEYOR_HTTP_SIGNING_SECRET``:
``whsec_<base64>`` is decoded as the standard says (receivers pass the same string to a
Standard Webhooks library); any other value is used as its UTF-8 bytes (receivers pass
``secret.encode()``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

PREFIX = "whsec_"


def key_of(secret: str) -> bytes:
    if secret.startswith(PREFIX):
        raw = secret[len(PREFIX) :]
        return base64.b64decode(raw + "=" * (-len(raw) % 4))
    return secret.encode()


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    signed = f"{message_id}.{timestamp}.".encode() + body
    digest = hmac.new(key_of(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(
    message_id: str, body: bytes, secret: str | None, *, signed: bool = True
) -> dict[str, str]:
    """The three headers (the signature only with a secret, and when ``signed``)."""
    timestamp = int(time.time())
    out = {"webhook-id": message_id, "webhook-timestamp": str(timestamp)}
    if secret and signed:
        out["webhook-signature"] = signature(secret, message_id, timestamp, body)
    return out
