"""Sender handlers and the delivery outcomes they write (state + outbox, one transaction)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from schemas import topics
from schemas.events import (
    BounceType,
    EmailFailed,
    EmailSent,
    EngagementReceived,
    EngagementType,
    EnrollmentStopped,
    FailureKind,
    StepDue,
)
from services.runtime.outbox import enqueue, enqueue_many
from services.sender import repo
from services.sender.domain import RejectionClass


def email_sent_event(
    row: asyncpg.Record | Mapping[str, Any], *, uncertain: bool = False
) -> EmailSent:
    return EmailSent(
        tenant_id=row["tenant_id"],
        lead_id=row["lead_id"],
        enrollment_id=row["enrollment_id"],
        sequence_id=row["sequence_id"],
        sequence_key=row["sequence_key"],
        sequence_version=row["sequence_version"],
        step_id=row["step_id"],
        step_index=row["step_index"],
        variant=row["variant"],
        delivery_key=row["delivery_key"],
        message_id=row["message_id"],
        to_email=row["to_email"],
        from_email=row["from_email"],
        subject=row["subject"],
        sent_at=row["sent_at"],
        links=list(row["links"] or []),
        uncertain=uncertain,
        dry_run=bool(row["dry_run"]),
        transport=row["transport"],
        provider_message_id=row["provider_message_id"],
    )


def email_failed_event(
    row: asyncpg.Record,
    failure: FailureKind,
    reason: str,
    smtp_code: int | None = None,
    rejection: RejectionClass | None = None,
) -> EmailFailed:
    return EmailFailed(
        tenant_id=row["tenant_id"],
        lead_id=row["lead_id"],
        enrollment_id=row["enrollment_id"],
        sequence_id=row["sequence_id"],
        step_id=row["step_id"],
        step_index=row["step_index"],
        delivery_key=row["delivery_key"],
        to_email=row["to_email"],
        failure=failure,
        reason=reason,
        smtp_code=smtp_code,
        enhanced_status=rejection.enhanced_status if rejection else None,
        bounce_type=rejection.bounce_type if rejection else None,
    )


async def handle_step_due(
    conn: asyncpg.Connection, events: list[StepDue | EnrollmentStopped]
) -> None:
    """In the topic's order: a StepDue becomes a delivery; an EnrollmentStopped cancels
    what its enrollment has not handed off yet (an EmailFailed CANCELLED for each).
    A delivery already sending or sent is left as it is."""
    due: list[StepDue] = []
    for event in events:
        if isinstance(event, StepDue):
            due.append(event)
            continue
        await repo.insert_deliveries(conn, due)
        due = []
        reason = f"enrollment stopped: {event.reason}"
        cancelled = await repo.cancel_pending_for_enrollment(
            conn, event.tenant_id, event.enrollment_id, reason
        )
        await _tell_cancelled(conn, cancelled, reason)
    await repo.insert_deliveries(conn, due)


async def _tell_cancelled(
    conn: asyncpg.Connection, cancelled: Sequence[asyncpg.Record], reason: str
) -> None:
    """An EmailFailed (cancelled) for each delivery that will not be handed off."""
    await enqueue_many(
        conn,
        [
            (topics.EMAIL_SENT, email_failed_event(r, FailureKind.CANCELLED, reason))
            for r in cancelled
        ],
    )


async def handle_engagement(
    conn: asyncpg.Connection,
    events: list[EngagementReceived],
    *,
    now: datetime | None = None,
    soft_bounce_retries: int = 3,
    soft_bounce_delay: timedelta = timedelta(hours=1),
) -> None:
    """Keep the suppression list; cancel what is still queued for a lead who replied,
    unsubscribed, complained or hard-bounced; send a soft-bounced message again."""
    for event in events:
        if (
            event.engagement_type is EngagementType.BOUNCED
            and event.bounce_type is BounceType.SOFT
            and event.delivery_key
            and now is not None
        ):
            await repo.retry_soft_bounce(
                conn, event.delivery_key, now + soft_bounce_delay, soft_bounce_retries
            )
        if event.suppresses_address:
            await repo.add_suppression(
                conn,
                event.tenant_id,
                event.email,
                event.engagement_type.value,
                f"engagement:{event.source}",
                event.event_id,
            )
        if event.stops_sequence:
            reason = f"lead {event.engagement_type.value}"
            cancelled = await repo.cancel_pending_for_lead(
                conn, event.tenant_id, event.lead_id, reason
            )
            await _tell_cancelled(conn, cancelled, reason)


async def record_sent(
    conn: asyncpg.Connection,
    key: str,
    *,
    sent_at: datetime,
    code: int,
    response: str,
    links: list[str],
    transport: str | None = None,
    provider_message_id: str | None = None,
) -> None:
    row = await repo.finish(
        conn,
        key,
        "sent",
        smtp_code=code,
        smtp_response=response[:500],
        sent_at=sent_at,
        links=links,
        transport=transport,
        provider_message_id=provider_message_id,
    )
    assert row is not None
    await enqueue(conn, topics.EMAIL_SENT, email_sent_event(row))


async def record_dry_run(
    conn: asyncpg.Connection,
    key: str,
    *,
    message_id: str,
    from_email: str,
    from_name: str | None,
    sent_at: datetime,
    links: list[str],
    mailbox_id: object,
) -> None:
    row = await repo.mark_dry_run(
        conn, key, message_id, from_email, from_name, sent_at, links, mailbox_id
    )
    if row is None:
        return  # cancelled meanwhile
    await enqueue(conn, topics.EMAIL_SENT, email_sent_event(row))


async def record_failed(
    conn: asyncpg.Connection,
    key: str,
    failure: FailureKind,
    reason: str,
    smtp_code: int | None = None,
    *,
    rejection: RejectionClass | None = None,
    attempts: int | None = None,
    owner: str | None = None,
) -> None:
    """End a delivery as failed (or suppressed) with its EmailFailed; a hard rejection
    also puts the address on the suppression list. A delivery cancelled meanwhile
    keeps its cancellation (and its EmailFailed CANCELLED); with ``owner``, only a
    delivery that sender still holds is ended."""
    status = "suppressed" if failure is FailureKind.SUPPRESSED else "failed"
    row = await repo.finish(
        conn,
        key,
        status,
        reason=reason[:1000],
        smtp_code=smtp_code,
        enhanced_status=rejection.enhanced_status if rejection else None,
        bounce_type=rejection.bounce_type.value if rejection else None,
        attempts=attempts,
        owner=owner,
    )
    if row is None:
        return
    if rejection is not None and rejection.suppresses:
        code = " ".join(str(c) for c in (smtp_code, rejection.enhanced_status) if c)
        await repo.add_suppression(
            conn, row["tenant_id"], row["to_email"], f"hard rejection: {code}".strip(), "sender"
        )
    await enqueue(
        conn, topics.EMAIL_SENT, email_failed_event(row, failure, reason, smtp_code, rejection)
    )


async def record_uncertain(
    conn: asyncpg.Connection, key: str, reason: str, now: datetime, *, owner: str
) -> None:
    """The message went out but its answer never came: flagged uncertain (never sent
    again), and nurture told it was most probably sent."""
    row = await repo.flag_uncertain(conn, key, reason, now, owner)
    if row is not None:
        await enqueue_many(conn, [(topics.EMAIL_SENT, email_sent_event(row, uncertain=True))])


async def recover_expired(conn: asyncpg.Connection, now: datetime) -> tuple[int, int]:
    """Release stale claims; flag stale hand-offs uncertain (and tell nurture)."""
    released = await repo.release_expired_claims(conn)
    uncertain = await repo.flag_expired_sending(conn, now)
    await enqueue_many(
        conn, [(topics.EMAIL_SENT, email_sent_event(r, uncertain=True)) for r in uncertain]
    )
    return released, len(uncertain)
