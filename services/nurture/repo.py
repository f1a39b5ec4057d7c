"""Nurture SQL."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg

from services.nurture.domain import Advance, LogEntry, Step
from services.nurture.presets import Preset

ENROLLMENT_COLUMNS = (
    "id, tenant_id, lead_id, sequence_id, sequence_version_id, sequence_key, version, lead,"
    " status, position, cursor, next_action_at, awaiting_delivery_key, thread_delivery_key,"
    " steps_done, stop_reason, enrolled_at, last_activity_at, finished_at"
)


async def ensure_preset(conn: asyncpg.Connection, tenant_id: str, preset: Preset) -> None:
    """Create the preset sequence for a tenant if it has none of that key."""
    sequence_id = uuid.uuid4()
    created = await conn.fetchval(
        "INSERT INTO sequences (id, tenant_id, key, name, description, status,"
        " current_version, preset) VALUES ($1, $2, $3, $4, $5, 'active', 1, true)"
        " ON CONFLICT (tenant_id, key) DO NOTHING RETURNING id",
        sequence_id,
        tenant_id,
        preset.key,
        preset.name,
        preset.description,
    )
    if created is None:
        return
    version_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO sequence_versions (id, sequence_id, version) VALUES ($1, $2, 1)",
        version_id,
        sequence_id,
    )
    await conn.executemany(
        "INSERT INTO steps (id, sequence_version_id, position, kind, config)"
        " VALUES ($1, $2, $3, $4, $5)",
        [
            (uuid.uuid4(), version_id, position, kind, config)
            for position, (kind, config) in enumerate(preset.steps())
        ],
    )


async def active_sequence(
    conn: asyncpg.Connection, tenant_id: str, key: str
) -> asyncpg.Record | None:
    """The sequence and the version new enrollments join."""
    return await conn.fetchrow(
        "SELECT s.id, s.key, s.status, s.current_version AS version, v.id AS version_id"
        " FROM sequences s JOIN sequence_versions v"
        "   ON v.sequence_id = s.id AND v.version = s.current_version"
        " WHERE s.tenant_id = $1 AND s.key = $2",
        tenant_id,
        key,
    )


async def steps_of_version(conn: asyncpg.Connection, version_id: uuid.UUID) -> list[Step]:
    rows = await conn.fetch(
        "SELECT id, position, kind, config FROM steps WHERE sequence_version_id = $1"
        " ORDER BY position",
        version_id,
    )
    return [Step(r["id"], r["position"], r["kind"], r["config"]) for r in rows]


async def insert_enrollments(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> int:
    """Insert new enrollments; one already running for (lead, sequence) is left alone.

    Row: (id, tenant_id, lead_id, sequence_id, version_id, sequence_key, version, lead,
    next_action_at, enrolled_at). Returns how many were inserted.
    """
    if not rows:
        return 0
    columns = list(zip(*rows, strict=True))
    inserted = await conn.fetchval(
        "WITH ins AS (INSERT INTO enrollments (id, tenant_id, lead_id, sequence_id,"
        " sequence_version_id, sequence_key, version, lead, status, next_action_at,"
        " enrolled_at, last_activity_at)"
        " SELECT i, t, l, s, v, k, n, d, 'active', a, e, e FROM unnest($1::uuid[], $2::text[],"
        " $3::uuid[], $4::uuid[], $5::uuid[], $6::text[], $7::int[], $8::jsonb[],"
        " $9::timestamptz[], $10::timestamptz[]) AS u(i, t, l, s, v, k, n, d, a, e)"
        " ON CONFLICT (tenant_id, lead_id, sequence_id)"
        "   WHERE status IN ('active', 'awaiting_send', 'paused') DO NOTHING"
        " RETURNING 1) SELECT count(*) FROM ins",
        *[list(c) for c in columns],
    )
    return int(inserted)


async def claim_due(conn: asyncpg.Connection, now: datetime, limit: int) -> list[asyncpg.Record]:
    """Lock due enrollments for this transaction; other schedulers skip them."""
    return await conn.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM enrollments"
        " WHERE status = 'active' AND next_action_at <= $1"
        " ORDER BY next_action_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        now,
        limit,
    )


async def enrollment_for_update(
    conn: asyncpg.Connection, enrollment_id: uuid.UUID
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE id = $1 FOR UPDATE", enrollment_id
    )


async def running_enrollments_for_update(
    conn: asyncpg.Connection, tenant_id: str, lead_id: uuid.UUID
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE tenant_id = $1 AND lead_id = $2"
        " AND status IN ('active', 'awaiting_send', 'paused') FOR UPDATE",
        tenant_id,
        lead_id,
    )


async def apply_advances(
    conn: asyncpg.Connection, items: Sequence[tuple[uuid.UUID, Advance]], now: datetime
) -> None:
    await conn.executemany(
        "UPDATE enrollments SET status = $2::text, position = $3, cursor = $4, steps_done = $5,"
        " next_action_at = $6, thread_delivery_key = $7, awaiting_delivery_key = $8,"
        " stop_reason = coalesce($9::text, stop_reason), last_activity_at = $10::timestamptz,"
        " finished_at = CASE WHEN $2::text IN ('completed', 'stopped') THEN $10::timestamptz END"
        " WHERE id = $1",
        [
            (
                enrollment_id,
                a.status,
                a.position,
                a.cursor,
                a.steps_done,
                a.next_action_at,
                a.thread_delivery_key,
                a.awaiting_delivery_key,
                a.stop_reason,
                now,
            )
            for enrollment_id, a in items
        ],
    )


async def stop_enrollments(
    conn: asyncpg.Connection, enrollment_ids: Sequence[uuid.UUID], reason: str, now: datetime
) -> None:
    await conn.execute(
        "UPDATE enrollments SET status = 'stopped', stop_reason = $2, next_action_at = NULL,"
        " awaiting_delivery_key = NULL, last_activity_at = $3, finished_at = $3"
        " WHERE id = ANY($1::uuid[])",
        list(enrollment_ids),
        reason,
        now,
    )


async def write_log(
    conn: asyncpg.Connection,
    entries: Sequence[tuple[str, uuid.UUID, LogEntry]],
    now: datetime,
) -> None:
    if entries:
        await conn.executemany(
            "INSERT INTO execution_log (tenant_id, enrollment_id, at, step_index, decision,"
            " reason) VALUES ($1, $2, $3, $4, $5, $6)",
            [
                (t, e, now, entry.step_index, entry.decision, entry.reason)
                for t, e, entry in entries
            ],
        )


async def record_engagements(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    if rows:
        await conn.executemany(
            "INSERT INTO engagements (event_id, tenant_id, lead_id, enrollment_id, step_index,"
            " type, machine, occurred_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)"
            " ON CONFLICT (event_id) DO NOTHING",
            rows,
        )


async def enrollments_of_lead(
    pool: asyncpg.Pool, tenant_id: str, lead_id: uuid.UUID
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE tenant_id = $1 AND lead_id = $2"
        " ORDER BY enrolled_at, id",
        tenant_id,
        lead_id,
    )
    return [dict(r) for r in rows]


async def get_enrollment(pool: asyncpg.Pool, enrollment_id: uuid.UUID) -> dict[str, Any] | None:
    row = await pool.fetchrow(
        f"SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE id = $1", enrollment_id
    )
    return dict(row) if row is not None else None


async def execution_log(pool: asyncpg.Pool, enrollment_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT at, step_index, decision, reason, detail FROM execution_log"
        " WHERE enrollment_id = $1 ORDER BY id",
        enrollment_id,
    )
    return [dict(r) for r in rows]


async def list_sequences(pool: asyncpg.Pool, tenant_id: str) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT id, key, name, description, status, current_version, preset, created_at"
        " FROM sequences WHERE tenant_id = $1 ORDER BY key",
        tenant_id,
    )
    return [dict(r) for r in rows]
