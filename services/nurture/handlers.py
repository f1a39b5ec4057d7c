"""Nurture handlers: decode -> one transaction -> domain -> repo -> outbox."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from schemas import topics
from schemas.events import (
    EmailFailed,
    EmailSent,
    EngagementReceived,
    FailureKind,
    LeadRouted,
    RenderedMessage,
    StepDue,
)
from services.nurture import domain, repo
from services.nurture.domain import Advance, EnrollmentState, LogEntry, Step
from services.nurture.presets import PRESETS
from services.nurture.templates import RenderError, render, template_context
from services.runtime.consumer import Rejection
from services.runtime.outbox import enqueue_many


class StepCache:
    """Steps per sequence version. A version never changes once enrollments run on
    it, so caching is safe."""

    def __init__(self) -> None:
        self._steps: dict[uuid.UUID, list[Step]] = {}

    async def get(self, conn: asyncpg.Connection, version_id: uuid.UUID) -> list[Step]:
        steps = self._steps.get(version_id)
        if steps is None:
            steps = await repo.steps_of_version(conn, version_id)
            self._steps[version_id] = steps
        return steps


def _state(row: asyncpg.Record) -> EnrollmentState:
    return EnrollmentState(
        id=row["id"],
        position=row["position"],
        cursor=row["cursor"],
        steps_done=row["steps_done"],
        thread_delivery_key=row["thread_delivery_key"],
    )


def render_step_due(
    row: asyncpg.Record | dict[str, Any], advance: Advance, now: datetime
) -> StepDue:
    """The StepDue for an emitted email: rendered here, once; raises RenderError."""
    assert advance.email is not None
    step = advance.email.step
    lead = row["lead"]
    context = template_context(lead, step.config.get("fallbacks"))
    subject = render(step.config.get("subject", ""), context).strip()
    if not subject:
        raise RenderError("the subject is empty")
    text = render(step.config.get("text", ""), context)
    html_source = step.config.get("html")
    html = render(html_source, context, html=True) if html_source else None
    name = " ".join(p for p in (lead.get("first_name"), lead.get("last_name")) if p) or None
    return StepDue(
        tenant_id=row["tenant_id"],
        lead_id=row["lead_id"],
        enrollment_id=row["id"],
        sequence_id=row["sequence_id"],
        sequence_key=row["sequence_key"],
        sequence_version=row["version"],
        step_id=step.id,
        step_index=step.position,
        delivery_key=advance.email.delivery_key,
        thread_delivery_key=advance.email.thread_delivery_key,
        due_at=now,
        message=RenderedMessage(
            to_email=lead["email"], to_name=name, subject=subject, text=text, html=html
        ),
        tracking=bool(step.config.get("tracking", True)),
    )


async def _apply(
    conn: asyncpg.Connection,
    items: Sequence[tuple[asyncpg.Record, Advance]],
    now: datetime,
) -> None:
    """Write each enrollment's new state, its log and its StepDue in this transaction."""
    outgoing: list[tuple[str, StepDue]] = []
    log: list[tuple[str, uuid.UUID, LogEntry]] = []
    for row, advance in items:
        if advance.email is not None:
            try:
                outgoing.append((topics.STEP_DUE, render_step_due(row, advance, now)))
            except RenderError as exc:
                advance.status = "stopped"
                advance.stop_reason = f"render failed: {exc}"
                advance.awaiting_delivery_key = None
                advance.log.append(
                    LogEntry(advance.email.step.position, "stopped", advance.stop_reason)
                )
                advance.email = None
        log += [(row["tenant_id"], row["id"], entry) for entry in advance.log]
    await repo.apply_advances(conn, [(row["id"], a) for row, a in items], now)
    await repo.write_log(conn, log, now)
    await enqueue_many(conn, outgoing)


