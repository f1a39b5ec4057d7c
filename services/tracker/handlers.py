"""Tracker handlers: registry, engagement recording (state + outbox, one transaction),
and the normalisation of provider webhooks and inbound mail."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from schemas import topics
from schemas.events import (
    BounceType,
    EmailFailed,
    EmailSent,
    EngagementReceived,
    EngagementType,
    WebhookReceived,
)
from services.runtime.consumer import Rejection
from services.runtime.outbox import enqueue
from services.tracker import domain, machine, mailparse, repo, webhooks

_PROVIDER_TYPES = {
    "delivered": EngagementType.DELIVERED,
    "opened": EngagementType.OPENED,
    "clicked": EngagementType.CLICKED,
    "bounced": EngagementType.BOUNCED,
    "dropped": EngagementType.BOUNCED,
    "complained": EngagementType.COMPLAINED,
    "unsubscribed": EngagementType.UNSUBSCRIBED,
}


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
    bounce_type: BounceType | None = None,
    provider_event_id: str | None = None,
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
        bounce_type=bounce_type,
        provider_event_id=provider_event_id,
        detail=detail or {},
    )
    stored = dict(detail or {})
    if url:
        stored["url"] = url
    if bounce_type is not None:
        stored["bounce_type"] = bounce_type.value
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
        detail=stored,
        provider=source,
        provider_event_id=provider_event_id,
    )
    if not inserted:
        return None
    await enqueue(conn, topics.ENGAGEMENT, event)
    return event


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
        await process_inbound(
            conn,
            parked["body"].encode("latin-1"),
            received_at=parked["received_at"],
            message=message,
        )


# ------------------------------------------------------------------ inbound mail


async def process_inbound(
    conn: asyncpg.Connection,
    raw: bytes,
    *,
    received_at: datetime,
    message: asyncpg.Record | None = None,
    source: str = "inbound",
) -> None:
    """A bounce, an automatic answer, or a person's reply (maybe asking to be
    removed), attributed to the message it answers."""
    bounce = mailparse.parse_bounce(raw)
    if bounce is not None:
        target = message or await repo.message_for_event(
            conn,
            delivery_key=None,
            message_id=bounce.original_message_id,
            provider_message_id=None,
            email=bounce.recipient,
        )
        if target is None:
            await repo.record_unattributed(
                conn,
                source,
                "bounce",
                bounce.recipient,
                received_at,
                {"status": bounce.status, "diagnostic": bounce.diagnostic},
            )
            return
        await record_engagement(
            conn,
            target,
            EngagementType.BOUNCED,
            source=source,
            dedupe_key=f"bounce:{target['message_id']}:{bounce.kind}:{bounce.status}",
            occurred_at=received_at,
            bounce_type=BounceType(bounce.kind),
            detail={
                "status": bounce.status,
                "action": bounce.action,
                "diagnostic": bounce.diagnostic,
                "remote_mta": bounce.remote_mta,
                "recipient": bounce.recipient,
                "report": bounce.raw_report[:20_000],
            },
        )
        return

    inbound = domain.parse_inbound(raw)
    target = message or await repo.first_message_of(conn, inbound.referenced)
    if target is None and not inbound.referenced and inbound.from_email:
        # No thread headers: the latest message we sent to the sender.
        target = await repo.message_for_event(
            conn,
            delivery_key=None,
            message_id=None,
            provider_message_id=None,
            email=inbound.from_email,
        )
    if target is None:
        if inbound.referenced:
            # The message it answers may not be registered yet; keep it until it is.
            await repo.park_reply(
                conn,
                inbound.reply_key,
                inbound.referenced,
                inbound.from_email,
                inbound.subject,
                received_at,
                raw.decode("latin-1"),
            )
        else:
            await repo.record_unattributed(
                conn, source, "reply", inbound.from_email, received_at, {"subject": inbound.subject}
            )
        return
    detail: dict[str, Any] = {
        "reply_message_id": inbound.message_id,
        "from": inbound.from_email,
        "subject": inbound.subject,
    }
    auto = mailparse.classify_auto_reply(raw, received_at=received_at)
    if auto is not None:
        await record_engagement(
            conn,
            target,
            EngagementType.AUTO_REPLIED,
            source=source,
            dedupe_key=f"auto:{inbound.reply_key}",
            occurred_at=received_at,
            detail={
                **detail,
                "kind": auto.kind,
                "return_date": auto.return_date.isoformat() if auto.return_date else None,
            },
        )
        return
    if mailparse.wants_unsubscribe(mailparse.reply_text(raw)):
        await record_engagement(
            conn,
            target,
            EngagementType.UNSUBSCRIBED,
            source=source,
            dedupe_key=domain.unsubscribe_dedupe_key(target["message_id"]),
            occurred_at=received_at,
            detail={**detail, "by_reply": True},
        )
        return
    await record_engagement(
        conn,
        target,
        EngagementType.REPLIED,
        source=source,
        dedupe_key=domain.reply_dedupe_key(inbound.reply_key),
        occurred_at=received_at,
        detail=detail,
    )


# --------------------------------------------------------------- provider events


def _provider_events(event: WebhookReceived) -> list[webhooks.NormalizedEvent]:
    body = event.raw_body()
    if event.provider == "sendgrid":
        return webhooks.parse_sendgrid(body)
    if event.provider == "mailgun":
        return webhooks.parse_mailgun(body)[1]
    if event.provider == "postmark":
        return webhooks.parse_postmark(body)
    if event.provider == "ses":
        return webhooks.parse_ses(json.loads(body))
    raise ValueError(f"unsupported webhook provider {event.provider!r}")


async def apply_provider_events(
    conn: asyncpg.Connection, events: list[webhooks.NormalizedEvent]
) -> None:
    """Attribute a batch of provider events in bulk, then record each once."""
    wanted = [e for e in events if e.type in _PROVIDER_TYPES]
    if not wanted:
        return
    by_key, by_id, by_provider, by_email = await repo.messages_for_events(
        conn,
        [e.delivery_key for e in wanted if e.delivery_key],
        [e.message_id for e in wanted if e.message_id],
        [e.provider_message_id for e in wanted if e.provider_message_id],
        [e.email for e in wanted if e.email],
    )
    unattributed = []
    for normalized in wanted:
        target = (
            (by_key.get(normalized.delivery_key) if normalized.delivery_key else None)
            or (by_id.get(normalized.message_id) if normalized.message_id else None)
            or (
                by_provider.get(normalized.provider_message_id)
                if normalized.provider_message_id
                else None
            )
            or by_email.get(normalized.email.lower())
        )
        if target is None:
            unattributed.append(
                (
                    normalized.provider,
                    normalized.type,
                    normalized.email,
                    normalized.occurred_at,
                    {"provider_event_id": normalized.provider_event_id},
                )
            )
            continue
        await _apply_provider_event(conn, normalized, target)
    await repo.record_unattributed_many(conn, unattributed)


async def _apply_provider_event(
    conn: asyncpg.Connection, normalized: webhooks.NormalizedEvent, target: asyncpg.Record
) -> None:
    engagement_type = _PROVIDER_TYPES[normalized.type]
    is_machine = False
    reason: str | None = None
    if engagement_type is EngagementType.OPENED:
        verdict = (
            machine.Verdict(True, f"{normalized.provider} flags a machine open")
            if machine.provider_open_is_machine(normalized.detail)
            else machine.classify_open(
                user_agent=normalized.user_agent,
                ip=normalized.ip,
                sent_at=target["sent_at"],
                at=normalized.occurred_at,
            )
        )
        is_machine, reason = verdict.machine, verdict.reason
    elif engagement_type is EngagementType.CLICKED:
        verdict = machine.classify_click(
            user_agent=normalized.user_agent,
            ip=normalized.ip,
            sent_at=target["sent_at"],
            at=normalized.occurred_at,
            clicks_just_before=await repo.recent_clicks(
                conn, target["message_id"], normalized.occurred_at - machine.CLICK_BURST
            ),
        )
        is_machine, reason = verdict.machine, verdict.reason
    bounce_type = None
    if engagement_type is EngagementType.BOUNCED:
        bounce_type = BounceType(normalized.bounce_type or "hard")
    detail = dict(normalized.detail)
    if reason:
        detail["machine_reason"] = reason
    await record_engagement(
        conn,
        target,
        engagement_type,
        source=normalized.provider,
        dedupe_key=f"{normalized.provider}:{normalized.provider_event_id}",
        occurred_at=normalized.occurred_at,
        url=normalized.url,
        machine=is_machine,
        bounce_type=bounce_type,
        provider_event_id=normalized.provider_event_id,
        detail=detail,
    )


async def handle_webhook(
    conn: asyncpg.Connection, events: list[WebhookReceived], *, now: datetime
) -> list[Rejection]:
    rejections: list[Rejection] = []
    provider_events: list[webhooks.NormalizedEvent] = []
    for event in events:
        try:
            if event.provider.startswith("inbound"):
                async with conn.transaction():  # a savepoint: a bad one leaves nothing
                    raw = event.raw_body()
                    if event.provider == "inbound-sendgrid":
                        raw = webhooks.inbound_from_sendgrid_parse(raw, event.content_type)
                    elif event.provider == "inbound-mailgun":
                        raw = webhooks.inbound_from_mailgun_route(raw, event.content_type)
                    await process_inbound(conn, raw, received_at=event.occurred_at)
            else:
                provider_events += _provider_events(event)  # pure: parse errors write nothing
        except (ValueError, KeyError, TypeError, webhooks.WebhookRejected) as exc:
            rejections.append(Rejection(event, f"unreadable {event.provider} webhook: {exc}"))
    await apply_provider_events(conn, provider_events)
    return rejections
