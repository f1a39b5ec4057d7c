"""Enrollment intake: `LeadRouted` events on `lead-routed` become enrollments through
the production path (the EventConsumer's batch consumption, one transaction per
batch with its inbox rows, `handle_lead_routed`'s batched writes). Prints the
throughput in leads/s, from the first batch's commit until every enrollment is in
the table, and the start-up before it separately.
Baseline in the same run: the naive path, one lead per transaction (inbox row, lead
row and enrollment row inserted one at a time) on a sample, so the figure says what
batching buys. For reference it also prints the consumer's own floor (the same
consumer with a handler that does nothing: decode, inbox rows, commit) and the CPU
the consumer process and PostgreSQL spent per lead.

The consumer joins its group first: with the local broker that takes about half the
session timeout (6 s here, as in the dev stack), once per consumer start. That is
start-up, not throughput, so it is reported on its own line, with the rate it
would give counted in. The bench waits on the consumer's after-commit hook (so that
polling does not load the database), then checks that `SELECT count(*) FROM
enrollments` is N.

    python -m bench.intake [--leads 100000] [--naive-sample 5000] [--partitions 4]
                           [--batch 500] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from bench.proc import cpu_seconds
from schemas import topics
from schemas.events import LeadRouted, LeadSnapshot, decode
from services.nurture import handlers, repo
from services.nurture.domain import company_domain
from services.nurture.presets import PRESETS
from services.runtime.consumer import EventConsumer, Rejection
from services.runtime.db import create_pool, migrate
from services.runtime.devstack import Stack
from services.runtime.kafka import create_topics, new_broker
from services.runtime.settings import CommonSettings

MIGRATIONS = Path(handlers.__file__).parent / "migrations"
SEQUENCE = "cold_outreach"
TARGET = 20_000.0


def _events(count: int) -> list[LeadRouted]:
    return [
        LeadRouted(
            lead_id=uuid.uuid4(),
            lead=LeadSnapshot(
                email=f"lead{n}@company{n % 5000}.example",
                external_id=f"crm-{n}",
                first_name="Ada",
                last_name="Lovelace",
                company=f"Company {n % 5000}",
                title="CTO",
                timezone="Europe/London",
            ),
            sequence=SEQUENCE,
            routing_reason="default: cold_outreach",
        )
        for n in range(count)
    ]


async def _prepare_schema(dsn: str, schema: str) -> asyncpg.Pool:
    pool = await create_pool(dsn, schema, size=10)
    async with pool.acquire() as conn:
        await migrate(conn, schema, MIGRATIONS)
        async with conn.transaction():
            for preset in PRESETS.values():
                await repo.ensure_preset(conn, "default", preset)
    return pool


async def _publish(kafka: str, payloads: list[tuple[bytes, bytes]]) -> float:
    """Publish (key, value) records without awaiting each send; returns seconds."""
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka, linger_ms=5, max_batch_size=1024 * 1024, acks=1
    )
    await producer.start()
    try:
        started = time.perf_counter()
        futures = [
            await producer.send(topics.LEAD_ROUTED, value, key=key) for key, value in payloads
        ]
        await producer.flush()
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def _naive(pool: asyncpg.Pool, payloads: list[tuple[bytes, bytes]]) -> float:
    """One lead per transaction: decode, inbox row, lead row, enrollment row."""
    now = datetime.now(UTC)
    async with pool.acquire() as conn:
        sequence = await repo.active_sequence(conn, "default", SEQUENCE)
        assert sequence is not None
        started = time.perf_counter()
        for _key, value in payloads:
            event = decode(topics.LEAD_ROUTED, value)
            assert isinstance(event, LeadRouted)
            snapshot = event.lead.model_dump(mode="json")
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO inbox (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                    "nurture",
                    event.event_id,
                )
                await conn.execute(
                    "INSERT INTO leads (tenant_id, lead_id, email, snapshot, updated_at)"
                    " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (tenant_id, lead_id) DO UPDATE"
                    " SET email = excluded.email, snapshot = excluded.snapshot,"
                    " updated_at = excluded.updated_at",
                    event.tenant_id,
                    event.lead_id,
                    event.lead.email,
                    snapshot,
                    now,
                )
                await conn.execute(
                    "INSERT INTO enrollments (id, tenant_id, lead_id, sequence_id,"
                    " sequence_version_id, sequence_key, version, lead, status,"
                    " next_action_at, enrolled_at, last_activity_at, company_domain)"
                    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'active', $9, $9, $9, $10)"
                    " ON CONFLICT (tenant_id, lead_id, sequence_id)"
                    "   WHERE status IN ('active', 'awaiting_send', 'paused') DO NOTHING",
                    uuid.uuid4(),
                    event.tenant_id,
                    event.lead_id,
                    sequence["id"],
                    sequence["version_id"],
                    sequence["key"],
                    sequence["version"],
                    snapshot,
                    now,
                    company_domain(event.lead.email),
                )
        elapsed = time.perf_counter() - started
        count = await conn.fetchval("SELECT count(*) FROM enrollments")
        assert count == len(payloads), (count, len(payloads))
    return elapsed


def _server_cpu(postmaster: int) -> float:
    """CPU seconds used so far by the PostgreSQL server's processes."""
    return cpu_seconds({"postgres": postmaster})["postgres"]


