"""Tracker SQL."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from schemas.events import EmailSent

MESSAGE_COLUMNS = (
    "message_id, delivery_key, tenant_id, lead_id, enrollment_id, sequence_id, sequence_key,"
    " sequence_version, step_id, step_index, variant, to_email, from_email, subject, links,"
    " sent_at, uncertain"
)


async def register_messages(conn: asyncpg.Connection, events: Sequence[EmailSent]) -> None:
    await conn.executemany(
        "INSERT INTO messages (message_id, delivery_key, tenant_id, lead_id, enrollment_id,"
        " sequence_id, sequence_key, sequence_version, step_id, step_index, variant, to_email,"
        " from_email, subject, links, sent_at, uncertain)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17)"
        " ON CONFLICT (message_id) DO NOTHING",
        [
            (
                e.message_id,
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
                e.to_email.lower(),
                e.from_email,
                e.subject,
                e.links,
                e.sent_at,
                e.uncertain,
            )
            for e in events
        ],
    )


async def message(
    conn: asyncpg.Connection | asyncpg.Pool, message_id: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE message_id = $1", message_id
    )


async def first_message_of(
    conn: asyncpg.Connection, message_ids: Sequence[str]
) -> asyncpg.Record | None:
    """The first of ``message_ids`` (in the given order) that we sent."""
    if not message_ids:
        return None
    return await conn.fetchrow(
        f"SELECT {MESSAGE_COLUMNS} FROM messages m"
        " JOIN unnest($1::text[]) WITH ORDINALITY AS u(id, n) ON m.message_id = u.id"
        " ORDER BY u.n LIMIT 1",
        list(message_ids),
    )


async def insert_engagement(
    conn: asyncpg.Connection,
    *,
    event_id: Any,
    dedupe_key: str,
    tenant_id: str,
    message_id: str,
    lead_id: Any,
    type_: str,
    source: str,
    machine: bool,
    occurred_at: datetime,
    detail: dict[str, Any],
) -> bool:
    inserted = await conn.fetchval(
        "INSERT INTO engagement_events (event_id, dedupe_key, tenant_id, message_id, lead_id,"
        " type, source, machine, occurred_at, detail) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
        " ON CONFLICT (dedupe_key) DO NOTHING RETURNING true",
        event_id,
        dedupe_key,
        tenant_id,
        message_id,
        lead_id,
        type_,
        source,
        machine,
        occurred_at,
        detail,
    )
    return bool(inserted)


async def park_reply(
    conn: asyncpg.Connection,
    reply_key: str,
    referenced: list[str],
    from_email: str | None,
    subject: str | None,
    received_at: datetime,
    body: str,
) -> None:
    await conn.execute(
        "INSERT INTO parked_replies (reply_key, referenced, from_email, subject, received_at,"
        " body) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (reply_key) DO NOTHING",
        reply_key,
        referenced,
        from_email,
        subject,
        received_at,
        body,
    )


async def take_parked_replies(
    conn: asyncpg.Connection, message_ids: Sequence[str]
) -> list[asyncpg.Record]:
    """Parked replies that reference any of ``message_ids``, removed from the park."""
    return await conn.fetch(
        "DELETE FROM parked_replies WHERE referenced && $1::text[]"
        " RETURNING reply_key, referenced, from_email, subject, received_at, body",
        list(message_ids),
    )


async def engagement_counts(pool: asyncpg.Pool, message_id: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT type, count(*) AS n FROM engagement_events WHERE message_id = $1 GROUP BY type",
        message_id,
    )
    return {r["type"]: r["n"] for r in rows}
