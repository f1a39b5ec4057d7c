"""Router handlers: decode -> one transaction -> domain -> repo -> outbox."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from schemas import topics
from schemas.events import EngagementReceived, LeadData, LeadReceived, LeadRouted, LeadSnapshot
from services.router import domain, repo
from services.runtime.consumer import Rejection
from services.runtime.outbox import enqueue


@dataclass(frozen=True, slots=True)
class IntakeResult:
    lead_id: uuid.UUID
    created: bool
    routed: bool
    sequence: str | None
    reason: str


async def intake_lead(
    conn: asyncpg.Connection,
    *,
    tenant_id: str,
    lead_data: LeadData,
    requested_sequence: str | None,
    default_sequence: str,
    now: datetime,
) -> IntakeResult:
    """Validate, store (deduped by external id and email) and route one lead.

    Raises ``domain.LeadInvalid``; the caller's transaction then writes nothing.
    """
    lead = domain.normalise_lead(lead_data)
    existing = await repo.find_lead_for_update(conn, tenant_id, lead.email, lead.external_id)
    if existing is None:
        lead_id = uuid.uuid4()
        await repo.insert_lead(conn, lead_id, tenant_id, lead, now)
        status, created = "new", True
    else:
        lead_id = existing["id"]
        owner = await repo.email_owner(conn, tenant_id, lead.email)
        if owner is not None and owner != lead_id:
            raise domain.LeadInvalid(
                f"email {lead.email} belongs to another lead than external id {lead.external_id}"
            )
        await repo.merge_lead(conn, lead_id, lead, now)
        status, created = existing["status"], False
    rules = await repo.routing_rules(conn, tenant_id)
    decision = domain.choose_sequence(lead, status, requested_sequence, rules, default_sequence)
    await repo.set_routing(conn, lead_id, decision.sequence, decision.reason, now)
    if decision.route and decision.sequence is not None:
        stored = await repo.get_lead(conn, tenant_id, lead_id)
        assert stored is not None
        await enqueue(
            conn,
            topics.LEAD_ROUTED,
            LeadRouted(
                tenant_id=tenant_id,
                lead_id=lead_id,
                lead=LeadSnapshot.model_validate(stored),
                sequence=decision.sequence,
                routing_reason=decision.reason,
            ),
        )
    return IntakeResult(lead_id, created, decision.route, decision.sequence, decision.reason)


async def handle_lead_received(
    conn: asyncpg.Connection, events: list[LeadReceived], *, default_sequence: str, now: datetime
) -> list[Rejection]:
    rejections: list[Rejection] = []
    for event in events:
        try:
            async with conn.transaction():  # a savepoint: a rejected lead leaves nothing
                await intake_lead(
                    conn,
                    tenant_id=event.tenant_id,
                    lead_data=event.lead,
                    requested_sequence=event.sequence,
                    default_sequence=default_sequence,
                    now=now,
                )
        except domain.LeadInvalid as exc:
            rejections.append(Rejection(event, str(exc)))
    return rejections


async def handle_engagement_received(
    conn: asyncpg.Connection, events: list[EngagementReceived], *, now: datetime
) -> None:
    for event in events:
        current = await repo.lead_status_for_update(conn, event.tenant_id, event.lead_id)
        if current is None:
            continue  # not a lead of ours (erased, or another deployment's)
        change = domain.status_after_engagement(current, event)
        if change is not None:
            await repo.change_status(
                conn,
                event.tenant_id,
                event.lead_id,
                current,
                change.to_status,
                change.reason,
                f"engagement:{event.source}",
                event.event_id,
                now,
            )
