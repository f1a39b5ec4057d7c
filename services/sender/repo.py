"""Sender SQL."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from schemas.events import StepDue

DELIVERY_COLUMNS = (
    "delivery_key, tenant_id, lead_id, enrollment_id, sequence_id, sequence_key,"
    " sequence_version, step_id, step_index, variant, thread_delivery_key, to_email, to_name,"
    " subject, body_text, body_html, tracking, from_email, from_name, message_id, links, status,"
    " status_reason, attempts, next_attempt_at, lease_until, claimed_by, smtp_code,"
    " smtp_response, due_at, created_at, updated_at, sent_at, mailbox_id, transport,"
    " provider_message_id, deferrals, dry_run, enhanced_status, bounce_type, last_error,"
    " handed_off_at"
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


async def release_claims(pool: asyncpg.Pool, keys: list[str], owner: str) -> int:
    """Give claimed deliveries that were not handed off back to the queue: those still
    ours; how many."""
    released = await pool.fetch(
        "UPDATE deliveries SET status = 'queued', claimed_by = NULL, lease_until = NULL,"
        " updated_at = clock_timestamp()"
        " WHERE delivery_key = ANY($1::text[]) AND claimed_by = $2 AND status = 'claimed'"
        " RETURNING 1",
        keys,
        owner,
    )
    return len(released)


async def unreserve(
    conn: asyncpg.Connection | asyncpg.Pool, reservations: Sequence[tuple[str, datetime]]
) -> None:
    """Take back sends counted under caps (``reserve``) for deliveries not sent after
    all; each (scope, window start) once per send it counted."""
    if not reservations:
        return
    counts = Counter(reservations)
    await conn.execute(
        "UPDATE send_counters AS c SET count = greatest(c.count - u.n, 0)"
        " FROM unnest($1::text[], $2::timestamptz[], $3::int[]) AS u(scope, window_start, n)"
        " WHERE c.scope = u.scope AND c.window_start = u.window_start",
        [scope for scope, _ in counts],
        [window_start for _, window_start in counts],
        list(counts.values()),
    )


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
    transport: str | None = None,
    provider_message_id: str | None = None,
    enhanced_status: str | None = None,
    bounce_type: str | None = None,
    attempts: int | None = None,
    owner: str | None = None,
) -> asyncpg.Record | None:
    """The delivery's outcome; None when the key is unknown, the delivery was
    cancelled meanwhile (a cancelled delivery keeps its outcome), or, with ``owner``,
    when it is no longer that sender's claim or hand-off."""
    return await conn.fetchrow(
        "UPDATE deliveries SET status = $2, status_reason = $3, smtp_code = $4,"
        " smtp_response = $5, sent_at = coalesce($6, sent_at),"
        " links = coalesce($7::jsonb, links), transport = coalesce($8, transport),"
        " provider_message_id = coalesce($9, provider_message_id), enhanced_status = $10,"
        " bounce_type = $11, attempts = coalesce($12, attempts), lease_until = NULL,"
        " updated_at = clock_timestamp() WHERE delivery_key = $1 AND status <> 'cancelled'"
        "   AND ($13::text IS NULL OR (claimed_by = $13 AND status IN ('claimed', 'sending')))"
        f" RETURNING {DELIVERY_COLUMNS}",
        key,
        status,
        reason,
        smtp_code,
        smtp_response,
        sent_at,
        links,
        transport,
        provider_message_id,
        enhanced_status,
        bounce_type,
        attempts,
        owner,
    )


async def defer(
    conn: asyncpg.Connection,
    key: str,
    until: datetime,
    reason: str,
    smtp_code: int | None,
    *,
    attempts: int,
    last_error: str,
    owner: str,
) -> None:
    """After a transiently failed attempt by ``owner``: try again at ``until`` (unless
    the delivery is no longer that sender's, e.g. cancelled, or claimed by another
    after ``owner``'s claim expired)."""
    await conn.execute(
        "UPDATE deliveries SET status = 'deferred', next_attempt_at = $2, status_reason = $3,"
        " smtp_code = $4, attempts = $5, last_error = $6, claimed_by = NULL,"
        " lease_until = NULL, deferrals = deferrals + 1, updated_at = clock_timestamp()"
        " WHERE delivery_key = $1 AND claimed_by = $7 AND status IN ('claimed', 'sending')",
        key,
        until,
        reason,
        smtp_code,
        attempts,
        last_error,
        owner,
    )


