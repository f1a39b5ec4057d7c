"""Router SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.router.domain import (
    CatalogEntry,
    LeadState,
    NormalisedLead,
    RoutingRule,
    RuleSpec,
)

LEAD_COLUMNS = (
    "id, tenant_id, email, external_id, first_name, last_name, company, title, timezone,"
    " country, grade, score, source, tags, custom_fields, status, sequence, routing_reason,"
    " routing_rule_id, assigned_to, created_at, updated_at"
)
RULE_COLUMNS = "id, position, name, match, sequence, enabled, created_at"


async def find_lead_for_update(
    conn: asyncpg.Connection, tenant_id: str, email: str, external_id: str | None
) -> asyncpg.Record | None:
    """The lead this input is about: by external id first, then by email."""
    if external_id is not None:
        row = await conn.fetchrow(
            f"SELECT {LEAD_COLUMNS} FROM leads WHERE tenant_id = $1 AND external_id = $2"
            " FOR UPDATE",
            tenant_id,
            external_id,
        )
        if row is not None:
            return row
    return await conn.fetchrow(
        f"SELECT {LEAD_COLUMNS} FROM leads WHERE tenant_id = $1 AND email = $2 FOR UPDATE",
        tenant_id,
        email,
    )


async def email_owner(conn: asyncpg.Connection, tenant_id: str, email: str) -> uuid.UUID | None:
    value = await conn.fetchval(
        "SELECT id FROM leads WHERE tenant_id = $1 AND email = $2", tenant_id, email
    )
    return value if value is None else uuid.UUID(str(value))


async def insert_lead(
    conn: asyncpg.Connection,
    lead_id: uuid.UUID,
    tenant_id: str,
    lead: NormalisedLead,
    now: datetime,
) -> None:
    await conn.execute(
        "INSERT INTO leads (id, tenant_id, email, external_id, first_name, last_name, company,"
        " title, timezone, country, grade, score, source, tags, custom_fields, status,"
        " created_at, updated_at)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,'new',$16,$16)",
        lead_id,
        tenant_id,
        lead.email,
        lead.external_id,
        lead.first_name,
        lead.last_name,
        lead.company,
        lead.title,
        lead.timezone,
        lead.country,
        lead.grade,
        lead.score,
        lead.source,
        lead.tags,
        lead.custom_fields,
        now,
    )
    await conn.execute(
        "INSERT INTO lead_status_history (tenant_id, lead_id, from_status, to_status, reason,"
        " changed_by, changed_at) VALUES ($1, $2, NULL, 'new', 'lead received', 'router', $3)",
        tenant_id,
        lead_id,
        now,
    )


async def merge_lead(
    conn: asyncpg.Connection, lead_id: uuid.UUID, lead: NormalisedLead, now: datetime
) -> None:
    """Newer non-empty values win; tags and custom fields accumulate."""
    await conn.execute(
        "UPDATE leads SET email = $2, external_id = coalesce($3, external_id),"
        " first_name = coalesce($4, first_name), last_name = coalesce($5, last_name),"
        " company = coalesce($6, company), title = coalesce($7, title),"
        " timezone = coalesce($8, timezone), country = coalesce($9, country),"
        " grade = coalesce($10, grade), score = coalesce($11, score),"
        " source = coalesce($12, source),"
        " tags = ARRAY(SELECT DISTINCT unnest(tags || $13::text[]) ORDER BY 1),"
        " custom_fields = custom_fields || $14::jsonb, updated_at = $15 WHERE id = $1",
        lead_id,
        lead.email,
        lead.external_id,
        lead.first_name,
        lead.last_name,
        lead.company,
        lead.title,
        lead.timezone,
        lead.country,
        lead.grade,
        lead.score,
        lead.source,
        lead.tags,
        lead.custom_fields,
        now,
    )


async def set_routing(
    conn: asyncpg.Connection,
    lead_id: uuid.UUID,
    sequence: str | None,
    reason: str,
    now: datetime,
    rule_id: uuid.UUID | None = None,
) -> None:
    """Record the routing decision; ``rule_id`` is the rule that fired, if one did."""
    await conn.execute(
        "UPDATE leads SET sequence = coalesce($2, sequence), routing_reason = $3,"
        " routing_rule_id = $5, updated_at = $4 WHERE id = $1",
        lead_id,
        sequence,
        reason,
        now,
        rule_id,
    )


async def routing_rules(conn: asyncpg.Connection, tenant_id: str) -> list[RoutingRule]:
    """The enabled rules of a tenant, first match first."""
    rows = await conn.fetch(
        "SELECT id, name, sequence, match FROM routing_rules WHERE tenant_id = $1 AND enabled"
        " ORDER BY position",
        tenant_id,
    )
    return [RoutingRule(r["name"], r["sequence"], r["match"], r["id"]) for r in rows]


# ------------------------------------------------------------------- routing rules


async def lock_routing_rules(conn: asyncpg.Connection, tenant_id: str) -> None:
    """Serialise changes to one tenant's rules until the transaction ends."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('touchstream-routing-rules:' || $1, 0))",
        tenant_id,
    )


