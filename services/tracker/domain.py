"""Tracker decisions: parsing and attribution, no I/O."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses

_MESSAGE_ID = re.compile(r"<[^<>\s]+>")

#: The transparent GIF served by the open pixel.
PIXEL_GIF = bytes.fromhex(
    "47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b"
)


class InboundInvalid(ValueError):
    """The inbound email cannot be read."""


@dataclass(frozen=True, slots=True)
class InboundEmail:
    reply_key: str
    message_id: str | None
    referenced: list[str]
    from_email: str | None
    subject: str | None


def message_ids(value: str | None) -> list[str]:
    return _MESSAGE_ID.findall(value or "")


def parse_inbound(raw: bytes) -> InboundEmail:
    """Read what matters of a raw RFC 822 reply: who, and which messages it answers."""
    if not raw.strip():
        raise InboundInvalid("empty message")
    message: Message = message_from_bytes(raw)
    if not message.keys():
        raise InboundInvalid("no headers: not an RFC 822 message")
    own_ids = message_ids(str(message.get("Message-ID", "")))
    own_id = own_ids[0] if own_ids else None
    # In-Reply-To names the direct parent; References the thread, oldest first.
    referenced: list[str] = []
    for candidate in message_ids(str(message.get("In-Reply-To", ""))) + list(
        reversed(message_ids(str(message.get("References", ""))))
    ):
        if candidate not in referenced:
            referenced.append(candidate)
    senders = getaddresses([str(message.get("From", ""))])
    from_email = senders[0][1].lower() if senders and senders[0][1] else None
    reply_key = own_id or "sha256:" + hashlib.sha256(raw).hexdigest()
    raw_subject = message.get("Subject")
    subject = str(make_header(decode_header(str(raw_subject)))) if raw_subject else None
    return InboundEmail(reply_key, own_id, referenced, from_email, subject)


def minute_bucket(at: datetime) -> str:
    return at.strftime("%Y%m%d%H%M")


def open_dedupe_key(message_id: str, at: datetime) -> str:
    return f"open:{message_id}:{minute_bucket(at)}"


def click_dedupe_key(message_id: str, link: int, at: datetime) -> str:
    return f"click:{message_id}:{link}:{minute_bucket(at)}"


def unsubscribe_dedupe_key(message_id: str) -> str:
    return f"unsubscribe:{message_id}"


def reply_dedupe_key(reply_key: str) -> str:
    return f"reply:{reply_key}"