async def release_expired_claims(conn: asyncpg.Connection) -> int:
    """Claimed but never handed to SMTP: safe to hand to another sender."""
    result = await conn.execute(
        "UPDATE deliveries SET status = 'queued', claimed_by = NULL, lease_until = NULL,"
        " updated_at = clock_timestamp()"
        " WHERE status = 'claimed' AND lease_until < clock_timestamp()"
    )
    return int(result.split()[-1])


async def flag_uncertain(
    conn: asyncpg.Connection, key: str, reason: str, now: datetime, owner: str
) -> asyncpg.Record | None:
    """A hand-off whose answer never came, by the sender holding it: uncertain."""
    return await conn.fetchrow(
        "UPDATE deliveries SET status = 'uncertain', lease_until = NULL,"
        " status_reason = $2, sent_at = coalesce(sent_at, $3), updated_at = clock_timestamp()"
        " WHERE delivery_key = $1 AND status = 'sending' AND claimed_by = $4"
        f" RETURNING {DELIVERY_COLUMNS}",
        key,
        reason[:1000],
        now,
        owner,
    )


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


#: Not handed off yet: a cancellation still stops these. A claimed delivery's sender
#: finds it cancelled when it tries to mark it sending, and lets it be.
CANCELLABLE = "('queued', 'deferred', 'claimed')"


async def _cancel_pending(
    conn: asyncpg.Connection, tenant_id: str, column: str, value: Any, reason: str
) -> list[asyncpg.Record]:
    return await conn.fetch(
        "UPDATE deliveries SET status = 'cancelled', status_reason = $3, claimed_by = NULL,"
        " lease_until = NULL, updated_at = clock_timestamp()"
        f" WHERE tenant_id = $1 AND {column} = $2 AND status IN {CANCELLABLE}"
        f" RETURNING {DELIVERY_COLUMNS}",
        tenant_id,
        value,
        reason,
    )


async def cancel_pending_for_lead(
    conn: asyncpg.Connection, tenant_id: str, lead_id: Any, reason: str
) -> list[asyncpg.Record]:
    return await _cancel_pending(conn, tenant_id, "lead_id", lead_id, reason)


async def cancel_pending_for_enrollment(
    conn: asyncpg.Connection, tenant_id: str, enrollment_id: Any, reason: str
) -> list[asyncpg.Record]:
    return await _cancel_pending(conn, tenant_id, "enrollment_id", enrollment_id, reason)


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


# ---------------------------------------------------------------------- mailboxes

MAILBOX_COLUMNS = (
    "id, tenant_id, email, display_name, transports, daily_cap, hourly_cap,"
    " domain_hourly_cap, dkim_domain, dkim_selector, dkim_private_key, enabled, created_at,"
    " updated_at"
)


async def insert_mailbox(conn: asyncpg.Connection, tenant_id: str, values: dict[str, Any]) -> Any:
    return await conn.fetchrow(
        "INSERT INTO mailboxes (id, tenant_id, email, display_name, transports, daily_cap,"
        " hourly_cap, domain_hourly_cap, dkim_domain, dkim_selector, dkim_private_key, enabled)"
        " VALUES (gen_random_uuid(), $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        f" RETURNING {MAILBOX_COLUMNS}",
        tenant_id,
        values["email"],
        values["display_name"],
        values["transports"],
        values["daily_cap"],
        values["hourly_cap"],
        values["domain_hourly_cap"],
        values["dkim_domain"],
        values["dkim_selector"],
        values["dkim_private_key"],
        values["enabled"],
    )


async def update_mailbox(
    conn: asyncpg.Connection, tenant_id: str, mailbox_id: Any, values: dict[str, Any]
) -> Any:
    return await conn.fetchrow(
        "UPDATE mailboxes SET email = $3, display_name = $4, transports = $5, daily_cap = $6,"
        " hourly_cap = $7, domain_hourly_cap = $8, dkim_domain = $9, dkim_selector = $10,"
        " dkim_private_key = $11, enabled = $12, updated_at = clock_timestamp()"
        f" WHERE tenant_id = $1 AND id = $2 RETURNING {MAILBOX_COLUMNS}",
        tenant_id,
        mailbox_id,
        values["email"],
        values["display_name"],
        values["transports"],
        values["daily_cap"],
        values["hourly_cap"],
        values["domain_hourly_cap"],
        values["dkim_domain"],
        values["dkim_selector"],
        values["dkim_private_key"],
        values["enabled"],
    )


async def delete_mailbox(conn: asyncpg.Connection, tenant_id: str, mailbox_id: Any) -> bool:
    result = await conn.execute(
        "DELETE FROM mailboxes WHERE tenant_id = $1 AND id = $2", tenant_id, mailbox_id
    )
    return result.endswith(" 1")