async def list_routing_rules(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str
) -> list[dict[str, Any]]:
    """Every rule of a tenant, enabled or not, in order."""
    rows = await conn.fetch(
        f"SELECT {RULE_COLUMNS} FROM routing_rules WHERE tenant_id = $1 ORDER BY position",
        tenant_id,
    )
    return [dict(r) for r in rows]


async def rules_configured(conn: asyncpg.Connection, tenant_id: str) -> bool:
    value = await conn.fetchval(
        "SELECT EXISTS (SELECT 1 FROM routing_rule_tenants WHERE tenant_id = $1)"
        " OR EXISTS (SELECT 1 FROM routing_rules WHERE tenant_id = $1)",
        tenant_id,
    )
    return bool(value)


async def mark_rules_configured(conn: asyncpg.Connection, tenant_id: str, now: datetime) -> None:
    await conn.execute(
        "INSERT INTO routing_rule_tenants (tenant_id, configured_at) VALUES ($1, $2)"
        " ON CONFLICT (tenant_id) DO NOTHING",
        tenant_id,
        now,
    )


async def delete_all_routing_rules(
    conn: asyncpg.Connection, tenant_id: str
) -> dict[uuid.UUID, datetime]:
    """Delete a tenant's rules; their ids and creation times."""
    rows = await conn.fetch(
        "DELETE FROM routing_rules WHERE tenant_id = $1 RETURNING id, created_at", tenant_id
    )
    return {r["id"]: r["created_at"] for r in rows}


async def insert_routing_rule(
    conn: asyncpg.Connection,
    rule_id: uuid.UUID,
    tenant_id: str,
    position: int,
    rule: RuleSpec,
    created_at: datetime,
) -> dict[str, Any]:
    row = await conn.fetchrow(
        "INSERT INTO routing_rules (id, tenant_id, position, name, match, sequence, enabled,"
        f" created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) RETURNING {RULE_COLUMNS}",
        rule_id,
        tenant_id,
        position,
        rule.name,
        rule.match,
        rule.sequence,
        rule.enabled,
        created_at,
    )
    assert row is not None
    return dict(row)


async def next_rule_position(conn: asyncpg.Connection, tenant_id: str) -> int:
    value = await conn.fetchval(
        "SELECT coalesce(max(position) + 1, 0) FROM routing_rules WHERE tenant_id = $1",
        tenant_id,
    )
    return int(value)


async def delete_routing_rule(conn: asyncpg.Connection, tenant_id: str, rule_id: uuid.UUID) -> bool:
    deleted = await conn.fetchval(
        "DELETE FROM routing_rules WHERE tenant_id = $1 AND id = $2 RETURNING id",
        tenant_id,
        rule_id,
    )
    return deleted is not None


# ---------------------------------------------------------------------- lead updates


async def lead_state_for_update(
    conn: asyncpg.Connection, tenant_id: str, lead_id: uuid.UUID
) -> LeadState | None:
    row = await conn.fetchrow(
        "SELECT status, tags, assigned_to FROM leads WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
        tenant_id,
        lead_id,
    )
    if row is None:
        return None
    return LeadState(row["status"], tuple(row["tags"]), row["assigned_to"])


async def set_lead_tags(
    conn: asyncpg.Connection, tenant_id: str, lead_id: uuid.UUID, tags: list[str], now: datetime
) -> None:
    await conn.execute(
        "UPDATE leads SET tags = $3, updated_at = $4 WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        lead_id,
        tags,
        now,
    )


async def assign_lead(
    conn: asyncpg.Connection, tenant_id: str, lead_id: uuid.UUID, assignee: str, now: datetime
) -> None:
    await conn.execute(
        "UPDATE leads SET assigned_to = $3, updated_at = $4 WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        lead_id,
        assignee,
        now,
    )


async def lead_status_for_update(
    conn: asyncpg.Connection, tenant_id: str, lead_id: uuid.UUID
) -> str | None:
    value = await conn.fetchval(
        "SELECT status FROM leads WHERE tenant_id = $1 AND id = $2 FOR UPDATE", tenant_id, lead_id
    )
    return None if value is None else str(value)


