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
    FailureKind,
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


async def record_delay(
    conn: asyncpg.Connection,
    message: asyncpg.Record,
    *,
    source: str,
    dedupe_key: str,
    occurred_at: datetime,
    provider_event_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> bool:
    """Keep a delay notice (a DSN ``Action: delayed``, a provider's deferral) in the
    tracker's own records. It emits nothing: the remote side is still trying to deliver,
    so it is no bounce, and sending the message again would deliver it twice."""
    return await repo.insert_engagement(
        conn,
        event_id=uuid.uuid4(),
        dedupe_key=dedupe_key,
        tenant_id=message["tenant_id"],
        message_id=message["message_id"],
        lead_id=message["lead_id"],
        type_=domain.DELAYED,
        source=source,
        machine=False,
        occurred_at=occurred_at,
        detail=dict(detail or {}),
        provider=source,
        provider_event_id=provider_event_id,
    )


async def record_click(
    conn: asyncpg.Connection,
    message: asyncpg.Record,
    *,
    url: str | None,
    occurred_at: datetime,
    source: str,
    dedupe_key: str,
    user_agent: str | None,
    ip: str | None,
    method: str = "GET",
    first_party: bool = False,
    provider_event_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> EngagementReceived | None:
    """Classify and record a click; when this click shows a burst, the clicks of that
    burst already taken for a person's are flagged as machine too (in the tracker's
    records: what was emitted for them stands).

    First-party clicks of one message are handled one at a time, so a scanner's parallel
    requests see each other. Provider events need no lock: one consumer applies a
    provider's events in order (they share a partition), and a batch holding a lock per
    message could exhaust PostgreSQL's lock table."""
    message_id = message["message_id"]
    if first_party:
        await repo.lock_message_clicks(conn, message_id)
    other_links, delivered_at = await repo.click_context(
        conn, message_id, url, occurred_at, machine.CLICK_BURST
    )
    verdict = machine.classify_click(
        user_agent=user_agent,
        ip=ip,
        sent_at=message["sent_at"],
        at=occurred_at,
        method=method,
        other_links_nearby=other_links,
        delivered_at=delivered_at,
    )
    stored = dict(detail or {})
    if verdict.reason:
        stored["machine_reason"] = verdict.reason
    event = await record_engagement(
        conn,
        message,
        EngagementType.CLICKED,
        source=source,
        # First-party clicks dedupe by link and minute: a machine's click must not hide
        # a person's click of the same link in that minute.
        dedupe_key=dedupe_key + (":machine" if first_party and verdict.machine else ""),
        occurred_at=occurred_at,
        url=url,
        machine=verdict.machine,
        provider_event_id=provider_event_id,
        detail=stored,
    )
    if event is not None and other_links:
        await repo.reflag_burst_clicks(
            conn, message_id, occurred_at, machine.CLICK_BURST, machine.BURST_REASON
        )
    return event


async def record_rejection(
    conn: asyncpg.Connection, event: EmailFailed
) -> EngagementReceived | None:
    """A server refused the delivery outright. Kept once per delivery key (a bounce of
    its step in analytics); a hard one is emitted as a hard bounce, attributed to the
    lead, enrollment and step, so the lead is invalidated and the address suppressed.
    Soft and policy refusals are kept, never emitted: they say nothing against the
    address, and the sender already decided not to try again."""
    if event.failure is not FailureKind.PERMANENT:
        return None
    bounce_type = domain.rejection_bounce_type(event)
    if not await repo.insert_rejection(conn, event, bounce_type.value if bounce_type else None):
        return None
    if bounce_type is not BounceType.HARD:
        return None
    # A soft-bounced message sent again is registered under the same delivery key.
    message = await repo.message_by_delivery_key(conn, event.delivery_key)
    engagement = EngagementReceived(
        tenant_id=event.tenant_id,
        occurred_at=event.occurred_at,
        engagement_type=EngagementType.BOUNCED,
        lead_id=event.lead_id,
        enrollment_id=event.enrollment_id,
        sequence_id=event.sequence_id,
        sequence_key=message["sequence_key"] if message else None,
        sequence_version=message["sequence_version"] if message else None,
        step_id=event.step_id,
        step_index=event.step_index,
        variant=message["variant"] if message else None,
        delivery_key=event.delivery_key,
        message_id=message["message_id"] if message else None,
        email=event.to_email.lower(),
        source="smtp",
        bounce_type=BounceType.HARD,
        detail={
            "rejected": True,
            "status": event.enhanced_status,
            "smtp_code": event.smtp_code,
            "reason": event.reason[:2000],
        },
    )
    await enqueue(conn, topics.ENGAGEMENT, engagement)
    return engagement


async def handle_email_outcome(
    conn: asyncpg.Connection, events: list[EmailSent | EmailFailed], *, now: datetime
) -> None:
    sent = [e for e in events if isinstance(e, EmailSent)]
    if sent:
        await _register_sent(conn, sent, now)
    for failed in events:
        if isinstance(failed, EmailFailed):
            await record_rejection(conn, failed)


async def _register_sent(conn: asyncpg.Connection, sent: list[EmailSent], now: datetime) -> None:
    """Register sent messages; replies parked while waiting for them are taken now."""
    await repo.lock_for_registering(conn)
    await repo.register_messages(conn, sent)
    waiting = await repo.take_parked_events(
        conn,
        [e.delivery_key for e in sent],
        [e.message_id for e in sent],
        [e.provider_message_id for e in sent if e.provider_message_id],
    )
    if waiting:
        await apply_provider_events(conn, [webhooks.event_from_json(e) for e in waiting], now)
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


async def _look_again_before_parking(
    conn: asyncpg.Connection, raw: bytes, received_at: datetime, source: str
) -> None:
    """Under the park lock, registrations in flight have committed: look once more."""
    await repo.lock_for_parking(conn)
    await process_inbound(conn, raw, received_at=received_at, source=source, locked=True)


async def process_inbound(
    conn: asyncpg.Connection,
    raw: bytes,
    *,
    received_at: datetime,
    message: asyncpg.Record | None = None,
    source: str = "inbound",
    locked: bool = False,
) -> None:
    """A bounce (or a delay notice), an automatic answer, or a person's reply (maybe
    asking to be removed), attributed to the message it answers.

    Before parking mail whose message is not registered yet, it takes the park lock
    (``repo.PARK_LOCK``) and looks once more (``locked``): a registration in flight
    has committed by then."""
    inbound = domain.parse_inbound(raw)
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
            if bounce.original_message_id:
                # The message it reports may not be registered yet (a fast DSN): keep it
                # until it is, as a reply would be kept.
                if not locked:
                    await _look_again_before_parking(conn, raw, received_at, source)
                    return
                await repo.park_reply(
                    conn,
                    inbound.reply_key,
                    [bounce.original_message_id],
                    bounce.recipient,
                    inbound.subject,
                    received_at,
                    raw.decode("latin-1"),
                    kind="bounce",
                )
                return
            await repo.record_unattributed(
                conn,
                source,
                "bounce",
                bounce.recipient,
                received_at,
                {"status": bounce.status, "diagnostic": bounce.diagnostic},
            )
            return
        report = {
            "status": bounce.status,
            "action": bounce.action,
            "diagnostic": bounce.diagnostic,
            "remote_mta": bounce.remote_mta,
            "recipient": bounce.recipient,
            "report_message_id": inbound.message_id,
            "report": bounce.raw_report[:20_000],
        }
        if not bounce.final:
            await record_delay(
                conn,
                target,
                source=source,
                dedupe_key=domain.delay_dedupe_key(target["message_id"], inbound.reply_key),
                occurred_at=received_at,
                detail=report,
            )
            return
        await record_engagement(
            conn,
            target,
            EngagementType.BOUNCED,
            source=source,
            dedupe_key=domain.bounce_dedupe_key(target["message_id"], inbound.reply_key),
            occurred_at=received_at,
            bounce_type=BounceType(bounce.kind),
            detail=report,
        )
        return

    target = message or await repo.first_message_of(conn, inbound.referenced)
    matched_by = "thread" if target is not None else None
    if target is None and inbound.from_email:
        # The thread headers name nothing of ours (or there are none): the latest message
        # we sent to the sender, in the tenant whose mailbox it was sent to.
        target = domain.choose_reply_target(
            await repo.latest_messages_to(conn, inbound.from_email, inbound.recipients),
            inbound.recipients,
        )
        matched_by = "address" if target is not None else None
    if target is None:
        if inbound.referenced:
            # The message it answers may not be registered yet; keep it until it is
            # (or until it expires, domain.PARKED_REPLY_TTL).
            if not locked:
                await _look_again_before_parking(conn, raw, received_at, source)
                return
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
    if matched_by is not None:
        detail["matched_by"] = matched_by
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
    conn: asyncpg.Connection,
    events: list[webhooks.NormalizedEvent],
    now: datetime,
    locked: bool = False,
) -> None:
    """Attribute a batch of provider events in bulk, then record each once. Events
    naming a message not registered yet are looked up once more under the park lock
    (``repo.PARK_LOCK``) before they are parked."""
    wanted = [e for e in events if e.type in _PROVIDER_TYPES or e.type == "deferred"]
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
    waiting: list[webhooks.NormalizedEvent] = []
    parked: list[tuple[str | None, str | None, str | None, dict[str, Any]]] = []
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
            if normalized.delivery_key or normalized.message_id or normalized.provider_message_id:
                # It names a message of ours not registered yet (its EmailSent is on
                # its way): it waits for it.
                waiting.append(normalized)
                parked.append(
                    (
                        normalized.delivery_key,
                        normalized.message_id,
                        normalized.provider_message_id,
                        webhooks.event_to_json(normalized),
                    )
                )
                continue
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
    if waiting and not locked:
        await repo.lock_for_parking(conn)
        await apply_provider_events(conn, waiting, now, locked=True)
    else:
        await repo.park_events(conn, parked, now)
    await repo.record_unattributed_many(conn, unattributed)


async def _apply_provider_event(
    conn: asyncpg.Connection, normalized: webhooks.NormalizedEvent, target: asyncpg.Record
) -> None:
    dedupe_key = f"{normalized.provider}:{normalized.provider_event_id}"
    if normalized.type == "deferred":
        await record_delay(
            conn,
            target,
            source=normalized.provider,
            dedupe_key=dedupe_key,
            occurred_at=normalized.occurred_at,
            provider_event_id=normalized.provider_event_id,
            detail=normalized.detail,
        )
        return
    engagement_type = _PROVIDER_TYPES[normalized.type]
    if engagement_type is EngagementType.CLICKED:
        await record_click(
            conn,
            target,
            url=normalized.url,
            occurred_at=normalized.occurred_at,
            source=normalized.provider,
            dedupe_key=dedupe_key,
            user_agent=normalized.user_agent,
            ip=normalized.ip,
            provider_event_id=normalized.provider_event_id,
            detail=normalized.detail,
        )
        return
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
        dedupe_key=dedupe_key,
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
    await apply_provider_events(conn, provider_events, now)
    return rejections