async def mailbox(conn: asyncpg.Connection | asyncpg.Pool, mailbox_id: Any) -> Any:
    return await conn.fetchrow(f"SELECT {MAILBOX_COLUMNS} FROM mailboxes WHERE id = $1", mailbox_id)


async def mailboxes_of(
    conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, *, enabled_only: bool = False
) -> list[Any]:
    return list(
        await conn.fetch(
            f"SELECT {MAILBOX_COLUMNS} FROM mailboxes WHERE tenant_id = $1"
            " AND (enabled OR NOT $2) ORDER BY email",
            tenant_id,
            enabled_only,
        )
    )


async def assigned_mailbox(conn: asyncpg.Connection, enrollment_id: Any) -> Any:
    return await conn.fetchval(
        "SELECT mailbox_id FROM enrollment_mailboxes WHERE enrollment_id = $1", enrollment_id
    )


async def mailbox_loads(conn: asyncpg.Connection, mailbox_ids: list[Any]) -> dict[Any, int]:
    rows = await conn.fetch(
        "SELECT mailbox_id, count(*) AS n FROM enrollment_mailboxes"
        " WHERE mailbox_id = ANY($1::uuid[]) GROUP BY mailbox_id",
        mailbox_ids,
    )
    return {r["mailbox_id"]: r["n"] for r in rows}


async def assign_mailbox(conn: asyncpg.Connection, enrollment_id: Any, mailbox_id: Any) -> Any:
    """Assign unless another sender assigned first; returns the mailbox that holds."""
    await conn.execute(
        "INSERT INTO enrollment_mailboxes (enrollment_id, mailbox_id) VALUES ($1, $2)"
        " ON CONFLICT (enrollment_id) DO UPDATE SET mailbox_id = excluded.mailbox_id"
        " WHERE NOT EXISTS (SELECT 1 FROM mailboxes m WHERE m.id = enrollment_mailboxes.mailbox_id"
        "   AND m.enabled)",
        enrollment_id,
        mailbox_id,
    )
    return await assigned_mailbox(conn, enrollment_id)


async def reserve(conn: asyncpg.Connection, scope: str, window_start: datetime, limit: int) -> bool:
    """Count one send in a window if it stays within ``limit``; atomic across replicas."""
    count = await conn.fetchval(
        "INSERT INTO send_counters (scope, window_start, count) VALUES ($1, $2, 1)"
        " ON CONFLICT (scope, window_start) DO UPDATE SET count = send_counters.count + 1"
        " WHERE send_counters.count < $3 RETURNING count",
        scope,
        window_start,
        limit,
    )
    return count is not None


@dataclass(frozen=True, slots=True)
class GlobalGrant:
    """Hand-offs granted under the global rate, all within one wall-clock second
    (the database's clock): ``second`` and how much of it is left."""

    granted: int
    second: datetime
    seconds_left: float


async def reserve_global(
    conn: asyncpg.Connection, wanted: int, limit: int, *, min_left: float = 0.05
) -> GlobalGrant:
    """Take up to ``wanted`` hand-offs from this wall-clock second's global budget.
    Atomic across replicas (row lock). Nothing is granted in the last ``min_left``
    seconds of a second: too little time to hand anything off in it."""
    async with conn.transaction():
        now = await conn.fetchrow(
            "SELECT date_trunc('second', t) AS second,"
            " extract(epoch FROM date_trunc('second', t) + interval '1 second' - t)::float8"
            " AS left FROM (SELECT clock_timestamp() AS t) AS n"
        )
        second, left = now["second"], float(now["left"])
        if left < min_left:
            return GlobalGrant(0, second, left)
        await conn.execute(
            "INSERT INTO send_counters (scope, window_start, count) VALUES ('global', $1, 0)"
            " ON CONFLICT DO NOTHING",
            second,
        )
        used = await conn.fetchval(
            "SELECT count FROM send_counters WHERE scope = 'global' AND window_start = $1"
            " FOR UPDATE",
            second,
        )
        granted = max(0, min(wanted, limit - int(used)))
        if granted:
            await conn.execute(
                "UPDATE send_counters SET count = count + $2"
                " WHERE scope = 'global' AND window_start = $1",
                second,
                granted,
            )
        return GlobalGrant(granted, second, left)


async def release_global(conn: asyncpg.Connection | asyncpg.Pool, second: datetime, n: int) -> None:
    """Give back ``n`` hand-offs granted in ``second`` that will not happen."""
    await conn.execute(
        "UPDATE send_counters SET count = greatest(count - $2, 0)"
        " WHERE scope = 'global' AND window_start = $1",
        second,
        n,
    )


