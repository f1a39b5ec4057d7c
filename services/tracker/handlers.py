"""Tracker handlers: registry, engagement recording (state + outbox, one transaction)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import asyncpg

from schemas import topics
from schemas.events import (
    EmailFailed,
    EmailSent,
    EngagementReceived,
    EngagementType,
    WebhookReceived,
)
from services.runtime.consumer import Rejection
from services.runtime.outbox import enqueue
from services.tracker import domain, repo


async def record_engagement(
    conn: asyncpg.Connection,
    message: asyncpg.Record,
    engagement_type: EngagementType,
    *,
    source: str,
    dedupe_key: str,
    occurred_at: datetime,
    url: str | None = None,
    machine: bool = False,
    detail: dict[str, Any] | None = None,
) -> EngagementReceived | None:
    """Record an engagement once (by dedupe key) and emit it; None when already known."""
    event = EngagementReceived(
        event_id=uuid.uuid4(),
        tenant_id=message["tenant_id"],
        occurred_at=occurred_at,
        engagement_type=engagement_type,
        lead_id=message["lead_id"],
        enrollment_id=message["enrollment_id"],
        sequence_id=message["sequence_id"],
        sequence_key=message["sequence_key"],
        sequence_version=message["sequence_version"],
        step_id=message["step_id"],
        step_index=message["step_index"],
        variant=message["variant"],
        delivery_key=message["delivery_key"],
        message_id=message["message_id"],
        email=message["to_email"],
        source=source,
        machine=machine,
        url=url,
        detail=detail or {},
    )
    inserted = await repo.insert_engagement(
        conn,
        event_id=event.event_id,
        dedupe_key=dedupe_key,
        tenant_id=event.tenant_id,
        message_id=message["message_id"],
        lead_id=event.lead_id,
        type_=engagement_type.value,
        source=source,
        machine=machine,
        occurred_at=occurred_at,
        detail={"url": url, **(detail or {})} if url else (detail or {}),
    )
    if not inserted:
        return None
    await enqueue(conn, topics.ENGAGEMENT, event)
    return event


async def _record_reply(
    conn: asyncpg.Connection,
    message: asyncpg.Record,
    inbound: domain.InboundEmail,
    occurred_at: datetime,
) -> None:
    await record_engagement(
        conn,
        message,
        EngagementType.REPLIED,
        source="inbound",
        dedupe_key=domain.reply_dedupe_key(inbound.reply_key),
        occurred_at=occurred_at,
        detail={
            "reply_message_id": inbound.message_id,
            "from": inbound.from_email,
            "subject": inbound.subject,
        },
    )


async def handle_email_outcome(
    conn: asyncpg.Connection, events: list[EmailSent | EmailFailed], *, now: datetime
) -> None:
    sent = [e for e in events if isinstance(e, EmailSent)]
    if not sent:
        return
    await repo.register_messages(conn, sent)
    for parked in await repo.take_parked_replies(conn, [e.message_id for e in sent]):
        message = await repo.first_message_of(conn, parked["referenced"])
        if message is None:
            continue
        inbound = domain.InboundEmail(
            parked["reply_key"],
            None,
            list(parked["referenced"]),
            parked["from_email"],
            parked["subject"],
        )
        await _record_reply(conn, message, inbound, parked["received_at"])


async def handle_webhook(
    conn: asyncpg.Connection, events: list[WebhookReceived], *, now: datetime
) -> list[Rejection]:
    rejections: list[Rejection] = []
    for event in events:
        if event.provider != "inbound":
            rejections.append(Rejection(event, f"unsupported webhook provider {event.provider!r}"))
            continue
        try:
            inbound = domain.parse_inbound(event.raw_body())
        except domain.InboundInvalid as exc:
            rejections.append(Rejection(event, f"unreadable inbound email: {exc}"))
            continue
        message = await repo.first_message_of(conn, inbound.referenced)
        if message is None:
            # The message it answers may not be registered yet; keep it until it is.
            await repo.park_reply(
                conn,
                inbound.reply_key,
                inbound.referenced,
                inbound.from_email,
                inbound.subject,
                event.occurred_at,
                event.body,
            )
            continue
        await _record_reply(conn, message, inbound, event.occurred_at)
    return rejections