class _Timings:
    """Seconds spent in (instrumented) product functions, for --profile."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.batch_sizes: list[int] = []

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - started)

        return timed


@contextmanager
def _instrumented(timings: _Timings, consumer: EventConsumer) -> Iterator[None]:
    """Time the repo calls the handler makes and the consumer's transaction, by
    wrapping them on their module/instance for the duration (no product change)."""
    names = ("upsert_leads", "active_sequence", "suppressed_leads", "insert_enrollments")
    originals = {name: getattr(repo, name) for name in names}
    apply = consumer._apply
    process = consumer.process
    try:
        for name in names:
            setattr(repo, name, timings.wrap(f"repo.{name}", originals[name]))
        timed_apply = timings.wrap("consumer._apply (txn)", apply)
        consumer._apply = timed_apply  # type: ignore[method-assign,assignment]

        async def counted(records: Any) -> None:
            timings.batch_sizes.append(len(records))
            await timings.wrap("consumer.process (decode+txn)", process)(records)

        consumer.process = counted  # type: ignore[method-assign]
        yield
    finally:
        for name, fn in originals.items():
            setattr(repo, name, fn)
        consumer._apply = apply  # type: ignore[method-assign]
        consumer.process = process  # type: ignore[method-assign]


async def _floor(kafka: str, pool: asyncpg.Pool, leads: int, batch: int, consumers: int) -> float:
    """The consumer alone: the same topic, decoded and recorded in the inbox in one
    transaction per batch, with a handler that writes nothing. Steady leads/s."""

    async def nothing(conn: asyncpg.Connection, events: list[Any]) -> None:
        return None

    marks: list[tuple[float, int]] = []
    done = asyncio.Event()

    def committed() -> None:
        marks.append((time.perf_counter(), consumer.stats.applied))
        if consumer.stats.applied >= leads:
            done.set()

    broker = new_broker(kafka, "touchstream-nurture-floor")
    consumer = EventConsumer(
        service="nurture-floor",
        pool=pool,
        broker=broker,
        handlers={topics.LEAD_ROUTED: nothing},
        after_commit=committed,
        max_batch=batch,
        session_timeout_ms=6000,
        concurrency=consumers,
    )
    try:
        await broker.start()
        await asyncio.wait_for(done.wait(), 600)
    finally:
        await consumer.close()  # as the services do: commit, then leave the group
        await broker.stop()
    # From the end of the first batch: the group join is not the consumer's cost.
    (first_at, first_count), (last_at, last_count) = marks[0], marks[-1]
    return (last_count - first_count) / max(last_at - first_at, 1e-9)


async def _production(
    dsn: str,
    kafka: str,
    pool: asyncpg.Pool,
    leads: int,
    batch: int,
    consumers: int,
    profile: bool,
    postmaster: int,
) -> dict[str, Any]:
    handled = 0.0

    async def on_lead_routed(conn: asyncpg.Connection, events: list[Any]) -> list[Rejection]:
        nonlocal handled
        started = time.perf_counter()
        try:
            return await handlers.handle_lead_routed(conn, events, now=datetime.now(UTC))
        finally:
            handled += time.perf_counter() - started

    commits: list[tuple[float, int]] = []
    caught_up = asyncio.Event()

    def committed() -> None:
        # Called by the consumer after each batch's commit: lets the bench wait without
        # loading the database, then confirm with count(*).
        commits.append((time.perf_counter(), consumer.stats.applied))
        if consumer.stats.applied >= leads:
            caught_up.set()

    broker = new_broker(kafka, "touchstream-nurture-bench")
    consumer = EventConsumer(
        service="nurture",
        pool=pool,
        broker=broker,
        handlers={topics.LEAD_ROUTED: on_lead_routed},
        after_commit=committed,
        max_batch=batch,
        session_timeout_ms=6000,
        concurrency=consumers,
    )
    watcher = await asyncpg.connect(dsn, server_settings={"search_path": "nurture"})
    timings = _Timings()
    profiler = cProfile.Profile() if profile else None
    try:
        with _instrumented(timings, consumer) if profile else _nothing():
            if profiler is not None:
                profiler.enable()
            cpu = (time.process_time(), _server_cpu(postmaster))
            started = time.perf_counter()
            await broker.start()
            await asyncio.wait_for(caught_up.wait(), 600)
            count = 0
            for _ in range(1000):
                count = int(await watcher.fetchval("SELECT count(*) FROM enrollments"))
                if count >= leads:
                    break
                await asyncio.sleep(0.01)
            finished = time.perf_counter()
            if count != leads:
                raise RuntimeError(f"{count} enrollments for {leads} leads")
            cpu = (time.process_time() - cpu[0], _server_cpu(postmaster) - cpu[1])
            if profiler is not None:
                profiler.disable()
    finally:
        await consumer.close()  # as the services do: commit, then leave the group
        await broker.stop()
        await watcher.close()
    first = commits[0]
    result: dict[str, Any] = {
        "elapsed": finished - started,
        "startup": first[0] - started,
        "first_batch": first[1],
        "steady_rate": (leads - first[1]) / max(finished - first[0], 1e-9),
        "batches": consumer.stats.batches,
        "dead": consumer.stats.dead_lettered,
        "handler_seconds": handled,
        "client_cpu": cpu[0],
        "server_cpu": cpu[1],
    }
    if profile:
        result["timings"] = timings
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
            result["profile"] = out.getvalue()
    return result


@contextmanager
def _nothing() -> Iterator[None]:
    yield


async def run(
    leads: int, sample: int, partitions: int, batch: int, consumers: int, profile: bool
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="touchstream-bench-"))
    stack = Stack(root)
    try:
        database_url = await asyncio.to_thread(stack.start_postgres)
        kafka = await asyncio.to_thread(stack.start_kafka)
        await create_topics(
            kafka, partitions, names=[topics.LEAD_ROUTED, topics.dlq(topics.LEAD_ROUTED)]
        )
        postmaster = stack.processes["postgres"].pid
        pool = await _prepare_schema(database_url, "nurture")
        naive_pool = await _prepare_schema(database_url, "nurture_naive")
        floor_pool = await _prepare_schema(database_url, "nurture_floor")
        events = _events(leads)
        payloads = [(e.kafka_key(), e.to_bytes()) for e in events]
        del events
        try:
            naive_seconds = await _naive(naive_pool, payloads[: min(sample, leads)])
            publish_seconds = await _publish(kafka, payloads)
            result = await _production(
                database_url, kafka, pool, leads, batch, consumers, profile, postmaster
            )
            result["floor_rate"] = await _floor(kafka, floor_pool, leads, batch, consumers)
            result["naive_rate"] = min(sample, leads) / naive_seconds
            result["publish_rate"] = leads / publish_seconds
        finally:
            for p in (pool, naive_pool, floor_pool):
                await p.close()
        return result
    finally:
        stack.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def _verdict(rate: float) -> str:
    return "met" if rate >= TARGET else f"NOT met ({rate / TARGET:.0%} of it)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leads", type=int, default=100_000)
    parser.add_argument("--naive-sample", type=int, default=5000, help="leads for the baseline")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of lead-routed")
    parser.add_argument("--batch", type=int, default=500, help="consumer max_records")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=CommonSettings.model_fields["kafka_consumer_concurrency"].default,
        help="partitions applied side by side (KAFKA_CONSUMER_CONCURRENCY)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="time the SQL calls and cProfile the consumer"
    )
    args = parser.parse_args()
    r = asyncio.run(
        run(
            args.leads,
            args.naive_sample,
            args.partitions,
            args.batch,
            args.concurrency,
            args.profile,
        )
    )
    rate = args.leads / r["elapsed"]
    steady = r["steady_rate"]
    print(
        f"enrollment intake ({args.leads} LeadRouted on {args.partitions} partitions,"
        f" batches of up to {args.batch}, {args.concurrency} partition(s) applied side by side,"
        " one transaction per partition of a batch):"
    )
    print(f"  published       : {r['publish_rate']:8.0f} events/s (aiokafka, before consuming)")
    print(
        f"  throughput      : {steady:8.0f} leads/s (production path, from the first batch's"
        f" commit to the last enrollment), {r['batches']} batches, dead-lettered {r['dead']}"
    )
    print(
        f"  start-up        : {r['startup']:.2f} s to the first batch of {r['first_batch']}"
        " (the consumer group's join, once per consumer start); counting it:"
        f" {rate:.0f} leads/s over {r['elapsed']:.2f} s"
    )
    print(
        f"  handler time    : {r['handler_seconds']:.2f} s in handle_lead_routed"
        f" ({r['handler_seconds'] / r['elapsed']:.0%} of the wall time)"
    )
    print(
        f"  CPU per lead    : consumer process {r['client_cpu'] / args.leads * 1e6:.0f} us,"
        f" PostgreSQL {r['server_cpu'] / args.leads * 1e6:.0f} us"
        f" (wall {r['elapsed'] / args.leads * 1e6:.0f} us; {os.cpu_count()} CPUs)"
    )
    print(
        f"  consumer floor  : {r['floor_rate']:8.0f} leads/s (steady; the same consumer with a"
        " handler that writes nothing)"
    )
    print(
        f"  baseline        : {r['naive_rate']:8.0f} leads/s, one lead per transaction"
        f" ({args.naive_sample} leads, database only: no Kafka, no consumer)"
    )
    print(
        f"  ratio           : {steady / r['naive_rate']:.1f}x the naive path"
        f" ({rate / r['naive_rate']:.1f}x counting the start-up)"
    )
    print(f"  target          : >= {TARGET:.0f} leads/s: {_verdict(steady)}")
    if args.profile:
        timings: _Timings = r["timings"]
        sizes = timings.batch_sizes
        if sizes:
            print(
                f"  batches         : {len(sizes)}, mean {sum(sizes) / len(sizes):.0f} records,"
                f" max {max(sizes)}"
            )
        for name, seconds in sorted(timings.seconds.items(), key=lambda kv: -kv[1]):
            calls = timings.calls[name]
            print(
                f"  {name:<40}: {seconds:6.2f} s, {calls:5d} calls,"
                f" {seconds / calls * 1000:7.2f} ms/call"
            )
        print(r["profile"])


if __name__ == "__main__":
    main()
