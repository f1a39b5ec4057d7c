"""The shared runtime on real PostgreSQL and a real Kafka-protocol broker: migrations,
the outbox relay, the consumer wrapper (inbox, DLQ, transient retries, poison)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import topics
from schemas.events import Event, LeadData, LeadReceived
from services.runtime.consumer import EventConsumer, Rejection
from services.runtime.db import create_pool, migrate, migrate_dsn
from services.runtime.kafka import OutgoingRecord, create_topics, new_broker, publish_all
from services.runtime.outbox import OutboxRelay, enqueue_many

pytestmark = pytest.mark.integration

SERVICE_MIGRATIONS = {
    name: Path(__file__).resolve().parents[2] / "services" / name / "migrations"
    for name in ("router", "nurture", "sender", "tracker")
}


async def test_every_service_schema_migrates_from_scratch_and_only_once(
    database_url: str,
) -> None:
    for name, directory in SERVICE_MIGRATIONS.items():
        applied = await migrate_dsn(database_url, name, directory)
        assert applied[0] == "runtime/0001_outbox_inbox.sql"
        assert len(applied) == 1 + len(list(directory.glob("*.sql")))
        assert await migrate_dsn(database_url, name, directory) == []
    conn = await asyncpg.connect(database_url)
    try:
        tables = {
            (r["table_schema"], r["table_name"])
            for r in await conn.fetch(
                "SELECT table_schema, table_name FROM information_schema.tables"
                " WHERE table_schema IN ('router', 'nurture', 'sender', 'tracker')"
            )
        }
    finally:
        await conn.close()
    for schema in SERVICE_MIGRATIONS:
        assert {(schema, "outbox"), (schema, "inbox"), (schema, "schema_migrations")} <= tables
    assert ("router", "leads") in tables and ("nurture", "enrollments") in tables
    assert ("sender", "deliveries") in tables and ("tracker", "messages") in tables


async def test_concurrent_migrations_apply_each_file_once(database_url: str) -> None:
    directory = SERVICE_MIGRATIONS["nurture"]
    results = await asyncio.gather(
        *(migrate_dsn(database_url, "nurture", directory) for _ in range(4))
    )
    expected = 1 + len(list(directory.glob("*.sql")))
    assert sorted(len(r) for r in results) == [0, 0, 0, expected]


async def test_an_edited_migration_is_refused(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_things.sql").write_text("CREATE TABLE things (id int);")
    await migrate_dsn(database_url, "svc", tmp_path)
    (tmp_path / "0001_things.sql").write_text("CREATE TABLE things (id bigint);")
    with pytest.raises(RuntimeError, match="forward-only"):
        await migrate_dsn(database_url, "svc", tmp_path)


# ----------------------------------------------------------------- a tiny service


@pytest.fixture
async def pool(database_url: str, tmp_path: Path) -> AsyncIterator[asyncpg.Pool]:
    (tmp_path / "0001_applied.sql").write_text(
        "CREATE TABLE applied (event_id uuid, email text, at timestamptz DEFAULT now());"
    )
    pool = await create_pool(database_url, "svc", size=4)
    async with pool.acquire() as conn:
        await migrate(conn, "svc", tmp_path)
    yield pool
    await pool.close()


async def _read(bootstrap: str, topic: str, expect: int, timeout: float = 15) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while len(records) < expect and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records += batch
        return records
    finally:
        await consumer.stop()


def _lead(email: str) -> LeadReceived:
    return LeadReceived(lead=LeadData(email=email), sequence="aggressive_close")


async def test_relay_publishes_committed_rows_in_order_and_one_relay_leads(
    pool: asyncpg.Pool, database_url: str, kafka_bootstrap: str
) -> None:
    await create_topics(kafka_bootstrap, 3)
    broker = new_broker(kafka_bootstrap, "test-relay")
    await broker.start()
    stop = asyncio.Event()
    relays = [OutboxRelay(database_url, "svc", broker, batch_size=50) for _ in range(2)]
    tasks = [asyncio.create_task(r.run(stop)) for r in relays]
    try:
        events = [_lead("same@example.com") for _ in range(120)]
        async with pool.acquire() as conn:
            async with conn.transaction():
                await enqueue_many(conn, [(topics.LEADS, e) for e in events[:60]])
            # A rolled-back transaction publishes nothing.
            with pytest.raises(RuntimeError):
                async with conn.transaction():
                    await enqueue_many(conn, [(topics.LEADS, _lead("ghost@example.com"))])
                    raise RuntimeError("rollback")
            async with conn.transaction():
                await enqueue_many(conn, [(topics.LEADS, e) for e in events[60:]])
        records = await _read(kafka_bootstrap, topics.LEADS, 120)
        assert [r.value for r in records] == [e.to_bytes() for e in events]  # one key: in order
        assert sum(r.is_leader for r in relays) == 1
        unpublished = await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        assert unpublished == 0
        assert b"ghost@example.com" not in b"".join(r.value for r in records)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await broker.stop()


class Recorder:
    """A handler that records what it applied and can be told to fail."""

    def __init__(self) -> None:
        self.transient_failures = 0
        self.poison: set[str] = set()
        self.reject: set[str] = set()
        self.calls = 0

    async def __call__(self, conn: asyncpg.Connection, events: list[Any]) -> list[Rejection]:
        self.calls += 1
        if self.transient_failures:
            self.transient_failures -= 1
            raise ConnectionResetError("database went away")
        rejections = []
        for event in events:
            if event.lead.email in self.poison:
                raise KeyError("a bug that only this event triggers")
            if event.lead.email in self.reject:
                rejections.append(Rejection(event, "rule: rejected address"))
                continue
            await conn.execute(
                "INSERT INTO applied (event_id, email) VALUES ($1, $2)",
                event.event_id,
                event.lead.email,
            )
        return rejections


async def _consume_until(
    pool: asyncpg.Pool,
    kafka: str,
    recorder: Recorder,
    records: list[tuple[bytes, bytes]],
    *,
    applied: int,
    dead: int,
) -> tuple[list[asyncpg.Record], list[Any]]:
    await create_topics(kafka, 2)
    broker = new_broker(kafka, "test-consumer")
    EventConsumer(
        service="svc",
        pool=pool,
        broker=broker,
        handlers={topics.LEADS: recorder},
        session_timeout_ms=3000,
        max_batch=50,
    )
    await broker.start()
    try:
        await publish_all(
            broker, [OutgoingRecord(topics.LEADS, key, value) for key, value in records]
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if await pool.fetchval("SELECT count(*) FROM applied") >= applied:
                break
            await asyncio.sleep(0.1)
        dead_letters = await _read(kafka, topics.dlq(topics.LEADS), dead)
        await asyncio.sleep(0.5)  # nothing more may arrive
        rows = await pool.fetch("SELECT event_id, email FROM applied ORDER BY at")
        return rows, dead_letters
    finally:
        await broker.stop()


def _record(event: Event) -> tuple[bytes, bytes]:
    return event.kafka_key(), event.to_bytes()


async def test_the_relays_statements_look_rows_up_by_index_on_a_grown_outbox(
    pool: asyncpg.Pool, database_url: str
) -> None:
    """The outbox grows from empty in a burst: plans the leader's connection caches
    while it is small (generic, after five executions of batches alike) must still
    use the indexes once it has grown, not scan the whole table at every batch."""
    from services.runtime.outbox import PUBLISHED, UNPUBLISHED

    relay = OutboxRelay(database_url, "svc", new_broker("127.0.0.1:1", "unused"))
    conn = await relay.connect()
    try:
        insert = (
            "INSERT INTO outbox (topic, kafka_key, payload, event_id, event_type)"
            " SELECT 't', 'k', 'p', gen_random_uuid(), 'E' FROM generate_series(1, $1::int)"
        )
        base = await conn.fetchval("SELECT coalesce(max(id), 0) FROM outbox")
        for n in range(8):  # batches of nine, as a relay publishes them under load
            await conn.execute(insert, 9)
            await conn.fetch(UNPUBLISHED, 1000)
            await conn.execute(PUBLISHED, list(range(base + n * 9 + 1, base + n * 9 + 10)))
        await conn.execute(insert, 5000)
        for sql, args in ((PUBLISHED, "'{1,2,3}'"), (UNPUBLISHED, "1000")):
            name = await conn.fetchval(
                "SELECT name FROM pg_prepared_statements WHERE statement = $1", sql
            )
            assert name is not None
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE {name}({args})"))
            assert "Seq Scan" not in plan, plan
            assert "Index" in plan, plan
    finally:
        await conn.execute("DELETE FROM outbox")
        await conn.close()


async def test_consumer_dedupes_dead_letters_and_keeps_going(
    pool: asyncpg.Pool, kafka_bootstrap: str
) -> None:
    recorder = Recorder()
    recorder.reject = {"reject@example.com"}
    good = [_lead(f"lead{i}@example.com") for i in range(5)]
    records = [
        _record(good[0]),
        (b"x", b"{not json"),
        _record(good[1]),
        _record(good[1]),  # redelivered: same event_id
        _record(_lead("reject@example.com")),
        *[_record(e) for e in good[2:]],
    ]
    rows, dead = await _consume_until(pool, kafka_bootstrap, recorder, records, applied=5, dead=2)
    assert sorted(r["email"] for r in rows) == sorted(e.lead.email for e in good)
    reasons = sorted(dict(r.headers)["dlq-reason"].decode() for r in dead)
    assert reasons[0].startswith("invalid event") and reasons[1] == "rule: rejected address"
    assert {r.value for r in dead} >= {b"{not json"}
    # A rejected event is not remembered as applied: a replay after a fix re-evaluates it.
    inbox = await pool.fetchval("SELECT count(*) FROM inbox WHERE consumer = 'svc'")
    assert inbox == 5


async def test_transient_failures_are_retried_not_dead_lettered(
    pool: asyncpg.Pool, kafka_bootstrap: str
) -> None:
    recorder = Recorder()
    recorder.transient_failures = 3
    events = [_lead(f"t{i}@example.com") for i in range(4)]
    rows, dead = await _consume_until(
        pool, kafka_bootstrap, recorder, [_record(e) for e in events], applied=4, dead=0
    )
    assert sorted(r["email"] for r in rows) == sorted(e.lead.email for e in events)
    assert dead == [] and recorder.calls >= 4


async def test_a_poison_event_is_isolated_and_its_neighbours_applied(
    pool: asyncpg.Pool, kafka_bootstrap: str
) -> None:
    recorder = Recorder()
    recorder.poison = {"poison@example.com"}
    events = [_lead("a@example.com"), _lead("poison@example.com"), _lead("b@example.com")]
    # One key, one partition: the three arrive in one batch.
    records = [(b"same", e.to_bytes()) for e in events]
    rows, dead = await _consume_until(pool, kafka_bootstrap, recorder, records, applied=2, dead=1)
    assert sorted(r["email"] for r in rows) == ["a@example.com", "b@example.com"]
    assert len(dead) == 1
    assert dict(dead[0].headers)["dlq-reason"].decode().startswith("handler error: KeyError")
    assert uuid.UUID(str(events[1].event_id))


class OrderRecorder:
    """Applies events and records their order: a batch holding an even step of the
    hot lead is slow, so one holding its next step would overtake it if the consumer
    let them run side by side. The first ``failures`` batches fail as under a bad
    deploy (the batch, then each of its events on its own), so the consumer rewinds
    the partition instead of dead-lettering anything."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.failing: set[uuid.UUID] = set()
        self.running = 0
        self.most_running = 0

    async def __call__(self, conn: asyncpg.Connection, events: list[Any]) -> None:
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            slow = any(e.lead.email == HOT and e.lead.custom_fields["seq"] % 2 == 0 for e in events)
            await asyncio.sleep(0.1 if slow else 0.005)
            ids = {e.event_id for e in events}
            if len(events) > 1 and self.failures > 0:
                self.failures -= 1
                self.failing |= ids
                raise RuntimeError("this deploy cannot apply anything")
            if len(events) == 1 and ids <= self.failing:
                self.failing -= ids
                raise RuntimeError("this deploy cannot apply anything")
            await conn.executemany(
                "INSERT INTO ordered (lead, seq) VALUES ($1, $2)",
                [(e.lead.email, e.lead.custom_fields["seq"]) for e in events],
            )
        finally:
            self.running -= 1


