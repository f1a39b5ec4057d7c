"""Signed tracking tokens (open pixel, click, unsubscribe).

A token is ``base64url(json claims) . base64url(HMAC-SHA256(secret, claims)[:16])``.
The sender mints them with the deployment's tracking secret; the tracker verifies
them. A forged or altered token does not verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

KINDS = ("open", "click", "unsubscribe")


@dataclass(frozen=True, slots=True)
class TokenClaims:
    kind: str
    message_id: str
    link: int | None = None


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: str) -> bytes:
    return hmac.new(secret, payload.encode(), hashlib.sha256).digest()[:16]


def sign(secret: bytes, claims: TokenClaims) -> str:
    if claims.kind not in KINDS:
        raise ValueError(f"unknown token kind {claims.kind!r}")
    body: dict[str, object] = {"k": claims.kind, "m": claims.message_id}
    if claims.link is not None:
        body["l"] = claims.link
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_b64(_mac(secret, payload))}"


def verify(secret: bytes, token: str, kind: str) -> TokenClaims | None:
    """The claims of a genuine token of ``kind``; None for anything else."""
    if len(token) > 2048 or token.count(".") != 1:
        return None
    payload, signature = token.split(".")
    if not (payload.isascii() and signature.isascii()):
        return None
    # Compare the canonical encoding: no second spelling of the same signature.
    if not hmac.compare_digest(signature.encode(), _b64(_mac(secret, payload)).encode()):
        return None
    try:
        body = json.loads(_unb64(payload))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or body.get("k") != kind:
        return None
    message_id, link = body.get("m"), body.get("l")
    if not isinstance(message_id, str) or (link is not None and not isinstance(link, int)):
        return None
    return TokenClaims(kind, message_id, link)