async def change_status(
    conn: asyncpg.Connection,
    tenant_id: str,
    lead_id: uuid.UUID,
    from_status: str,
    to_status: str,
    reason: str,
    changed_by: str,
    event_id: uuid.UUID | None,
    now: datetime,
) -> None:
    await conn.execute(
        "UPDATE leads SET status = $3, updated_at = $4 WHERE tenant_id = $1 AND id = $2",
        tenant_id,
        lead_id,
        to_status,
        now,
    )
    await conn.execute(
        "INSERT INTO lead_status_history (tenant_id, lead_id, from_status, to_status, reason,"
        " changed_by, event_id, changed_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
        tenant_id,
        lead_id,
        from_status,
        to_status,
        reason,
        changed_by,
        event_id,
        now,
    )


async def get_lead(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, lead_id: uuid.UUID
) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {LEAD_COLUMNS} FROM leads WHERE tenant_id = $1 AND id = $2", tenant_id, lead_id
    )
    return dict(row) if row is not None else None


async def find_leads(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: str,
    email: str | None,
    external_id: str | None,
    status: str | None,
    limit: int,
    offset: int,
) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {LEAD_COLUMNS} FROM leads WHERE tenant_id = $1"
        " AND ($2::text IS NULL OR email = $2) AND ($3::text IS NULL OR external_id = $3)"
        " AND ($4::text IS NULL OR status = $4) ORDER BY created_at, id LIMIT $5 OFFSET $6",
        tenant_id,
        email,
        external_id,
        status,
        limit,
        offset,
    )
    return [dict(r) for r in rows]


async def status_history(
    conn: asyncpg.Connection | asyncpg.Pool, lead_id: uuid.UUID, tenant_id: str | None = None
) -> list[dict[str, Any]]:
    """A lead's status changes, oldest first (only the tenant's, when one is given)."""
    rows = await conn.fetch(
        "SELECT from_status, to_status, reason, changed_by, event_id, changed_at"
        " FROM lead_status_history WHERE lead_id = $1"
        " AND ($2::text IS NULL OR tenant_id = $2) ORDER BY id",
        lead_id,
        tenant_id,
    )
    return [dict(r) for r in rows]


# ------------------------------------------------------------------ sequence catalog


async def catalog_entry(conn: asyncpg.Connection, tenant_id: str, key: str) -> CatalogEntry | None:
    row = await conn.fetchrow(
        "SELECT status, current_version FROM sequences WHERE tenant_id = $1 AND key = $2",
        tenant_id,
        key,
    )
    return None if row is None else CatalogEntry(row["status"], row["current_version"])


async def apply_sequence_changes(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Rows: (tenant_id, key, sequence_id, status, current_version, changed_at, now), in
    the order they happened. A change older than the one applied already is ignored."""
    if rows:
        await conn.executemany(
            "INSERT INTO sequences (tenant_id, key, sequence_id, status, current_version,"
            " changed_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7)"
            " ON CONFLICT (tenant_id, key) DO UPDATE SET sequence_id = excluded.sequence_id,"
            " status = excluded.status, current_version = excluded.current_version,"
            " changed_at = excluded.changed_at, updated_at = excluded.updated_at"
            " WHERE sequences.changed_at <= excluded.changed_at",
            rows,
        )


async def list_catalog(pool: asyncpg.Pool, tenant_id: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT key, sequence_id, status, current_version, changed_at, updated_at"
        " FROM sequences WHERE tenant_id = $1 ORDER BY key",
        tenant_id,
    )
    return [dict(r) for r in rows]


# ------------------------------------------------------------------------ HTTP intake


async def claim_event(conn: asyncpg.Connection, consumer: str, event_id: uuid.UUID) -> bool:
    """Record an event as applied (the consumer's inbox); False when it was already."""
    inserted = await conn.fetchval(
        "INSERT INTO inbox (consumer, event_id) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING true",
        consumer,
        event_id,
    )
    return bool(inserted)


async def find_lead(
    conn: asyncpg.Connection, tenant_id: str, email: str, external_id: str | None
) -> dict[str, Any] | None:
    """The lead this input is about (by external id first, then by email), unlocked."""
    row = None
    if external_id is not None:
        row = await conn.fetchrow(
            f"SELECT {LEAD_COLUMNS} FROM leads WHERE tenant_id = $1 AND external_id = $2",
            tenant_id,
            external_id,
        )
    if row is None:
        row = await conn.fetchrow(
            f"SELECT {LEAD_COLUMNS} FROM leads WHERE tenant_id = $1 AND email = $2",
            tenant_id,
            email,
        )
    return dict(row) if row is not None else None
