"""Nurture SQL."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from schemas.events import EmailSent
from services.nurture.domain import Advance, LogEntry, Step
from services.nurture.presets import Preset

ENROLLMENT_COLUMNS = (
    "id, tenant_id, lead_id, sequence_id, sequence_version_id, sequence_key, version, lead,"
    " status, position, cursor, next_action_at, awaiting_delivery_key, thread_delivery_key,"
    " steps_done, stop_reason, enrolled_at, last_activity_at, finished_at, due_since,"
    " waiting_on, thread_subject, paused_until, company_domain"
)


async def ensure_preset(
    conn: asyncpg.Connection, tenant_id: str, preset: Preset
) -> uuid.UUID | None:
    """Create the preset sequence for a tenant if it has none of that key; the new
    sequence's id (None: the tenant has a sequence of that key already)."""
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
        return None
    version_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO sequence_versions (id, sequence_id, version, frozen) VALUES ($1, $2, 1, true)",
        version_id,
        sequence_id,
    )
    await insert_steps(
        conn,
        version_id,
        [(f"s{n + 1}", kind, config) for n, (kind, config) in enumerate(preset.steps())],
    )
    return sequence_id


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


async def steps_of_version(
    conn: asyncpg.Connection | asyncpg.Pool, version_id: uuid.UUID
) -> list[Step]:
    rows = await conn.fetch(
        "SELECT id, position, key, kind, config FROM steps WHERE sequence_version_id = $1"
        " ORDER BY position",
        version_id,
    )
    return [Step(r["id"], r["position"], r["key"], r["kind"], r["config"]) for r in rows]


async def insert_steps(
    conn: asyncpg.Connection,
    version_id: uuid.UUID,
    steps: Sequence[tuple[str, str, dict[str, Any]]],
) -> None:
    """Steps as (key, kind, config), in order."""
    await conn.executemany(
        "INSERT INTO steps (id, sequence_version_id, position, key, kind, config)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        [
            (uuid.uuid4(), version_id, position, key, kind, config)
            for position, (key, kind, config) in enumerate(steps)
        ],
    )


