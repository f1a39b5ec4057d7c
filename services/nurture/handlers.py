"""Nurture handlers: decode -> one transaction -> domain -> repo -> outbox."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from schemas import topics
from schemas.events import (
    EmailFailed,
    EmailSent,
    EngagementReceived,
    EngagementType,
    EnrollmentStopped,
    FailureKind,
    LeadAction,
    LeadRouted,
    LeadUpdateRequested,
    RenderedMessage,
    StepDue,
)
from services.nurture import domain, repo
from services.nurture.domain import (
    Advance,
    EngagementFact,
    EnrollmentState,
    Facts,
    LogEntry,
    SentEmail,
    SequenceContext,
    Step,
)
from services.nurture.model import parse_settings
from services.nurture.presets import PRESETS
from services.nurture.sequences import ensure_preset
from services.nurture.templates import RenderError, render, template_context
from services.runtime.consumer import Rejection
from services.runtime.outbox import enqueue_many


class StepCache:
    """Steps per sequence version. A version never changes once enrollments run on
    it (it is frozen), so caching is safe."""

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
        lead_id=row["lead_id"],
        position=row["position"],
        cursor=row["cursor"],
        steps_done=row["steps_done"],
        thread_delivery_key=row["thread_delivery_key"],
        due_since=row["due_since"],
        lead_timezone=(row["lead"] or {}).get("timezone"),
        lead_country=(row["lead"] or {}).get("country"),
    )


@dataclass
class Context:
    """What a batch of enrollments needs beyond their own rows."""

    steps: dict[uuid.UUID, list[Step]]
    sequences: dict[uuid.UUID, SequenceContext]
    facts: dict[uuid.UUID, Facts]


async def load_context(
    conn: asyncpg.Connection, rows: Sequence[asyncpg.Record], cache: StepCache
) -> Context:
    steps = {v: await cache.get(conn, v) for v in {r["sequence_version_id"] for r in rows}}
    # Settings are versioned with the steps: each enrollment runs on its version's.
    settings = await repo.sequence_settings(conn, list(steps))
    contexts: dict[uuid.UUID, SequenceContext] = {}
    sequences: dict[uuid.UUID, SequenceContext] = {}
    for row in rows:
        key = row["sequence_version_id"]
        if key not in contexts:
            parsed = parse_settings(settings.get(key) or {})
            contexts[key] = SequenceContext(
                row["sequence_key"], row["version"], parsed.window(), parsed.tracking
            )
        sequences[row["id"]] = contexts[key]
    sent, engaged = await repo.facts_for(conn, [r["id"] for r in rows])
    key_of = {s.id: s.key for version in steps.values() for s in version}
    sent_by: dict[uuid.UUID, list[SentEmail]] = defaultdict(list)
    for s in sent:
        sent_by[s["enrollment_id"]].append(SentEmail(key_of.get(s["step_id"], ""), s["sent_at"]))
    engaged_by: dict[uuid.UUID, list[EngagementFact]] = defaultdict(list)
    for e in engaged:
        engaged_by[e["enrollment_id"]].append(
            EngagementFact(
                e["type"],
                key_of.get(e["step_id"]) if e["step_id"] else None,
                e["occurred_at"],
                e["machine"],
            )
        )
    facts = {
        row["id"]: Facts(tuple(sent_by.get(row["id"], ())), tuple(engaged_by.get(row["id"], ())))
        for row in rows
    }
    return Context(steps, sequences, facts)


def render_step_due(
    row: asyncpg.Record | dict[str, Any], advance: Advance, now: datetime
) -> StepDue:
    """The StepDue for an emitted email: rendered here, once; raises RenderError."""
    due = advance.email
    assert due is not None
    lead = row["lead"]
    context = template_context(lead, due.step.config.get("fallbacks"))
    subject = " ".join(render(due.subject, context).split())
    if due.reply_to_thread and row["thread_subject"]:
        subject = "Re: " + str(row["thread_subject"]).removeprefix("Re: ")
    if not subject:
        raise RenderError("the subject is empty")
    text = render(due.text, context) if due.text else ""
    html = render(due.html, context, html=True) if due.html else None
    name = " ".join(p for p in (lead.get("first_name"), lead.get("last_name")) if p) or None
    return StepDue(
        tenant_id=row["tenant_id"],
        lead_id=row["lead_id"],
        enrollment_id=row["id"],
        sequence_id=row["sequence_id"],
        sequence_key=row["sequence_key"],
        sequence_version=row["version"],
        step_id=due.step.id,
        step_index=due.step.position,
        variant=due.variant,
        delivery_key=due.delivery_key,
        thread_delivery_key=due.thread_delivery_key,
        due_at=now,
        message=RenderedMessage(
            to_email=lead["email"], to_name=name, subject=subject, text=text, html=html
        ),
        tracking=due.tracking,
    )


_LEAD_ACTIONS = {
    "update_status": LeadAction.UPDATE_STATUS,
    "mark_qualified": LeadAction.MARK_QUALIFIED,
    "tag_lead": LeadAction.TAG,
    "assign_to_user": LeadAction.ASSIGN,
}


async def apply_advances(
    conn: asyncpg.Connection,
    items: Sequence[tuple[asyncpg.Record, Advance]],
    now: datetime,
    *,
    cache: StepCache,
) -> None:
    """Write each enrollment's new state, its log and what it emits, in this transaction."""
    outgoing: list[tuple[str, Any]] = []
    log: list[tuple[str, uuid.UUID, LogEntry]] = []
    updates: list[tuple[uuid.UUID, Advance, str | None]] = []
    moves: list[tuple[asyncpg.Record, str]] = []
    for row, advance in items:
        thread_subject: str | None = None
        if advance.email is not None:
            try:
                step_due = render_step_due(row, advance, now)
                outgoing.append((topics.STEP_DUE, step_due))
                if advance.email.delivery_key == advance.thread_delivery_key:
                    thread_subject = step_due.message.subject
            except RenderError as exc:
                advance.status = "stopped"
                advance.stop_reason = f"render failed: {exc}"
                advance.awaiting_delivery_key = None
                advance.log.append(
                    LogEntry(advance.email.step.position, "stopped", advance.stop_reason)
                )
                advance.email = None
        requested_by = f"sequence:{row['sequence_key']} v{row['version']}"
        for update in advance.lead_updates:
            outgoing.append(
                (
                    topics.LEAD_UPDATES,
                    LeadUpdateRequested(
                        tenant_id=row["tenant_id"],
                        lead_id=row["lead_id"],
                        action=_LEAD_ACTIONS[update.action],
                        status=update.status,
                        tags=list(update.tags),
                        assignee=update.user,
                        reason=update.reason,
                        requested_by=requested_by,
                        enrollment_id=row["id"],
                    ),
                )
            )
        for notification in advance.notifications:
            await repo.insert_notification(
                conn,
                row["tenant_id"],
                row["id"],
                notification.url,
                {
                    "event": "sequence.notify",
                    "tenant_id": row["tenant_id"],
                    "lead_id": str(row["lead_id"]),
                    "lead": row["lead"],
                    "enrollment_id": str(row["id"]),
                    "sequence": row["sequence_key"],
                    "version": row["version"],
                    "occurred_at": now.isoformat(),
                    **notification.payload,
                },
            )
        if advance.move_to is not None:
            moves.append((row, advance.move_to))
        log += [(row["tenant_id"], row["id"], entry) for entry in advance.log]
        updates.append((row["id"], advance, thread_subject))
    await repo.apply_advances(conn, updates, now)
    await repo.write_log(conn, log, now)
    await enqueue_many(conn, outgoing)
    for row, target in moves:
        await _move(conn, row, target, now)