HOT = "hot@example.com"


async def test_each_leads_events_apply_in_order_while_other_leads_overlap(
    pool: asyncpg.Pool, kafka_bootstrap: str
) -> None:
    """Batches of one partition run side by side when they share no lead; a lead's
    events apply in offset order, every event once, also across a failed batch that
    rewinds the partition."""
    await pool.execute("CREATE TABLE ordered (id bigserial, lead text, seq int)")
    await create_topics(kafka_bootstrap, 1)
    leads = [f"lead{n}@example.com" for n in range(35)]
    regular = iter(
        LeadReceived(lead=LeadData(email=lead, custom_fields={"seq": seq}))
        for seq in range(4)
        for lead in leads
    )
    events: list[LeadReceived] = []
    for position in range(160):  # batches of 4: the hot lead in every other batch
        if position % 8 == 0:
            step = position // 8
            events.append(LeadReceived(lead=LeadData(email=HOT, custom_fields={"seq": step})))
        else:
            events.append(next(regular))
    recorder = OrderRecorder(failures=3)
    broker = new_broker(kafka_bootstrap, "test-consumer")
    consumer = EventConsumer(
        service="svc",
        pool=pool,
        broker=broker,
        handlers={topics.LEADS: recorder},
        session_timeout_ms=3000,
        max_batch=4,
        concurrency=3,
    )
    await broker.start()
    try:
        await publish_all(
            broker,
            [OutgoingRecord(topics.LEADS, e.lead.email.encode(), e.to_bytes()) for e in events],
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if await pool.fetchval("SELECT count(*) FROM ordered") >= len(events):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # nothing more may arrive
    finally:
        await broker.stop()
    rows = await pool.fetch("SELECT lead, seq FROM ordered ORDER BY id")
    assert len(rows) == len(events)
    assert [r["seq"] for r in rows if r["lead"] == HOT] == list(range(20))
    for lead in leads:
        assert [r["seq"] for r in rows if r["lead"] == lead] == list(range(4)), lead
    assert recorder.failures == 0 and consumer.stats.dead_lettered == 0
    assert recorder.most_running > 1, "batches of other leads never overlapped"