async def delete_steps(conn: asyncpg.Connection, version_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM steps WHERE sequence_version_id = $1", version_id)


async def insert_enrollments(
    conn: asyncpg.Connection,
    tenant_id: str,
    sequence: Mapping[str, Any],
    ids: Sequence[uuid.UUID],
    lead_ids: Sequence[uuid.UUID],
    snapshots: Sequence[str],
    company_domains: Sequence[str | None],
    now: datetime,
) -> list[uuid.UUID]:
    """New active enrollments, due now, in one statement (snapshots as JSON text); a
    lead already running in the sequence is skipped. Returns the leads enrolled."""
    if not ids:
        return []
    records = await conn.fetch(
        "INSERT INTO enrollments (id, tenant_id, lead_id, sequence_id,"
        " sequence_version_id, sequence_key, version, lead, status, next_action_at,"
        " enrolled_at, last_activity_at, company_domain)"
        " SELECT u.i, $1, u.l, $2, $3, $4, $5, u.d::jsonb, 'active', $6, $6, $6, u.c"
        " FROM unnest($7::uuid[], $8::uuid[], $9::text[], $10::text[]) AS u(i, l, d, c)"
        " ON CONFLICT (tenant_id, lead_id, sequence_id)"
        "   WHERE status IN ('active', 'awaiting_send', 'paused') DO NOTHING RETURNING lead_id",
        tenant_id,
        sequence["id"],
        sequence["version_id"],
        sequence["key"],
        sequence["version"],
        now,
        ids,
        lead_ids,
        snapshots,
        company_domains,
    )
    return [r[0] for r in records]


async def insert_notification(
    conn: asyncpg.Connection,
    tenant_id: str,
    enrollment_id: uuid.UUID,
    url: str,
    payload: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO notifications (id, tenant_id, enrollment_id, url, payload)"
        " VALUES ($1, $2, $3, $4, $5)",
        uuid.uuid4(),
        tenant_id,
        enrollment_id,
        url,
        payload,
    )


async def claim_notifications(conn: asyncpg.Connection, limit: int) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT id, tenant_id, url, payload, attempts FROM notifications"
        " WHERE status = 'pending' AND next_attempt_at <= clock_timestamp()"
        " ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )


async def finish_notification(
    conn: asyncpg.Connection,
    notification_id: uuid.UUID,
    *,
    delivered: bool,
    failed: bool,
    error: str | None,
    response_status: int | None,
    retry_in: float,
) -> None:
    await conn.execute(
        "UPDATE notifications SET attempts = attempts + 1, last_error = $3,"
        " response_status = $4,"
        " status = CASE WHEN $2 THEN 'delivered' WHEN $5 THEN 'failed' ELSE 'pending' END,"
        " delivered_at = CASE WHEN $2 THEN clock_timestamp() END,"
        " next_attempt_at = clock_timestamp() + make_interval(secs => $6) WHERE id = $1",
        notification_id,
        delivered,
        error,
        response_status,
        failed,
        retry_in,
    )


async def notifications_of(pool: asyncpg.Pool, enrollment_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT id, url, status, attempts, response_status, last_error, created_at,"
        " delivered_at FROM notifications WHERE enrollment_id = $1 ORDER BY created_at",
        enrollment_id,
    )
    return [dict(r) for r in rows]


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


async def enrollments_for_update(
    conn: asyncpg.Connection, enrollment_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, asyncpg.Record]:
    """Lock these enrollments (in id order, so concurrent transactions cannot deadlock)."""
    rows = await conn.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE id = ANY($1::uuid[])"
        " ORDER BY id FOR UPDATE",
        list(set(enrollment_ids)),
    )
    return {r["id"]: r for r in rows}


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
    conn: asyncpg.Connection,
    items: Sequence[tuple[uuid.UUID, Advance, str | None]],
    now: datetime,
) -> None:
    """Write each enrollment's new state, in one statement. Items: (id, advance,
    thread subject)."""
    if not items:
        return
    await conn.execute(
        "UPDATE enrollments e SET status = u.status, position = u.position,"
        " cursor = u.cursor, steps_done = u.steps_done, next_action_at = u.next_action_at,"
        " thread_delivery_key = u.thread_key, awaiting_delivery_key = u.awaiting_key,"
        " stop_reason = coalesce(u.stop_reason, e.stop_reason), last_activity_at = $1::timestamptz,"
        " finished_at = CASE WHEN u.status IN ('completed', 'stopped') THEN $1::timestamptz END,"
        " due_since = u.due_since, waiting_on = u.waiting_on,"
        " thread_subject = coalesce(e.thread_subject, u.thread_subject)"
        " FROM unnest($2::uuid[], $3::text[], $4::int[], $5::int[], $6::int[],"
        " $7::timestamptz[], $8::text[], $9::text[], $10::text[], $11::timestamptz[],"
        " $12::text[], $13::text[]) AS u(id, status, position, cursor, steps_done,"
        " next_action_at, thread_key, awaiting_key, stop_reason, due_since, waiting_on,"
        " thread_subject)"
        " WHERE e.id = u.id",
        now,
        [enrollment_id for enrollment_id, _, _ in items],
        [a.status for _, a, _ in items],
        [a.position for _, a, _ in items],
        [a.cursor for _, a, _ in items],
        [a.steps_done for _, a, _ in items],
        [a.next_action_at for _, a, _ in items],
        [a.thread_delivery_key for _, a, _ in items],
        [a.awaiting_delivery_key for _, a, _ in items],
        [a.stop_reason for _, a, _ in items],
        [a.due_since for _, a, _ in items],
        [a.waiting_on for _, a, _ in items],
        [subject for _, _, subject in items],
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
    """Execution-log entries, in this order, in one statement."""
    if entries:
        await conn.execute(
            "INSERT INTO execution_log (tenant_id, enrollment_id, at, step_index, decision,"
            " reason) SELECT u.t, u.e, $1, u.s, u.d, u.r FROM unnest($2::text[], $3::uuid[],"
            " $4::int[], $5::text[], $6::text[]) AS u(t, e, s, d, r)",
            now,
            [t for t, _, _ in entries],
            [e for _, e, _ in entries],
            [entry.step_index for _, _, entry in entries],
            [entry.decision for _, _, entry in entries],
            [entry.reason for _, _, entry in entries],
        )


async def record_engagements(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Rows: (event_id, tenant_id, lead_id, enrollment_id, step_index, step_id, type,
    machine, occurred_at)."""
    if rows:
        await conn.executemany(
            "INSERT INTO engagements (event_id, tenant_id, lead_id, enrollment_id, step_index,"
            " step_id, type, machine, occurred_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)"
            " ON CONFLICT (event_id) DO NOTHING",
            rows,
        )


async def record_sent_emails(conn: asyncpg.Connection, events: Sequence[EmailSent]) -> None:
    """The emails enrollments sent, per step (what conditions measure time from)."""
    if events:
        await conn.execute(
            "INSERT INTO enrollment_emails (delivery_key, enrollment_id, step_id, variant,"
            " message_id, sent_at, uncertain) SELECT * FROM unnest($1::text[], $2::uuid[],"
            " $3::uuid[], $4::text[], $5::text[], $6::timestamptz[], $7::bool[])"
            " ON CONFLICT (delivery_key) DO NOTHING",
            [e.delivery_key for e in events],
            [e.enrollment_id for e in events],
            [e.step_id for e in events],
            [e.variant for e in events],
            [e.message_id for e in events],
            [e.sent_at for e in events],
            [e.uncertain for e in events],
        )


async def facts_for(
    conn: asyncpg.Connection, enrollment_ids: Sequence[uuid.UUID]
) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    """Sent emails and engagement of these enrollments (for conditions)."""
    ids = list(enrollment_ids)
    sent = await conn.fetch(
        "SELECT enrollment_id, step_id, sent_at FROM enrollment_emails"
        " WHERE enrollment_id = ANY($1::uuid[])",
        ids,
    )
    engaged = await conn.fetch(
        "SELECT enrollment_id, step_id, type, machine, occurred_at FROM engagements"
        " WHERE enrollment_id = ANY($1::uuid[])",
        ids,
    )
    return list(sent), list(engaged)


async def sequence_settings(
    conn: asyncpg.Connection, version_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, Any]]:
    """The settings of these sequence versions, by version id."""
    rows = await conn.fetch(
        "SELECT id, settings FROM sequence_versions WHERE id = ANY($1::uuid[])",
        list(set(version_ids)),
    )
    return {r["id"]: r["settings"] for r in rows}


async def settings_of_version(
    conn: asyncpg.Connection, sequence_id: uuid.UUID, version: int | None
) -> dict[str, Any]:
    """The settings of one version of a sequence (None: its current version)."""
    value = await conn.fetchval(
        "SELECT v.settings FROM sequence_versions v JOIN sequences s ON s.id = v.sequence_id"
        " WHERE v.sequence_id = $1 AND v.version = coalesce($2::int, s.current_version)",
        sequence_id,
        version,
    )
    return value or {}


async def upsert_leads(
    conn: asyncpg.Connection,
    tenant_ids: Sequence[str],
    lead_ids: Sequence[uuid.UUID],
    emails: Sequence[str],
    snapshots: Sequence[str],
    now: datetime,
) -> set[tuple[str, uuid.UUID]]:
    """Record what LeadRouted says of each lead (snapshots as JSON text; each lead
    once), in one statement; returns the (tenant, lead) pairs that are suppressed."""
    if not lead_ids:
        return set()
    rows = await conn.fetch(
        "WITH up AS (INSERT INTO leads (tenant_id, lead_id, email, snapshot, updated_at)"
        " SELECT u.t, u.l, u.e, u.s::jsonb, $5"
        " FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[]) AS u(t, l, e, s)"
        " ON CONFLICT (tenant_id, lead_id) DO UPDATE"
        " SET email = excluded.email, snapshot = excluded.snapshot,"
        " updated_at = excluded.updated_at"
        " RETURNING tenant_id, lead_id, suppressed_reason)"
        " SELECT tenant_id, lead_id FROM up WHERE suppressed_reason IS NOT NULL",
        tenant_ids,
        lead_ids,
        emails,
        snapshots,
        now,
    )
    return {(r[0], r[1]) for r in rows}


async def suppress_lead(
    conn: asyncpg.Connection, tenant_id: str, lead_id: uuid.UUID, reason: str
) -> None:
    await conn.execute(
        "UPDATE leads SET suppressed_reason = coalesce(suppressed_reason, $3)"
        " WHERE tenant_id = $1 AND lead_id = $2",
        tenant_id,
        lead_id,
        reason,
    )


async def suppressed_leads(
    conn: asyncpg.Connection, tenant_id: str, lead_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, str]:
    rows = await conn.fetch(
        "SELECT lead_id, suppressed_reason FROM leads WHERE tenant_id = $1"
        " AND lead_id = ANY($2::uuid[]) AND suppressed_reason IS NOT NULL",
        tenant_id,
        list(lead_ids),
    )
    return {r["lead_id"]: r["suppressed_reason"] for r in rows}


async def find_lead(
    conn: asyncpg.Connection | asyncpg.Pool,
    tenant_id: str,
    lead_id: uuid.UUID | None,
    email: str | None,
) -> asyncpg.Record | None:
    if lead_id is not None:
        return await conn.fetchrow(
            "SELECT lead_id, email, snapshot, suppressed_reason FROM leads"
            " WHERE tenant_id = $1 AND lead_id = $2",
            tenant_id,
            lead_id,
        )
    return await conn.fetchrow(
        "SELECT lead_id, email, snapshot, suppressed_reason FROM leads"
        " WHERE tenant_id = $1 AND email = $2 ORDER BY updated_at DESC LIMIT 1",
        tenant_id,
        (email or "").strip().lower(),
    )


async def wake_waiting(
    conn: asyncpg.Connection, tenant_id: str, lead_id: uuid.UUID, now: datetime
) -> None:
    """New engagement may answer a condition an enrollment is waiting on."""
    await conn.execute(
        "UPDATE enrollments SET next_action_at = $3 WHERE tenant_id = $1 AND lead_id = $2"
        " AND status = 'active' AND waiting_on = 'condition'",
        tenant_id,
        lead_id,
        now,
    )


async def running_at_company_for_update(
    conn: asyncpg.Connection, tenant_id: str, domain: str
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM enrollments WHERE tenant_id = $1"
        " AND company_domain = $2 AND status IN ('active', 'awaiting_send', 'paused')"
        " FOR UPDATE",
        tenant_id,
        domain,
    )


async def resume_due(conn: asyncpg.Connection, now: datetime) -> list[asyncpg.Record]:
    """Paused enrollments whose pause has run out go back to work."""
    return await conn.fetch(
        "UPDATE enrollments SET status = CASE WHEN awaiting_delivery_key IS NULL"
        " THEN 'active' ELSE 'awaiting_send' END,"
        " next_action_at = CASE WHEN awaiting_delivery_key IS NULL"
        " THEN greatest(coalesce(next_action_at, $1), $1) END, paused_until = NULL,"
        " last_activity_at = $1"
        " WHERE id IN (SELECT id FROM enrollments WHERE status = 'paused'"
        " AND paused_until <= $1 FOR UPDATE SKIP LOCKED) RETURNING id, tenant_id",
        now,
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


# ------------------------------------------------------------- sequence management

SEQUENCE_COLUMNS = (
    "s.id, s.tenant_id, s.key, s.name, s.description, s.status, s.current_version,"
    " v.settings, s.preset, s.created_at, s.updated_at, v.id AS version_id, v.frozen"
)


async def create_sequence(
    conn: asyncpg.Connection,
    tenant_id: str,
    key: str,
    name: str,
    description: str,
    settings: dict[str, Any],
) -> tuple[uuid.UUID, uuid.UUID]:
    sequence_id, version_id = uuid.uuid4(), uuid.uuid4()
    await conn.execute(
        "INSERT INTO sequences (id, tenant_id, key, name, description, status,"
        " current_version) VALUES ($1, $2, $3, $4, $5, 'draft', 1)",
        sequence_id,
        tenant_id,
        key,
        name,
        description,
    )
    await conn.execute(
        "INSERT INTO sequence_versions (id, sequence_id, version, settings) VALUES ($1, $2, 1, $3)",
        version_id,
        sequence_id,
        settings,
    )
    return sequence_id, version_id


async def database_time(conn: asyncpg.Connection) -> datetime:
    """PostgreSQL's clock now (not the transaction's start): one clock for every
    replica, and, read after a row lock, later than the change that held it before."""
    value: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return value


async def sequence_exists(conn: asyncpg.Connection, tenant_id: str, key: str) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT 1 FROM sequences WHERE tenant_id = $1 AND key = $2", tenant_id, key
        )
    )


async def sequence_by_ref(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, ref: str, *, for_update: bool = False
) -> asyncpg.Record | None:
    """A sequence by id or key, with its current version."""
    by_id: uuid.UUID | None = None
    try:
        by_id = uuid.UUID(ref)
    except ValueError:
        by_id = None
    lock = " FOR UPDATE OF s" if for_update else ""
    return await conn.fetchrow(
        f"SELECT {SEQUENCE_COLUMNS} FROM sequences s JOIN sequence_versions v"
        "   ON v.sequence_id = s.id AND v.version = s.current_version"
        " WHERE s.tenant_id = $1 AND (s.id = $2 OR ($2::uuid IS NULL AND s.key = $3))" + lock,
        tenant_id,
        by_id,
        ref,
    )


async def list_sequences(
    pool: asyncpg.Pool, tenant_id: str, status: str | None = None
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT s.id, s.key, s.name, s.description, s.status, s.current_version AS version,"
        " v.settings, s.preset, s.created_at, s.updated_at FROM sequences s"
        " JOIN sequence_versions v ON v.sequence_id = s.id AND v.version = s.current_version"
        " WHERE s.tenant_id = $1 AND ($2::text IS NULL OR s.status = $2) ORDER BY s.key",
        tenant_id,
        status,
    )
    return [dict(r) for r in rows]


async def update_sequence(
    conn: asyncpg.Connection, sequence_id: uuid.UUID, name: str, description: str
) -> None:
    await conn.execute(
        "UPDATE sequences SET name = $2, description = $3, updated_at = now() WHERE id = $1",
        sequence_id,
        name,
        description,
    )


async def set_version_settings(
    conn: asyncpg.Connection, version_id: uuid.UUID, settings: dict[str, Any]
) -> None:
    """Settings of a version no enrollment runs on yet (a draft's)."""
    await conn.execute(
        "UPDATE sequence_versions SET settings = $2 WHERE id = $1 AND NOT frozen",
        version_id,
        settings,
    )


async def set_sequence_status(
    conn: asyncpg.Connection, sequence_id: uuid.UUID, status: str
) -> None:
    await conn.execute(
        "UPDATE sequences SET status = $2, updated_at = now() WHERE id = $1", sequence_id, status
    )


async def delete_sequence(conn: asyncpg.Connection, sequence_id: uuid.UUID) -> None:
    await conn.execute("DELETE FROM sequences WHERE id = $1", sequence_id)


async def freeze_version(conn: asyncpg.Connection, version_id: uuid.UUID) -> None:
    await conn.execute("UPDATE sequence_versions SET frozen = true WHERE id = $1", version_id)


async def add_version(
    conn: asyncpg.Connection,
    sequence_id: uuid.UUID,
    version: int,
    frozen: bool,
    settings: dict[str, Any],
) -> uuid.UUID:
    version_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO sequence_versions (id, sequence_id, version, frozen, settings)"
        " VALUES ($1, $2, $3, $4, $5)",
        version_id,
        sequence_id,
        version,
        frozen,
        settings,
    )
    await conn.execute(
        "UPDATE sequences SET current_version = $2, updated_at = now() WHERE id = $1",
        sequence_id,
        version,
    )
    return version_id


async def versions_of(pool: asyncpg.Pool, sequence_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT v.version, v.frozen, v.created_at, v.settings,"
        " (SELECT count(*) FROM enrollments e WHERE e.sequence_version_id = v.id) AS enrollments,"
        " (SELECT count(*) FROM steps st WHERE st.sequence_version_id = v.id) AS steps"
        " FROM sequence_versions v WHERE v.sequence_id = $1 ORDER BY v.version",
        sequence_id,
    )
    return [dict(r) for r in rows]


async def enrollments_of_sequence(
    pool: asyncpg.Pool,
    sequence_id: uuid.UUID,
    status: str | None,
    version: int | None,
    limit: int,
    offset: int,
) -> tuple[list[dict[str, Any]], int]:
    where = (
        " WHERE sequence_id = $1 AND ($2::text IS NULL OR status = $2)"
        " AND ($3::int IS NULL OR version = $3)"
    )
    rows = await pool.fetch(
        f"SELECT {ENROLLMENT_COLUMNS} FROM enrollments{where}"
        " ORDER BY enrolled_at, id LIMIT $4 OFFSET $5",
        sequence_id,
        status,
        version,
        limit,
        offset,
    )
    total = await pool.fetchval(
        f"SELECT count(*) FROM enrollments{where}", sequence_id, status, version
    )
    return [dict(r) for r in rows], int(total)


async def sequence_stats(pool: asyncpg.Pool, sequence_id: uuid.UUID) -> dict[str, Any]:
    by_status = await pool.fetch(
        "SELECT status, count(*) AS n FROM enrollments WHERE sequence_id = $1 GROUP BY status",
        sequence_id,
    )
    reasons = await pool.fetch(
        "SELECT stop_reason, count(*) AS n FROM enrollments WHERE sequence_id = $1"
        " AND status = 'stopped' GROUP BY stop_reason ORDER BY n DESC",
        sequence_id,
    )
    return {
        "by_status": {r["status"]: r["n"] for r in by_status},
        "stopped_by_reason": {r["stop_reason"] or "unknown": r["n"] for r in reasons},
    }


async def engagement_counts(
    pool: asyncpg.Pool, enrollment_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, dict[str, int]]:
    rows = await pool.fetch(
        "SELECT enrollment_id, type, count(*) FILTER (WHERE NOT machine) AS n"
        " FROM engagements WHERE enrollment_id = ANY($1::uuid[]) GROUP BY enrollment_id, type",
        list(enrollment_ids),
    )
    counts: dict[uuid.UUID, dict[str, int]] = {}
    for r in rows:
        counts.setdefault(r["enrollment_id"], {})[r["type"]] = r["n"]
    return counts


async def emails_sent_counts(
    pool: asyncpg.Pool, enrollment_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int]:
    rows = await pool.fetch(
        "SELECT enrollment_id, count(*) AS n FROM enrollment_emails"
        " WHERE enrollment_id = ANY($1::uuid[]) GROUP BY enrollment_id",
        list(enrollment_ids),
    )
    return {r["enrollment_id"]: r["n"] for r in rows}


async def pause_enrollment(
    conn: asyncpg.Connection, enrollment_id: uuid.UUID, until: datetime | None, now: datetime
) -> bool:
    status = await conn.fetchval(
        "UPDATE enrollments SET status = 'paused', paused_until = $2, last_activity_at = $3"
        " WHERE id = $1 AND status IN ('active', 'awaiting_send') RETURNING status",
        enrollment_id,
        until,
        now,
    )
    return status is not None


async def resume_enrollment(
    conn: asyncpg.Connection, enrollment_id: uuid.UUID, now: datetime
) -> bool:
    status = await conn.fetchval(
        "UPDATE enrollments SET status = CASE WHEN awaiting_delivery_key IS NULL"
        " THEN 'active' ELSE 'awaiting_send' END,"
        " next_action_at = CASE WHEN awaiting_delivery_key IS NULL"
        " THEN greatest(coalesce(next_action_at, $2), $2) END, paused_until = NULL,"
        " last_activity_at = $2 WHERE id = $1 AND status = 'paused' RETURNING status",
        enrollment_id,
        now,
    )
    return status is not None
