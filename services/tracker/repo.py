"""Tracker SQL."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from schemas.events import EmailFailed, EmailSent

MESSAGE_COLUMNS = (
    "message_id, delivery_key, tenant_id, lead_id, enrollment_id, sequence_id, sequence_key,"
    " sequence_version, step_id, step_index, variant, to_email, from_email, subject, links,"
    " sent_at, uncertain, provider_message_id, transport, dry_run"
)


async def register_messages(conn: asyncpg.Connection, events: Sequence[EmailSent]) -> None:
    """Register sent messages in one statement (a message seen before keeps its row,
    gains the provider's id, and stays uncertain only while every report says so)."""
    latest: dict[str, EmailSent] = {}
    for event in events:
        seen = latest.get(event.message_id)
        if seen is not None:
            # One statement may touch a row once: fold a repeat into the first.
            event = seen.model_copy(
                update={
                    "provider_message_id": seen.provider_message_id or event.provider_message_id,
                    "uncertain": seen.uncertain and event.uncertain,
                }
            )
        latest[event.message_id] = event
    rows = list(latest.values())
    if not rows:
        return
    await conn.execute(
        "INSERT INTO messages (message_id, delivery_key, tenant_id, lead_id, enrollment_id,"
        " sequence_id, sequence_key, sequence_version, step_id, step_index, variant, to_email,"
        " from_email, subject, links, sent_at, uncertain, provider_message_id, transport,"
        " dry_run)"
        " SELECT u.mid, u.dk, u.t, u.l, u.en, u.s, u.sk, u.sv, u.st, u.si, u.v, u.te, u.fe,"
        " u.su, u.li::jsonb, u.sa, u.un, u.pm, u.tr, u.dr"
        " FROM unnest($1::text[], $2::text[], $3::text[], $4::uuid[], $5::uuid[], $6::uuid[],"
        " $7::text[], $8::int[], $9::uuid[], $10::int[], $11::text[], $12::text[], $13::text[],"
        " $14::text[], $15::text[], $16::timestamptz[], $17::bool[], $18::text[], $19::text[],"
        " $20::bool[]) AS u(mid, dk, t, l, en, s, sk, sv, st, si, v, te, fe, su, li, sa, un,"
        " pm, tr, dr)"
        " ON CONFLICT (message_id) DO UPDATE SET"
        " provider_message_id = coalesce(messages.provider_message_id,"
        "   excluded.provider_message_id), uncertain = messages.uncertain AND excluded.uncertain",
        [e.message_id for e in rows],
        [e.delivery_key for e in rows],
        [e.tenant_id for e in rows],
        [e.lead_id for e in rows],
        [e.enrollment_id for e in rows],
        [e.sequence_id for e in rows],
        [e.sequence_key for e in rows],
        [e.sequence_version for e in rows],
        [e.step_id for e in rows],
        [e.step_index for e in rows],
        [e.variant for e in rows],
        [e.to_email.lower() for e in rows],
        [e.from_email for e in rows],
        [e.subject for e in rows],
        [json.dumps(e.links) for e in rows],
        [e.sent_at for e in rows],
        [e.uncertain for e in rows],
        [e.provider_message_id for e in rows],
        [e.transport for e in rows],
        [e.dry_run for e in rows],
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
    provider: str | None = None,
    provider_event_id: str | None = None,
) -> bool:
    inserted = await conn.fetchval(
        "INSERT INTO engagement_events (event_id, dedupe_key, tenant_id, message_id, lead_id,"
        " type, source, machine, occurred_at, detail, provider, provider_event_id)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12)"
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
        provider,
        provider_event_id,
    )
    return bool(inserted)


#: Parking (inbound mail or a provider event naming a message not registered yet)
#: takes this advisory lock exclusively, registering sent messages takes it shared:
#: a park looks again once the registrations in flight have committed, and a
#: registration's take of parked items sees every park committed before it.
#: Without it, a reply arriving as its message registers could be parked after
#: the registration looked, and wait there until it expired.
PARK_LOCK = 0x7472_6B70_6172_6B  # "trkpark"


async def lock_for_parking(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock($1)", PARK_LOCK)


async def lock_for_registering(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1)", PARK_LOCK)


async def park_reply(
    conn: asyncpg.Connection,
    reply_key: str,
    referenced: list[str],
    from_email: str | None,
    subject: str | None,
    received_at: datetime,
    body: str,
    kind: str = "reply",
) -> None:
    """Keep inbound mail (a reply, or a bounce) that references a message not registered
    yet, until it is (``take_parked_replies``) or it expires."""
    await conn.execute(
        "INSERT INTO parked_replies (reply_key, referenced, from_email, subject, received_at,"
        " body, kind) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (reply_key) DO NOTHING",
        reply_key,
        referenced,
        from_email,
        subject,
        received_at,
        body,
        kind,
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


async def message_for_event(
    conn: asyncpg.Connection,
    *,
    delivery_key: str | None,
    message_id: str | None,
    provider_message_id: str | None,
    email: str | None,
    tenant_id: str | None = None,
) -> asyncpg.Record | None:
    """The message a provider event or an inbound email is about: by our delivery key,
    by Message-ID, by the provider's id, else the latest message to that address."""
    if delivery_key:
        row = await conn.fetchrow(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE delivery_key = $1", delivery_key
        )
        if row is not None:
            return row
    if message_id:
        row = await message(conn, message_id)
        if row is not None:
            return row
    if provider_message_id:
        row = await conn.fetchrow(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE provider_message_id = $1"
            " ORDER BY sent_at DESC LIMIT 1",
            provider_message_id,
        )
        if row is not None:
            return row
    if email:
        return await conn.fetchrow(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE to_email = $1"
            " AND ($2::text IS NULL OR tenant_id = $2) AND NOT dry_run"
            " ORDER BY sent_at DESC LIMIT 1",
            email.lower(),
            tenant_id,
        )
    return None


async def seen_token(conn: asyncpg.Connection | asyncpg.Pool, provider: str, token: str) -> bool:
    """Record a webhook token; True when it had been seen before (a replay)."""
    inserted = await conn.fetchval(
        "INSERT INTO webhook_tokens (provider, token) VALUES ($1, $2)"
        " ON CONFLICT DO NOTHING RETURNING true",
        provider,
        token,
    )
    return not inserted


async def forget_token(conn: asyncpg.Connection | asyncpg.Pool, provider: str, token: str) -> None:
    """Release a token recorded by :func:`seen_token` (its request was not accepted)."""
    await conn.execute(
        "DELETE FROM webhook_tokens WHERE provider = $1 AND token = $2", provider, token
    )


async def prune_tokens(conn: asyncpg.Connection | asyncpg.Pool, older_than_seconds: float) -> None:
    await conn.execute(
        "DELETE FROM webhook_tokens WHERE seen_at < clock_timestamp() - make_interval(secs => $1)",
        older_than_seconds,
    )


async def record_unattributed(
    conn: asyncpg.Connection,
    provider: str,
    kind: str,
    email: str | None,
    received_at: datetime,
    detail: dict[str, Any],
) -> None:
    await conn.execute(
        "INSERT INTO unattributed (provider, kind, email, received_at, detail)"
        " VALUES ($1, $2, $3, $4, $5)",
        provider,
        kind,
        email,
        received_at,
        detail,
    )


async def lock_message_clicks(conn: asyncpg.Connection, message_id: str) -> None:
    """Serialise click handling per message until the transaction ends: a scanner fires
    its clicks in parallel, and each must see the others to be recognised as a burst."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended('touchstream-tracker-clicks:' || $1, 0))",
        message_id,
    )


async def click_context(
    conn: asyncpg.Connection, message_id: str, url: str | None, at: datetime, window: timedelta
) -> tuple[int, datetime | None]:
    """For a click at ``at``: how many other links of the message were clicked within
    ``window`` of it (either side: provider events arrive out of order), and when the
    message was reported delivered (None when no provider said so)."""
    row = await conn.fetchrow(
        "SELECT"
        " (SELECT count(DISTINCT coalesce(detail->>'url', '')) FROM engagement_events"
        "   WHERE message_id = $1 AND type = 'clicked'"
        "   AND occurred_at BETWEEN $3::timestamptz - $4::interval"
        "   AND $3::timestamptz + $4::interval"
        "   AND coalesce(detail->>'url', '') <> coalesce($2, '')) AS other_links,"
        " (SELECT max(occurred_at) FROM engagement_events"
        "   WHERE message_id = $1 AND type = 'delivered') AS delivered_at",
        message_id,
        url,
        at,
        window,
    )
    assert row is not None
    return int(row["other_links"]), row["delivered_at"]


async def reflag_burst_clicks(
    conn: asyncpg.Connection, message_id: str, at: datetime, window: timedelta, reason: str
) -> int:
    """Flag as machine the clicks of the message within ``window`` of ``at`` that were
    taken for a person's (the first click of a scanner's burst looks like one)."""
    status = await conn.execute(
        "UPDATE engagement_events SET machine = true,"
        " detail = detail || jsonb_build_object('machine_reason', $4::text, 'reflagged', true)"
        " WHERE message_id = $1 AND type = 'clicked' AND NOT machine"
        " AND occurred_at BETWEEN $2::timestamptz - $3::interval"
        " AND $2::timestamptz + $3::interval",
        message_id,
        at,
        window,
        reason,
    )
    return int(status.split()[-1])


async def insert_rejection(
    conn: asyncpg.Connection, event: EmailFailed, bounce_type: str | None
) -> bool:
    """Record a server's refusal once per delivery key; False when already recorded."""
    inserted = await conn.fetchval(
        "INSERT INTO rejections (delivery_key, event_id, tenant_id, lead_id, enrollment_id,"
        " sequence_id, step_id, step_index, to_email, bounce_type, enhanced_status, smtp_code,"
        " reason, occurred_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)"
        " ON CONFLICT (delivery_key) DO NOTHING RETURNING true",
        event.delivery_key,
        event.event_id,
        event.tenant_id,
        event.lead_id,
        event.enrollment_id,
        event.sequence_id,
        event.step_id,
        event.step_index,
        event.to_email.lower(),
        bounce_type,
        event.enhanced_status,
        event.smtp_code,
        event.reason,
        event.occurred_at,
    )
    return bool(inserted)


async def message_by_delivery_key(
    conn: asyncpg.Connection, delivery_key: str
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE delivery_key = $1", delivery_key
    )


async def latest_messages_to(
    conn: asyncpg.Connection, email: str, mailboxes: Sequence[str]
) -> list[asyncpg.Record]:
    """The latest message sent to ``email`` per tenant, preferring (within a tenant) one
    sent from any of ``mailboxes``; dry runs excluded."""
    return await conn.fetch(
        f"SELECT DISTINCT ON (tenant_id) {MESSAGE_COLUMNS} FROM messages"
        " WHERE to_email = $1 AND NOT dry_run"
        " ORDER BY tenant_id, (lower(from_email) = ANY($2::text[])) DESC, sent_at DESC",
        email.lower(),
        [m.lower() for m in mailboxes],
    )


async def expire_parked_replies(conn: asyncpg.Connection, before: datetime) -> int:
    """Parked replies received before ``before`` that no message claimed: moved to
    ``unattributed`` (with their text), so they stay visible but stop waiting."""
    status = await conn.execute(
        "WITH gone AS (DELETE FROM parked_replies WHERE received_at < $1"
        "   RETURNING reply_key, referenced, from_email, subject, received_at, body, kind)"
        " INSERT INTO unattributed (provider, kind, email, received_at, detail)"
        " SELECT 'inbound', kind, from_email, received_at, jsonb_build_object("
        "   'reason', 'parked ' || kind || ' expired: no message of ours matched it',"
        "   'reply_key', reply_key, 'referenced', to_jsonb(referenced), 'subject', subject,"
        "   'body', left(body, 20000))"
        " FROM gone",
        before,
    )
    return int(status.split()[-1])


async def messages_for_events(
    conn: asyncpg.Connection,
    delivery_keys: Sequence[str],
    message_ids: Sequence[str],
    provider_ids: Sequence[str],
    emails: Sequence[str],
) -> tuple[
    dict[str, asyncpg.Record],
    dict[str, asyncpg.Record],
    dict[str, asyncpg.Record],
    dict[str, asyncpg.Record],
]:
    """Bulk attribution for a batch of provider events: by delivery key, Message-ID,
    provider id, and (latest message) by recipient address."""
    by_key: dict[str, asyncpg.Record] = {}
    by_id: dict[str, asyncpg.Record] = {}
    by_provider: dict[str, asyncpg.Record] = {}
    if delivery_keys or message_ids or provider_ids:
        rows = await conn.fetch(
            f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE delivery_key = ANY($1::text[])"
            " OR message_id = ANY($2::text[]) OR provider_message_id = ANY($3::text[])",
            list(delivery_keys),
            list(message_ids),
            list(provider_ids),
        )
        for row in rows:
            by_key[row["delivery_key"]] = row
            by_id[row["message_id"]] = row
            if row["provider_message_id"]:
                by_provider[row["provider_message_id"]] = row
    by_email: dict[str, asyncpg.Record] = {}
    if emails:
        rows = await conn.fetch(
            f"SELECT DISTINCT ON (to_email) {MESSAGE_COLUMNS} FROM messages"
            " WHERE to_email = ANY($1::text[]) AND NOT dry_run ORDER BY to_email, sent_at DESC",
            [e.lower() for e in emails],
        )
        by_email = {r["to_email"]: r for r in rows}
    return by_key, by_id, by_provider, by_email


async def record_unattributed_many(
    conn: asyncpg.Connection, rows: Sequence[tuple[str, str, str | None, datetime, dict[str, Any]]]
) -> None:
    if rows:
        await conn.executemany(
            "INSERT INTO unattributed (provider, kind, email, received_at, detail)"
            " VALUES ($1, $2, $3, $4, $5)",
            rows,
        )


async def park_events(
    conn: asyncpg.Connection,
    rows: Sequence[tuple[str | None, str | None, str | None, Any]],
    received_at: datetime,
) -> None:
    """Provider events whose message is not registered yet: (delivery key, Message-ID,
    provider id, the event as JSON-ready data)."""
    if rows:
        await conn.execute(
            "INSERT INTO parked_events (delivery_key, message_id, provider_message_id,"
            " received_at, event) SELECT u.k, u.m, u.p, $5, u.e::jsonb"
            " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS u(k, m, p, e)",
            [r[0] for r in rows],
            [r[1] for r in rows],
            [r[2] for r in rows],
            [json.dumps(r[3]) for r in rows],
            received_at,
        )


async def take_parked_events(
    conn: asyncpg.Connection,
    delivery_keys: Sequence[str],
    message_ids: Sequence[str],
    provider_ids: Sequence[str],
) -> list[dict[str, Any]]:
    """Parked provider events that name any of these messages, removed, oldest first."""
    rows = await conn.fetch(
        "DELETE FROM parked_events WHERE delivery_key = ANY($1::text[])"
        " OR message_id = ANY($2::text[]) OR provider_message_id = ANY($3::text[])"
        " RETURNING id, event",
        list(delivery_keys),
        list(message_ids),
        list(provider_ids),
    )
    return [r["event"] for r in sorted(rows, key=lambda r: r["id"])]


async def expire_parked_events(conn: asyncpg.Connection, before: datetime) -> int:
    """Parked provider events no message claimed before ``before``: into ``unattributed``."""
    status = await conn.execute(
        "WITH gone AS (DELETE FROM parked_events WHERE received_at < $1 RETURNING event)"
        " INSERT INTO unattributed (provider, kind, email, received_at, detail)"
        " SELECT event->>'provider', event->>'type', event->>'email',"
        "   (event->>'occurred_at')::timestamptz, jsonb_build_object("
        "   'reason', 'parked provider event expired: no message of ours matched it',"
        "   'provider_event_id', event->>'provider_event_id',"
        "   'delivery_key', event->>'delivery_key', 'message_id', event->>'message_id')"
        " FROM gone",
        before,
    )
    return int(status.split()[-1])
