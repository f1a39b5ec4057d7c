"""Signed outbound webhooks for `notify` actions.

Each request carries ``X-Touchstream-Signature: t=<unix seconds>,v1=<hex>`` where
``v1`` is HMAC-SHA256 over ``"<t>.<raw body>"`` with the deployment's webhook
secret: a receiver recomputes it and rejects old timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

#: Why a notification fails without a webhook secret: never sent unsigned.
UNSIGNED_REFUSED = (
    "not sent: NURTURE_WEBHOOK_SECRET is not set, and notify webhooks are never sent unsigned"
)


def signature_header(secret: bytes, body: bytes, timestamp: int | None = None) -> str:
    ts = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def verify_signature(
    secret: bytes, body: bytes, header: str, *, tolerance: int = 300, now: int | None = None
) -> bool:
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        ts = int(parts["t"])
    except (ValueError, KeyError):
        return False
    current = int(time.time()) if now is None else now
    if abs(current - ts) > tolerance:
        return False
    expected = signature_header(secret, body, ts).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True, default=str).encode()


def retry_delay(attempts: int) -> float:
    """Seconds before the next attempt: 5 s, doubling, at most an hour."""
    return float(min(5 * 2 ** max(attempts - 1, 0), 3600))