async def handle_lead_routed(
    conn: asyncpg.Connection, events: list[LeadRouted], *, now: datetime
) -> list[Rejection]:
    rejections: list[Rejection] = []
    rows: list[tuple[Any, ...]] = []
    sequences: dict[tuple[str, str], asyncpg.Record | None] = {}
    for event in events:
        cache_key = (event.tenant_id, event.sequence)
        if cache_key not in sequences:
            sequence = await repo.active_sequence(conn, event.tenant_id, event.sequence)
            if sequence is None and event.sequence in PRESETS:
                await repo.ensure_preset(conn, event.tenant_id, PRESETS[event.sequence])
                sequence = await repo.active_sequence(conn, event.tenant_id, event.sequence)
            sequences[cache_key] = sequence
        sequence = sequences[cache_key]
        if sequence is None:
            rejections.append(Rejection(event, f"unknown sequence {event.sequence!r}"))
            continue
        if sequence["status"] != "active":
            rejections.append(
                Rejection(event, f"sequence {event.sequence!r} is {sequence['status']}")
            )
            continue
        rows.append(
            (
                uuid.uuid4(),
                event.tenant_id,
                event.lead_id,
                sequence["id"],
                sequence["version_id"],
                sequence["key"],
                sequence["version"],
                event.lead.model_dump(mode="json"),
                now,
                now,
            )
        )
    await repo.insert_enrollments(conn, rows)
    return rejections


async def handle_email_outcome(
    conn: asyncpg.Connection,
    events: list[EmailSent | EmailFailed],
    *,
    now: datetime,
    steps: StepCache,
) -> None:
    advanced: list[tuple[asyncpg.Record, Advance]] = []
    for event in events:
        row = await repo.enrollment_for_update(conn, event.enrollment_id)
        if (
            row is None
            or row["status"] != "awaiting_send"
            or row["awaiting_delivery_key"] != event.delivery_key
        ):
            continue  # stopped meanwhile, or an outcome we already applied
        if isinstance(event, EmailSent):
            version_steps = await steps.get(conn, row["sequence_version_id"])
            advance = domain.after_email_sent(_state(row), version_steps, event.sent_at)
            note = " (uncertain: the sender crashed around the hand-off)" if event.uncertain else ""
            advance.log.insert(
                0, LogEntry(event.step_index, "email_sent", f"sent {event.message_id}{note}")
            )
            advanced.append((row, advance))
        else:
            if event.failure is FailureKind.CANCELLED:
                continue
            reason = f"email failed: {event.failure.value}: {event.reason}"
            await repo.stop_enrollments(conn, [row["id"]], reason, now)
            await repo.write_log(
                conn,
                [(row["tenant_id"], row["id"], LogEntry(event.step_index, "stopped", reason))],
                now,
            )
    if advanced:
        await _apply(conn, advanced, now)


async def handle_engagement(
    conn: asyncpg.Connection, events: list[EngagementReceived], *, now: datetime
) -> None:
    await repo.record_engagements(
        conn,
        [
            (
                e.event_id,
                e.tenant_id,
                e.lead_id,
                e.enrollment_id,
                e.step_index,
                e.engagement_type.value,
                e.machine,
                e.occurred_at,
            )
            for e in events
        ],
    )
    for event in events:
        reason = domain.stop_reason_for(event)
        if reason is None:
            continue
        running = await repo.running_enrollments_for_update(conn, event.tenant_id, event.lead_id)
        if not running:
            continue
        await repo.stop_enrollments(conn, [r["id"] for r in running], reason, now)
        await repo.write_log(
            conn,
            [
                (
                    r["tenant_id"],
                    r["id"],
                    LogEntry(event.step_index, "stopped", f"stopped: {reason}"),
                )
                for r in running
            ],
            now,
        )


async def run_due(conn: asyncpg.Connection, *, now: datetime, limit: int, steps: StepCache) -> int:
    """One scheduler round: claim due enrollments, advance them, emit what is due."""
    rows = await repo.claim_due(conn, now, limit)
    if not rows:
        return 0
    items = [
        (row, domain.advance(_state(row), await steps.get(conn, row["sequence_version_id"]), now))
        for row in rows
    ]
    await _apply(conn, items, now)
    return len(rows)
