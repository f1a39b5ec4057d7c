"""Nurture announces its sequences to the router (SequenceChanged on `sequences`,
through its outbox): on create, activate, pause, archive, delete, every new version,
and for the presets it seeds; a deployment upgraded in place announces the sequences
it has already, once. Real PostgreSQL, a real Kafka-protocol broker."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from schemas import topics
from schemas.events import (
    PRESET_SEQUENCE_KEYS,
    LeadRouted,
    LeadSnapshot,
    SequenceChanged,
    decode,
)
from services.nurture import handlers
from services.nurture.app import NurtureService
from services.nurture.presets import PRESETS
from services.runtime.db import migrate

pytestmark = pytest.mark.integration

MIGRATIONS = Path(__file__).resolve().parents[2] / "services" / "nurture" / "migrations"
STEPS = [
    {"key": "e1", "type": "email", "subject": "Hello", "text": "Hi"},
    {"key": "w1", "type": "wait", "days": 1},
    {"key": "e2", "type": "email", "subject": "Again", "text": "Hi again"},
]


async def announced(pool: asyncpg.Pool, after: int = 0) -> list[tuple[int, SequenceChanged]]:
    """SequenceChanged events in the outbox (id, event), oldest first."""
    rows = await pool.fetch(
        "SELECT id, topic, kafka_key, payload FROM outbox"
        " WHERE event_type = 'SequenceChanged' AND id > $1 ORDER BY id",
        after,
    )
    found = []
    for row in rows:
        assert row["topic"] == topics.SEQUENCES
        event = decode(topics.SEQUENCES, row["payload"])
        assert isinstance(event, SequenceChanged)
        assert row["kafka_key"] == f"{event.tenant_id}:{event.sequence_key}".encode()
        found.append((row["id"], event))
    return found


def summary(events: list[tuple[int, SequenceChanged]]) -> list[tuple[Any, ...]]:
    return [(e.tenant_id, e.sequence_key, e.status, e.current_version) for _, e in events]


def test_the_router_and_nurture_agree_on_the_presets() -> None:
    assert set(PRESET_SEQUENCE_KEYS) == set(PRESETS)


async def test_every_change_of_a_sequence_is_announced(
    client: httpx.AsyncClient, nurture: NurtureService
) -> None:
    seeded = await announced(nurture.pool)
    assert sorted(summary(seeded)) == sorted(
        ("default", key, "active", 1) for key in PRESET_SEQUENCE_KEYS
    )
    last = seeded[-1][0]

    async def step(response: Any, expected: list[tuple[Any, ...]]) -> None:
        nonlocal last
        result = await response
        assert result.status_code < 300, result.text
        events = await announced(nurture.pool, last)
        assert summary(events) == expected
        last = events[-1][0] if events else last

    base = "/sequences/flow"
    await step(
        client.post("/sequences", json={"key": "flow", "name": "Flow", "steps": STEPS}),
        [("default", "flow", "draft", 1)],
    )
    await step(client.post(f"{base}/activate"), [("default", "flow", "active", 1)])
    await step(
        client.patch(f"{base}/steps/e2", json={"subject": "Changed"}),
        [("default", "flow", "active", 2)],
    )
    await step(
        client.patch(base, json={"settings": {"company_stop": True}}),
        [("default", "flow", "active", 3)],
    )
    await step(client.post(f"{base}/pause"), [("default", "flow", "paused", 3)])
    await step(client.post(f"{base}/archive"), [("default", "flow", "archived", 3)])
    await step(
        client.post(f"{base}/duplicate", json={"key": "flow_copy"}),
        [("default", "flow_copy", "draft", 1)],
    )
    await step(client.delete("/sequences/flow_copy"), [("default", "flow_copy", "deleted", None)])
    await step(
        client.post("/sequences", params={"tenant_id": "acme"}, json={"key": "x", "name": "X"}),
        [("acme", "x", "draft", 1)],
    )
    flow_id = (await client.get(base)).json()["id"]
    flow = [e for _, e in await announced(nurture.pool) if e.sequence_key == "flow"]
    assert {e.sequence_id for e in flow} == {uuid.UUID(flow_id)}
    # The router keeps the latest change by occurred_at: each change is later.
    times = [e.occurred_at for e in flow]
    assert times == sorted(times) and len(set(times)) == len(times)

    # Refused changes announce nothing: their transaction wrote nothing.
    refused = await client.post(f"{base}/pause")
    assert refused.status_code == 409
    assert await announced(nurture.pool, last) == []


async def test_a_preset_created_on_first_use_is_announced(
    nurture: NurtureService,
) -> None:
    before = (await announced(nurture.pool))[-1][0]
    event = LeadRouted(
        tenant_id="acme",
        lead_id=uuid.uuid4(),
        lead=LeadSnapshot(email="ada@acme.example"),
        sequence="regular_nurture",
        routing_reason="test",
    )
    async with nurture.pool.acquire() as conn, conn.transaction():
        assert await handlers.handle_lead_routed(conn, [event], now=nurture.clock.now()) == []
    assert summary(await announced(nurture.pool, before)) == [
        ("acme", "regular_nurture", "active", 1)
    ]


async def test_an_upgraded_deployment_announces_the_sequences_it_has(
    database_url: str, tmp_path: Path
) -> None:
    """Sequences created before nurture announced anything are announced once, by the
    migration that comes with the catalog."""
    earlier = tmp_path / "migrations"
    earlier.mkdir()
    for path in sorted(MIGRATIONS.glob("*.sql")):
        if path.name < "0005":
            shutil.copy(path, earlier / path.name)
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, "nurture", earlier)
        flow, draft = uuid.uuid4(), uuid.uuid4()
        await conn.execute(
            "INSERT INTO nurture.sequences (id, tenant_id, key, name, status, current_version)"
            " VALUES ($1, 'default', 'flow', 'Flow', 'active', 3),"
            " ($2, 'acme', 'idea', 'Idea', 'draft', 1)",
            flow,
            draft,
        )
        assert "0005_announce_sequences.sql" in await migrate(conn, "nurture", MIGRATIONS)
        rows = await conn.fetch(
            "SELECT topic, kafka_key, payload, event_id FROM nurture.outbox ORDER BY id"
        )
        events = [decode(r["topic"], r["payload"]) for r in rows]
        assert all(isinstance(e, SequenceChanged) for e in events)
        assert [
            (e.tenant_id, e.sequence_key, e.sequence_id, e.status, e.current_version)
            for e in events
            if isinstance(e, SequenceChanged)
        ] == [
            ("acme", "idea", draft, "draft", 1),
            ("default", "flow", flow, "active", 3),
        ]
        assert [r["kafka_key"] for r in rows] == [b"acme:idea", b"default:flow"]
        assert [r["event_id"] for r in rows] == [e.event_id for e in events]
        assert len({e.event_id for e in events}) == 2
        assert await migrate(conn, "nurture", MIGRATIONS) == []  # once
    finally:
        await conn.close()