async def prune_counters(conn: asyncpg.Connection | asyncpg.Pool, before: datetime) -> None:
    await conn.execute(
        "DELETE FROM send_counters WHERE window_start < $1 AND scope <> 'global'"
        " OR (scope = 'global' AND window_start < clock_timestamp() - interval '1 minute')",
        before,
    )


async def set_mailbox(conn: asyncpg.Connection, key: str, mailbox_id: Any) -> None:
    await conn.execute(
        "UPDATE deliveries SET mailbox_id = $2 WHERE delivery_key = $1", key, mailbox_id
    )


async def defer_for_cap(conn: asyncpg.Connection, key: str, until: datetime, reason: str) -> None:
    await conn.execute(
        "UPDATE deliveries SET status = 'deferred', next_attempt_at = $2, status_reason = $3,"
        " deferrals = deferrals + 1, claimed_by = NULL, lease_until = NULL,"
        " updated_at = clock_timestamp() WHERE delivery_key = $1",
        key,
        until,
        reason,
    )


# ----------------------------------------------------------- dry runs, suppressions


async def dry_run_scopes(conn: asyncpg.Connection, tenant_ids: list[str]) -> set[tuple[str, str]]:
    rows = await conn.fetch(
        "SELECT tenant_id, sequence_key FROM dry_runs WHERE tenant_id = ANY($1::text[])",
        tenant_ids,
    )
    return {(r["tenant_id"], r["sequence_key"]) for r in rows}


async def set_dry_run(
    conn: asyncpg.Pool | asyncpg.Connection, tenant_id: str, sequence: str, enabled: bool
) -> None:
    if enabled:
        await conn.execute(
            "INSERT INTO dry_runs (tenant_id, sequence_key) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            tenant_id,
            sequence,
        )
    else:
        await conn.execute(
            "DELETE FROM dry_runs WHERE tenant_id = $1 AND sequence_key = $2", tenant_id, sequence
        )


async def list_dry_runs(pool: asyncpg.Pool, tenant_id: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT sequence_key FROM dry_runs WHERE tenant_id = $1 ORDER BY 1", tenant_id
    )
    return [r["sequence_key"] for r in rows]


async def mark_dry_run(
    conn: asyncpg.Connection,
    key: str,
    message_id: str,
    from_email: str,
    from_name: str | None,
    sent_at: datetime,
    links: list[str],
    mailbox_id: Any,
) -> Any:
    return await conn.fetchrow(
        "UPDATE deliveries SET status = 'dry_run', dry_run = true, message_id = $2,"
        " from_email = $3, from_name = $4, sent_at = $5, links = $6, mailbox_id = $7,"
        " status_reason = 'dry run: built, not handed off', lease_until = NULL,"
        " updated_at = clock_timestamp() WHERE delivery_key = $1 AND status <> 'cancelled'"
        f" RETURNING {DELIVERY_COLUMNS}",
        key,
        message_id,
        from_email,
        from_name,
        sent_at,
        links,
        mailbox_id,
    )


async def list_suppressions(
    pool: asyncpg.Pool, tenant_id: str, email: str | None, limit: int, offset: int
) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT email, reason, source, created_at FROM suppressions WHERE tenant_id = $1"
        " AND ($2::text IS NULL OR email = $2) ORDER BY created_at DESC LIMIT $3 OFFSET $4",
        tenant_id,
        email,
        limit,
        offset,
    )
    return [dict(r) for r in rows]


async def remove_suppression(conn: asyncpg.Pool, tenant_id: str, email: str) -> bool:
    result = await conn.execute(
        "DELETE FROM suppressions WHERE tenant_id = $1 AND email = $2", tenant_id, email
    )
    return result.endswith(" 1")


async def retry_soft_bounce(
    conn: asyncpg.Connection, key: str, until: datetime, limit: int
) -> str | None:
    """Send a soft-bounced delivery again later, at most ``limit`` times; the new
    status (None when the key is unknown or not sent)."""
    return await conn.fetchval(
        "UPDATE deliveries SET soft_bounces = soft_bounces + 1,"
        " status = CASE WHEN soft_bounces + 1 > $3 THEN 'failed' ELSE 'deferred' END,"
        " status_reason = CASE WHEN soft_bounces + 1 > $3"
        "   THEN 'soft bounces: gave up after ' || $3 || ' retries'"
        "   ELSE 'soft bounce: retrying' END,"
        " next_attempt_at = $2, claimed_by = NULL, lease_until = NULL,"
        " deferrals = deferrals + 1, updated_at = clock_timestamp()"
        " WHERE delivery_key = $1 AND status IN ('sent', 'uncertain') RETURNING status",
        key,
        until,
        limit,
    )