async def _move(conn: asyncpg.Connection, row: asyncpg.Record, target: str, now: datetime) -> None:
    sequence = await repo.active_sequence(conn, row["tenant_id"], target)
    if sequence is None or sequence["status"] != "active":
        await repo.write_log(
            conn,
            [
                (
                    row["tenant_id"],
                    row["id"],
                    LogEntry(None, "move_failed", f"sequence {target!r} is not active"),
                )
            ],
            now,
        )
        return
    await enroll(
        conn,
        tenant_id=row["tenant_id"],
        sequence=sequence,
        leads=[(row["lead_id"], row["lead"])],
        now=now,
    )


async def enroll(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    sequence: Mapping[str, Any],
    leads: Sequence[tuple[uuid.UUID, dict[str, Any]]],
    now: datetime,
) -> set[uuid.UUID]:
    """Enroll leads in an active sequence; returns the leads that were enrolled (the
    others are running in it already, or suppressed)."""
    suppressed = await repo.suppressed_leads(conn, tenant_id, [lead_id for lead_id, _ in leads])
    return await _insert_enrollments(
        conn,
        tenant_id,
        sequence,
        [
            (lead_id, snapshot["email"], json.dumps(snapshot))
            for lead_id, snapshot in leads
            if lead_id not in suppressed
        ],
        now,
    )


