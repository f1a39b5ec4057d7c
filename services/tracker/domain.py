"""Tracker decisions: parsing and attribution, no I/O."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import message_from_bytes
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses
from typing import Any, Protocol, TypeVar

from schemas.events import BounceType, EmailFailed, FailureKind
from services.tracker import mailparse

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
    #: Where it was sent (To, Cc; lower-cased): one of our mailboxes, for a reply.
    recipients: list[str] = field(default_factory=list)


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
    recipients: list[str] = []
    for _, address in getaddresses(
        [str(v) for v in message.get_all("To", [])] + [str(v) for v in message.get_all("Cc", [])]
    ):
        if "@" in address and address.lower() not in recipients:
            recipients.append(address.lower())
    return InboundEmail(reply_key, own_id, referenced, from_email, subject, recipients)


#: A reply whose thread headers name no message of ours and whose sender we cannot
#: tie to one is parked this long, in case the message it answers is registered late
#: (the EmailSent still on its way); then it is kept as unattributed.
PARKED_REPLY_TTL = timedelta(days=7)


class _Row(Protocol):
    def __getitem__(self, key: str, /) -> Any: ...


_R = TypeVar("_R", bound=_Row)


def choose_reply_target(candidates: Sequence[_R], recipients: Sequence[str]) -> _R | None:
    """The message a reply answers when its thread headers match nothing of ours:
    ``candidates`` are the latest messages we sent to the reply's sender, one per tenant
    (a tenant's own choice: one from the mailbox the reply was sent to, else its latest).

    A message from a mailbox the reply was addressed to wins (that mailbox says which
    tenant it is; the latest such message); otherwise the sender's address decides
    only when a single tenant ever wrote to it. Two tenants and no mailbox to tell
    them apart: nobody (attributing it to the wrong tenant is worse than not at all)."""
    wanted = {r.lower() for r in recipients}
    addressed = [c for c in candidates if str(c["from_email"]).lower() in wanted]
    if addressed:
        return max(addressed, key=lambda c: c["sent_at"])
    if len({c["tenant_id"] for c in candidates}) == 1:
        return max(candidates, key=lambda c: c["sent_at"])
    return None


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


def bounce_dedupe_key(message_id: str, report_key: str) -> str:
    """One bounce per bounce report (its own Message-ID, else its digest): the same report
    delivered twice counts once, while another report (the final failure after a delay
    notice, the failure of a retried send) is news."""
    return f"bounce:{message_id}:{report_key}"


def delay_dedupe_key(message_id: str, report_key: str) -> str:
    return f"delayed:{message_id}:{report_key}"


#: Stored as the type of a delay notice in the tracker's own engagement records; never
#: emitted (it is not something the recipient did, and nothing failed).
DELAYED = "delayed"

_ENHANCED_CODE = re.compile(r"(?<![\w.])[245]\.\d{1,3}\.\d{1,3}(?!\d|\.\d)")


def rejection_bounce_type(event: EmailFailed) -> BounceType | None:
    """How a server's outright refusal counts: the sender's classification when it gave
    one, else the enhanced status code's (as for a DSN); None for what is not a refusal
    (not ``permanent``) or names no code to classify by. Only ``hard`` invalidates."""
    if event.failure is not FailureKind.PERMANENT:
        return None
    if event.bounce_type is not None:
        return event.bounce_type
    found = _ENHANCED_CODE.search(event.enhanced_status or "") or _ENHANCED_CODE.search(
        event.reason
    )
    if found is None:
        return None
    return BounceType(mailparse.classify_bounce("failed", found.group(0), event.reason))
