"""Sender SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from schemas.events import StepDue

DELIVERY_COLUMNS = (
    "delivery_key, tenant_id, lead_id, enrollment_id, sequence_id, sequence_key,"
    " sequence_version, step_id, step_index, variant, thread_delivery_key, to_email, to_name,"
    " subject, body_text, body_html, tracking, from_email, from_name, message_id, links, status,"
    " status_reason, attempts, next_attempt_at, lease_until, claimed_by, smtp_code,"
    " smtp_response, due_at, created_at, updated_at, sent_at"
)


async def insert_deliveries(conn: asyncpg.Connection, events: Sequence[StepDue]) -> int:
    """One delivery per delivery key; a key seen before is left as it is."""
    if not events:
        return 0
    rows = [
        (
            e.delivery_key,
            e.tenant_id,
            e.lead_id,
            e.enrollment_id,
            e.sequence_id,
            e.sequence_key,
            e.sequence_version,
            e.step_id,
            e.step_index,
            e.variant,
            e.thread_delivery_key,
            e.message.to_email,
            e.message.to_name,
            e.message.subject,
            e.message.text,
            e.message.html,
            e.tracking,
            e.due_at,
        )
        for e in events
    ]
    columns = [list(c) for c in zip(*rows, strict=True)]
    inserted = await conn.fetchval(
        "WITH ins AS (INSERT INTO deliveries (delivery_key, tenant_id, lead_id, enrollment_id,"
        " sequence_id, sequence_key, sequence_version, step_id, step_index, variant,"
        " thread_delivery_key, to_email, to_name, subject, body_text, body_html, tracking,"
        " due_at, next_attempt_at)"
        " SELECT *, u.due FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[],"
        " $5::uuid[], $6::text[], $7::int[], $8::uuid[], $9::int[], $10::text[], $11::text[],"
        " $12::text[], $13::text[], $14::text[], $15::text[], $16::text[], $17::bool[],"
        " $18::timestamptz[]) AS u(k, t, l, e, s, sk, sv, st, si, v, th, te, tn, su, bt, bh,"
        " tr, due)"
        " ON CONFLICT (delivery_key) DO NOTHING RETURNING 1) SELECT count(*) FROM ins",
        *columns,
    )
    return int(inserted)


async def claim_ready(
    conn: asyncpg.Connection, now: datetime, limit: int, lease_seconds: float, owner: str
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "UPDATE deliveries SET status = 'claimed', claimed_by = $4,"
        " lease_until = clock_timestamp() + make_interval(secs => $3),"
        " updated_at = clock_timestamp()"
        " WHERE delivery_key IN (SELECT delivery_key FROM deliveries"
        "   WHERE status IN ('queued', 'deferred') AND next_attempt_at <= $1"
        "   ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED)"
        f" RETURNING {DELIVERY_COLUMNS}",
        now,
        limit,
        lease_seconds,
        owner,
    )


async def suppressed_addresses(
    conn: asyncpg.Connection, pairs: Sequence[tuple[str, str]]
) -> set[tuple[str, str]]:
    if not pairs:
        return set()
    rows = await conn.fetch(
        "SELECT s.tenant_id, s.email FROM suppressions s"
        " JOIN unnest($1::text[], $2::text[]) AS u(t, e) ON s.tenant_id = u.t AND s.email = u.e",
        [p[0] for p in pairs],
        [p[1] for p in pairs],
    )
    return {(r["tenant_id"], r["email"]) for r in rows}


async def mark_sending(
    pool: asyncpg.Pool,
    key: str,
    owner: str,
    lease_seconds: float,
    message_id: str,
    from_email: str,
    from_name: str | None,
) -> bool:
    """Point of no return: from here a crash leaves the delivery uncertain."""
    status = await pool.fetchval(
        "UPDATE deliveries SET status = 'sending', message_id = $4, from_email = $5,"
        " from_name = $6, attempts = attempts + 1,"
        " lease_until = clock_timestamp() + make_interval(secs => $3),"
        " updated_at = clock_timestamp()"
        " WHERE delivery_key = $1 AND claimed_by = $2 AND status = 'claimed' RETURNING status",
        key,
        owner,
        lease_seconds,
        message_id,
        from_email,
        from_name,
    )
    return status is not None


async def finish(
    conn: asyncpg.Connection,
    key: str,
    status: str,
    *,
    reason: str | None = None,
    smtp_code: int | None = None,
    smtp_response: str | None = None,
    sent_at: datetime | None = None,
    links: list[str] | None = None,
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "UPDATE deliveries SET status = $2, status_reason = $3, smtp_code = $4,"
        " smtp_response = $5, sent_at = coalesce($6, sent_at),"
        " links = coalesce($7::jsonb, links), lease_until = NULL,"
        " updated_at = clock_timestamp() WHERE delivery_key = $1"
        f" RETURNING {DELIVERY_COLUMNS}",
        key,
        status,
        reason,
        smtp_code,
        smtp_response,
        sent_at,
        links,
    )


async def defer(
    conn: asyncpg.Connection, key: str, until: datetime, reason: str, smtp_code: int | None
) -> None:
    await conn.execute(
        "UPDATE deliveries SET status = 'deferred', next_attempt_at = $2, status_reason = $3,"
        " smtp_code = $4, claimed_by = NULL, lease_until = NULL,"
        " updated_at = clock_timestamp() WHERE delivery_key = $1",
        key,
        until,
        reason,
        smtp_code,
    )


async def release_expired_claims(conn: asyncpg.Connection) -> int:
    """Claimed but never handed to SMTP: safe to hand to another sender."""
    result = await conn.execute(
        "UPDATE deliveries SET status = 'queued', claimed_by = NULL, lease_until = NULL,"
        " updated_at = clock_timestamp()"
        " WHERE status = 'claimed' AND lease_until < clock_timestamp()"
    )
    return int(result.split()[-1])


async def flag_expired_sending(conn: asyncpg.Connection, now: datetime) -> list[asyncpg.Record]:
    """Handed to SMTP by a sender that died before recording the outcome: flagged
    uncertain, never re-sent."""
    return await conn.fetch(
        "UPDATE deliveries SET status = 'uncertain', lease_until = NULL,"
        " status_reason = 'sender died between the hand-off and recording its outcome',"
        " sent_at = coalesce(sent_at, $1), updated_at = clock_timestamp()"
        " WHERE status = 'sending' AND lease_until < clock_timestamp()"
        f" RETURNING {DELIVERY_COLUMNS}",
        now,
    )


async def add_suppression(
    conn: asyncpg.Connection,
    tenant_id: str,
    email: str,
    reason: str,
    source: str,
    event_id: Any = None,
) -> None:
    await conn.execute(
        "INSERT INTO suppressions (tenant_id, email, reason, source, event_id)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, email) DO NOTHING",
        tenant_id,
        email.lower(),
        reason,
        source,
        event_id,
    )


async def cancel_pending_for_lead(
    conn: asyncpg.Connection, tenant_id: str, lead_id: Any, reason: str
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "UPDATE deliveries SET status = 'cancelled', status_reason = $3,"
        " updated_at = clock_timestamp()"
        " WHERE tenant_id = $1 AND lead_id = $2 AND status IN ('queued', 'deferred')"
        f" RETURNING {DELIVERY_COLUMNS}",
        tenant_id,
        lead_id,
        reason,
    )


async def list_deliveries(
    pool: asyncpg.Pool, tenant_id: str, status: str | None, lead_id: Any, limit: int, offset: int
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE tenant_id = $1"
        " AND ($2::text IS NULL OR status = $2) AND ($3::uuid IS NULL OR lead_id = $3)"
        " ORDER BY created_at, delivery_key LIMIT $4 OFFSET $5",
        tenant_id,
        status,
        lead_id,
        limit,
        offset,
    )
    return [dict(r) for r in rows]


async def status_counts(pool: asyncpg.Pool) -> dict[str, int]:
    rows = await pool.fetch("SELECT status, count(*) AS n FROM deliveries GROUP BY status")
    return {r["status"]: r["n"] for r in rows}