async def _insert_enrollments(
    conn: asyncpg.Connection,
    tenant_id: str,
    sequence: Mapping[str, Any],
    leads: Sequence[tuple[uuid.UUID, str, str]],
    now: datetime,
) -> set[uuid.UUID]:
    """Leads as (lead id, email, snapshot as JSON text); returns the leads enrolled."""
    columns = (
        [uuid.uuid4() for _ in leads],
        [lead_id for lead_id, _, _ in leads],
        [snapshot for _, _, snapshot in leads],
        [domain.company_domain(email) for _, email, _ in leads],
    )
    return set(await repo.insert_enrollments(conn, tenant_id, sequence, *columns, now))


async def handle_lead_routed(
    conn: asyncpg.Connection, events: list[LeadRouted], *, now: datetime
) -> list[Rejection]:
    # The snapshot is serialised once (pydantic's JSON) for both tables; the last
    # event of a lead in the batch wins, as one statement may touch a row only once.
    snapshots = {e.event_id: e.lead.model_dump_json() for e in events}
    latest = {(e.tenant_id, e.lead_id): e for e in events}
    suppressed = await repo.upsert_leads(
        conn,
        [e.tenant_id for e in latest.values()],
        [e.lead_id for e in latest.values()],
        [e.lead.email for e in latest.values()],
        [snapshots[e.event_id] for e in latest.values()],
        now,
    )
    rejections: list[Rejection] = []
    sequences: dict[tuple[str, str], asyncpg.Record | None] = {}
    batches: dict[tuple[str, str], list[tuple[uuid.UUID, str, str]]] = {}
    for event in events:
        cache_key = (event.tenant_id, event.sequence)
        if cache_key not in sequences:
            sequence = await repo.active_sequence(conn, event.tenant_id, event.sequence)
            if sequence is None and event.sequence in PRESETS:
                # Created for this tenant on first use, and announced to the router.
                await ensure_preset(conn, event.tenant_id, PRESETS[event.sequence])
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
        if (event.tenant_id, event.lead_id) in suppressed:
            continue
        batches.setdefault(cache_key, []).append(
            (event.lead_id, event.lead.email, snapshots[event.event_id])
        )
    for (tenant_id, key), leads in batches.items():
        sequence = sequences[(tenant_id, key)]
        assert sequence is not None
        await _insert_enrollments(conn, tenant_id, sequence, leads, now)
    return rejections


async def handle_email_outcome(
    conn: asyncpg.Connection,
    events: list[EmailSent | EmailFailed],
    *,
    now: datetime,
    steps: StepCache,
) -> None:
    """Advance the enrollments whose awaited email went out (or stop them when it
    failed for good): a handful of statements for the whole batch."""
    await repo.record_sent_emails(conn, [e for e in events if isinstance(e, EmailSent)])
    rows = await repo.enrollments_for_update(conn, [e.enrollment_id for e in events])
    matched: list[tuple[asyncpg.Record, EmailSent | EmailFailed]] = []
    for event in events:
        row = rows.get(event.enrollment_id)
        if (
            row is None
            or row["status"] not in ("awaiting_send", "paused")
            or row["awaiting_delivery_key"] != event.delivery_key
        ):
            continue  # stopped meanwhile, or an outcome we already applied
        rows.pop(event.enrollment_id)  # one outcome per awaited email
        matched.append((row, event))
    sent_rows = [row for row, event in matched if isinstance(event, EmailSent)]
    context = await load_context(conn, sent_rows, steps) if sent_rows else None
    advanced: list[tuple[asyncpg.Record, Advance]] = []
    for row, event in matched:
        if isinstance(event, EmailSent):
            assert context is not None
            if row["status"] == "paused":
                # Paused while the email was on its way: record it, go no further.
                advance = domain.sent_while_paused(
                    _state(row), context.steps[row["sequence_version_id"]], event.sent_at
                )
            else:
                advance = domain.after_email_sent(
                    _state(row),
                    context.steps[row["sequence_version_id"]],
                    event.sent_at,
                    context.facts[row["id"]],
                    context.sequences[row["id"]],
                )
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
        await apply_advances(conn, advanced, now, cache=steps)


def stop_notices(
    rows: Sequence[Mapping[str, Any]], reason: str
) -> list[tuple[str, EnrollmentStopped]]:
    """Tell the sender about enrollments stopped from outside their sequence (a user, an
    engagement, a colleague's reply): on ``step-due``, keyed by the lead, so each
    follows the StepDue of any email still waiting there, which the sender then
    cancels unless it has handed it off already."""
    return [
        (
            topics.STEP_DUE,
            EnrollmentStopped(
                tenant_id=row["tenant_id"],
                lead_id=row["lead_id"],
                enrollment_id=row["id"],
                reason=reason,
            ),
        )
        for row in rows
    ]


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
                e.step_id,
                e.engagement_type.value,
                e.machine,
                e.occurred_at,
            )
            for e in events
        ],
    )
    for event in events:
        if event.engagement_type is EngagementType.AUTO_REPLIED:
            await _pause_for_auto_reply(conn, event, now)
            continue
        reason = domain.stop_reason_for(event)
        if reason is None:
            await repo.wake_waiting(conn, event.tenant_id, event.lead_id, now)
            continue
        if event.suppresses_address:
            await repo.suppress_lead(conn, event.tenant_id, event.lead_id, reason)
        running = await repo.running_enrollments_for_update(conn, event.tenant_id, event.lead_id)
        stopped = {r["id"] for r in running}
        log = [
            (r["tenant_id"], r["id"], LogEntry(event.step_index, "stopped", f"stopped: {reason}"))
            for r in running
        ]
        if running:
            await repo.stop_enrollments(conn, list(stopped), reason, now)
        notices = stop_notices(running, reason)
        if event.engagement_type is EngagementType.REPLIED:
            for row in await _company_stops(conn, event, stopped):
                await repo.stop_enrollments(conn, [row["id"]], "company replied", now)
                notices += stop_notices([row], "company replied")
                log.append(
                    (
                        row["tenant_id"],
                        row["id"],
                        LogEntry(
                            None, "stopped", f"stopped: someone at {row['company_domain']} replied"
                        ),
                    )
                )
        await repo.write_log(conn, log, now)
        await enqueue_many(conn, notices)


async def _pause_for_auto_reply(
    conn: asyncpg.Connection, event: EngagementReceived, now: datetime
) -> None:
    """An out-of-office pauses the lead's enrollments until the stated return date
    (or a default pause), instead of stopping them; other auto-replies change nothing."""
    if event.detail.get("kind") != "out_of_office":
        return
    until = domain.resume_after_out_of_office(event.detail.get("return_date"), now)
    running = await repo.running_enrollments_for_update(conn, event.tenant_id, event.lead_id)
    log = []
    for row in running:
        if row["status"] == "paused":
            continue
        await repo.pause_enrollment(conn, row["id"], until, now)
        log.append(
            (
                row["tenant_id"],
                row["id"],
                LogEntry(
                    event.step_index, "paused", f"out of office: paused until {until.isoformat()}"
                ),
            )
        )
    await repo.write_log(conn, log, now)


async def _company_stops(
    conn: asyncpg.Connection, event: EngagementReceived, already: set[uuid.UUID]
) -> list[asyncpg.Record]:
    """Enrollments to stop because a colleague replied, where the sequence asks for it."""
    company = domain.company_domain(event.email)
    if company is None or event.sequence_id is None:
        return []
    settings = await repo.settings_of_version(conn, event.sequence_id, event.sequence_version)
    if not parse_settings(settings).company_stop:
        return []
    rows = await repo.running_at_company_for_update(conn, event.tenant_id, company)
    return [r for r in rows if r["id"] not in already and r["lead_id"] != event.lead_id]


async def run_due(conn: asyncpg.Connection, *, now: datetime, limit: int, steps: StepCache) -> int:
    """One scheduler round: resume what a pause released, claim due enrollments,
    advance them, emit what is due."""
    await repo.resume_due(conn, now)
    rows = await repo.claim_due(conn, now, limit)
    if not rows:
        return 0
    context = await load_context(conn, rows, steps)
    items = [
        (
            row,
            domain.advance(
                _state(row),
                context.steps[row["sequence_version_id"]],
                now,
                context.facts[row["id"]],
                context.sequences[row["id"]],
            ),
        )
        for row in rows
    ]
    await apply_advances(conn, items, now, cache=steps)
    return len(rows)
