"""Scheduler: nurture's claim of due enrollments and its sustained StepDue emission,
over a table of a million enrollments, and the outbox relay that publishes them.

  (a) `repo.claim_due(conn, now, 1000)` in a transaction that is rolled back, 200
      times over 1% due rows: p50/p99 (target p99 <= 20 ms);
  (b) `handlers.run_due(conn, now=..., limit=1000, steps=StepCache())`, one
      transaction per round as the scheduler loops run it (`--loops`, by default
      as many as a nurture process runs: NURTURE_SCHEDULER_LOOPS), until nothing is due
      (`--due` enrollments, one email each): StepDue/s written to the outbox
      (target >= 10,000/s); then the OutboxRelay publishing them to the broker:
      published/s.

Baseline in the same run: procrastinate (a PostgreSQL job queue) on the same server,
in its own database: the same number of no-op jobs deferred in batches, then one
worker (concurrency 10) run until the queue is drained: jobs/s.

The table: `--enrollments` rows on the cold_outreach preset (8 weekly emails), lead
snapshots with email/first_name/company; 1% due now, `--due` in all within the next
hour (each at an email step, its earlier emails in enrollment_emails), the rest
active and due over the next 49 days, or awaiting a send, completed or stopped.

    python -m bench.scheduler [--enrollments 1000000] [--due 50000] [--claims 200]
                              [--jobs N] [--loops 2] [--profile]

With --profile it prints the time spent in each part of a round. A full run takes
about two and a half minutes on 2 cores (the procrastinate drain is most of it).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import topics
from services.nurture import domain, handlers, repo
from services.nurture.presets import PRESETS
from services.runtime.db import create_pool, migrate
from services.runtime.devstack import Stack
from services.runtime.kafka import create_topics, new_broker
from services.runtime.outbox import OutboxRelay
from services.runtime.settings import NurtureSettings

MIGRATIONS = Path(handlers.__file__).parent / "migrations"
SEQUENCE = "cold_outreach"
BATCH = 1000
CLAIM_TARGET_MS = 20.0
EMIT_TARGET = 10_000.0


async def _fill(
    conn: asyncpg.Connection, enrollments: int, due: int, t0: datetime
) -> dict[str, float]:
    """Fill enrollments (and the due ones' sent emails) with INSERT ... SELECT; the
    secondary indexes (whatever the migrations define) are dropped during the fill
    and built again from their own definitions afterwards."""
    sequence = await repo.active_sequence(conn, "default", SEQUENCE)
    assert sequence is not None
    steps = await repo.steps_of_version(conn, sequence["version_id"])
    emails = [s.id for s in steps if s.kind == "email"]
    due_now = min(due, enrollments // 100)
    started = time.perf_counter()
    indexes = await conn.fetch(
        "SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS sql"
        " FROM pg_index i WHERE i.indrelid = 'enrollments'::regclass"
        " AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)"
    )
    for index in indexes:
        await conn.execute(f"DROP INDEX {index['name']}")
    chunk = 200_000
    for low in range(1, enrollments + 1, chunk):
        high = min(low + chunk - 1, enrollments)
        # g: row number; k: the email the enrollment is at (0..7). Row kinds by g:
        #   g <= due_now          active, due in the past hour
        #   g <= due              active, due within the next hour
        #   else, by g % 100:  0-9 completed, 10-14 stopped, 15-18 awaiting_send,
        #                      the rest active, due in 1 to 49 days.
        await conn.execute(
            """
            INSERT INTO enrollments (id, tenant_id, lead_id, sequence_id, sequence_version_id,
                sequence_key, version, lead, status, position, cursor, next_action_at,
                awaiting_delivery_key, thread_delivery_key, steps_done, stop_reason,
                enrolled_at, last_activity_at, finished_at, waiting_on, thread_subject,
                company_domain)
            SELECT id, 'default', gen_random_uuid(), $1, $2, $3, $4,
                jsonb_build_object('email', 'lead' || g || '@company' || (g % 5000) || '.example',
                                   'first_name', 'Ada', 'company', 'Company ' || (g % 5000)),
                status,
                CASE WHEN status = 'completed' THEN 15 ELSE 2 * k END,
                CASE WHEN status = 'completed' THEN 8
                     WHEN status = 'awaiting_send' THEN k + 1 ELSE k END,
                CASE WHEN g <= $6 THEN t0 - make_interval(secs => (g * 7919) % 3600)
                     WHEN g <= $7 THEN t0 + make_interval(secs => 1 + (g * 7919) % 3599)
                     WHEN status = 'active'
                        THEN t0 + make_interval(days => 1, secs => (g * 7919) % (48 * 86400))
                END,
                CASE WHEN status = 'awaiting_send' THEN id || ':' || k END,
                CASE WHEN k > 0 OR status <> 'active' THEN id || ':0' END,
                CASE WHEN status = 'completed' THEN 15 ELSE 2 * k END,
                CASE WHEN status = 'stopped' THEN 'replied' END,
                t0 - make_interval(days => 7 * k + 1), t0 - make_interval(days => 1),
                CASE WHEN status IN ('completed', 'stopped') THEN t0 END,
                CASE WHEN status = 'active' THEN 'wait'
                     WHEN status = 'awaiting_send' THEN 'send' END,
                CASE WHEN k > 0 OR status <> 'active'
                     THEN 'Introducing ourselves to Company ' || (g % 5000) END,
                'company' || (g % 5000) || '.example'
            FROM (
                SELECT g, $5::timestamptz AS t0, gen_random_uuid() AS id,
                    ((g * 31) % 8)::int AS k,
                    CASE WHEN g <= $7 THEN 'active'
                         WHEN g % 100 < 10 THEN 'completed'
                         WHEN g % 100 < 15 THEN 'stopped'
                         WHEN g % 100 < 19 THEN 'awaiting_send'
                         ELSE 'active' END AS status
                FROM generate_series($8::bigint, $9::bigint) AS g
            ) AS rows
            """,
            sequence["id"],
            sequence["version_id"],
            sequence["key"],
            sequence["version"],
            t0,
            due_now,
            due,
            low,
            high,
        )
    for index in indexes:
        await conn.execute(index["sql"])
    filled = time.perf_counter() - started
    # The due enrollments' earlier emails: what conditions would look at.
    await conn.execute(
        "INSERT INTO enrollment_emails (delivery_key, enrollment_id, step_id, sent_at)"
        " SELECT e.id || ':' || j, e.id, ($1::uuid[])[j + 1],"
        "   $2::timestamptz - make_interval(days => 7 * (e.cursor - j))"
        " FROM enrollments e, generate_series(0, e.cursor - 1) AS j"
        " WHERE e.status = 'active' AND e.next_action_at <= $3::timestamptz",
        emails,
        t0,
        t0 + timedelta(hours=1),
    )
    await conn.execute("VACUUM ANALYZE enrollments")
    await conn.execute("VACUUM ANALYZE enrollment_emails")
    return {"fill_seconds": filled, "total_seconds": time.perf_counter() - started}


async def _claims(pool: asyncpg.Pool, t0: datetime, count: int) -> dict[str, list[float]]:
    """claim_due of BATCH rows, in a transaction rolled back: seconds each, seconds of
    the claims during which Python ran a full (generation 2) garbage collection, and
    the statement's execution time in the server (EXPLAIN ANALYZE)."""
    latencies: list[float] = []
    with_gc: list[float] = []
    collections: list[list[float]] = []

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] == 2:
            if phase == "start":
                collections.append([time.perf_counter()])
            elif collections:
                collections[-1].append(time.perf_counter())

    query = (
        f"EXPLAIN (ANALYZE, FORMAT JSON) SELECT {repo.ENROLLMENT_COLUMNS} FROM enrollments"
        " WHERE status = 'active' AND next_action_at <= $1"
        " ORDER BY next_action_at LIMIT $2 FOR UPDATE SKIP LOCKED"
    )
    server: list[float] = []
    # As every service does once started (Service.start): long-lived objects leave
    # the collector's full passes.
    gc.collect()
    gc.freeze()
    gc.callbacks.append(on_gc)
    try:
        async with pool.acquire() as conn:
            for n in range(count + 10):
                transaction = conn.transaction()
                await transaction.start()
                try:
                    gcs = len(collections)
                    started = time.perf_counter()
                    rows = await repo.claim_due(conn, t0, BATCH)
                    elapsed = time.perf_counter() - started
                finally:
                    await transaction.rollback()
                assert len(rows) == BATCH, len(rows)
                if n >= 10:  # the first ones warm the plan cache and the buffers
                    latencies.append(elapsed)
                    if len(collections) > gcs:
                        with_gc.append(elapsed)
            for _ in range(20):
                transaction = conn.transaction()
                await transaction.start()
                try:
                    plan = await conn.fetchval(query, t0, BATCH)  # decoded by the pool's codec
                finally:
                    await transaction.rollback()
                server.append(float(plan[0]["Execution Time"]) / 1000)
    finally:
        gc.callbacks.remove(on_gc)
    pauses = [c[1] - c[0] for c in collections if len(c) == 2]
    return {"latencies": latencies, "with_gc": with_gc, "gc_pauses": pauses, "server": server}


async def _emit(pool: asyncpg.Pool, now: datetime, loops: int) -> dict[str, Any]:
    """The scheduler loop's rounds, back to back, until nothing is due (``loops`` of
    them side by side, as that many replicas would run them)."""
    steps = handlers.StepCache()
    rounds: list[float] = []

    async def loop() -> int:
        claimed = 0
        while True:
            round_started = time.perf_counter()
            async with pool.acquire() as conn, conn.transaction():
                n = await handlers.run_due(conn, now=now, limit=BATCH, steps=steps)
            if not n:
                return claimed
            rounds.append(time.perf_counter() - round_started)
            claimed += n

    started = time.perf_counter()
    claimed = sum(await asyncio.gather(*(loop() for _ in range(loops))))
    elapsed = time.perf_counter() - started
    emitted = int(
        await pool.fetchval(
            "SELECT count(*) FROM outbox WHERE event_type = 'StepDue' AND published_at IS NULL"
        )
    )
    if emitted != claimed:
        raise RuntimeError(f"{claimed} enrollments claimed, {emitted} StepDue in the outbox")
    return {"seconds": elapsed, "claimed": claimed, "emitted": emitted, "rounds": rounds}


async def _relay(dsn: str, kafka: str, expected: int, partitions: int) -> dict[str, float]:
    broker = new_broker(kafka, "touchstream-nurture")
    await broker.start()
    relay = OutboxRelay(dsn, "nurture", broker)
    stop = asyncio.Event()
    try:
        started = time.perf_counter()
        task = asyncio.create_task(relay.run(stop))
        for _ in range(60_000):
            if relay.published >= expected or task.done():
                break
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
    finally:
        await broker.stop()
    return {
        "seconds": elapsed,
        "published": relay.published,
        "on_topic": await _count_topic(kafka, topics.STEP_DUE, partitions, expected),
    }


async def _count_topic(kafka: str, topic: str, partitions: int, expected: int) -> int:
    """Distinct event ids on the topic, read from the beginning (the local broker's
    end offsets are not record counts)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    await consumer.start()
    seen: set[bytes] = set()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        idle = 0
        while len(seen) < expected and idle < 10:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            idle = 0 if batch else idle + 1
            for records in batch.values():
                for record in records:
                    seen.add(dict(record.headers).get("event_id", b""))
    finally:
        await consumer.stop()
    return len(seen)


async def _procrastinate(admin_dsn: str, dsn: str, jobs: int) -> dict[str, float]:
    """procrastinate on the same server: defer ``jobs`` no-op jobs, drain them."""
    from procrastinate import App, PsycopgConnector

    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute('CREATE DATABASE "procrastinate"')
    finally:
        await admin.close()
    # The app lives in __main__ here on purpose (worker and deferrer share this process).
    logging.getLogger("procrastinate.blueprints").setLevel(logging.ERROR)
    app = App(connector=PsycopgConnector(conninfo=dsn, min_size=2, max_size=12))

    @app.task(name="noop")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        started = time.perf_counter()
        for low in range(0, jobs, BATCH):
            await noop.batch_defer_async(*[{} for _ in range(min(BATCH, jobs - low))])
        deferred = time.perf_counter() - started
        started = time.perf_counter()
        await app.run_worker_async(
            concurrency=10, wait=False, install_signal_handlers=False, delete_jobs="never"
        )
        drained = time.perf_counter() - started
    conn = await asyncpg.connect(dsn)
    try:
        done = int(
            await conn.fetchval(
                "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
            )
        )
    finally:
        await conn.close()
    return {"defer_seconds": deferred, "drain_seconds": drained, "succeeded": done}


class _Timings:
    """Seconds spent in product functions during the emission, for --profile."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def _add(self, name: str, started: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap_async(
        self, name: str, fn: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                self._add(name, started)

        return timed

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(name, started)

        return timed


@contextmanager
def _instrumented(timings: _Timings) -> Iterator[None]:
    """Wrap what one scheduler round calls, on its modules, for the duration (the
    product code is unchanged; the wrappers only time)."""
    targets: list[tuple[Any, str, bool]] = [
        (repo, "resume_due", True),
        (repo, "claim_due", True),
        (repo, "sequence_settings", True),
        (repo, "facts_for", True),
        (repo, "apply_advances", True),
        (repo, "write_log", True),
        (handlers, "enqueue_many", True),
        (handlers, "load_context", True),
        (handlers, "apply_advances", True),
        (domain, "advance", False),
        (handlers, "render_step_due", False),
    ]
    originals = [(module, name, getattr(module, name)) for module, name, _ in targets]
    try:
        for (module, name, is_async), (_, _, fn) in zip(targets, originals, strict=True):
            label = f"{module.__name__.rsplit('.', 1)[-1]}.{name}"
            wrapped = timings.wrap_async(label, fn) if is_async else timings.wrap(label, fn)
            setattr(module, name, wrapped)
        yield
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _pct(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


async def run(
    enrollments: int, due: int, claims: int, jobs: int, loops: int, profile: bool
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="touchstream-bench-"))
    stack = Stack(root)
    partitions = 4
    result: dict[str, Any] = {}
    try:
        database_url = await asyncio.to_thread(stack.start_postgres)
        kafka = await asyncio.to_thread(stack.start_kafka)
        await create_topics(kafka, partitions, names=[topics.STEP_DUE, topics.LEAD_UPDATES])
        pool = await create_pool(database_url, "nurture", size=loops + 3)
        try:
            async with pool.acquire() as conn:
                await migrate(conn, "nurture", MIGRATIONS)
                async with conn.transaction():
                    for preset in PRESETS.values():
                        await repo.ensure_preset(conn, "default", preset)
                t0 = datetime.now(UTC).replace(microsecond=0)
                result["fill"] = await _fill(conn, enrollments, due, t0)
                result["due_now"] = int(
                    await conn.fetchval(
                        "SELECT count(*) FROM enrollments"
                        " WHERE status = 'active' AND next_action_at <= $1",
                        t0,
                    )
                )
            result["claims"] = await _claims(pool, t0, claims)
            timings = _Timings()
            with _instrumented(timings) if profile else _nothing():
                result["emit"] = await _emit(pool, t0 + timedelta(hours=1), loops)
            result["timings"] = timings
            result["relay"] = await _relay(
                database_url, kafka, result["emit"]["emitted"], partitions
            )
        finally:
            await pool.close()
        base = database_url.rsplit("/", 1)[0]
        result["procrastinate"] = await _procrastinate(
            base + "/postgres", base + "/procrastinate", jobs
        )
        return result
    finally:
        stack.stop_all()
        shutil.rmtree(root, ignore_errors=True)  # a million rows take gigabytes


def _verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--enrollments", type=int, default=1_000_000)
    parser.add_argument("--due", type=int, default=50_000, help="enrollments to emit in (b)")
    parser.add_argument("--claims", type=int, default=200, help="claims timed in (a)")
    parser.add_argument(
        "--jobs", type=int, default=None, help="procrastinate jobs (default: --due)"
    )
    parser.add_argument(
        "--loops",
        type=int,
        default=NurtureSettings.model_fields["scheduler_loops"].default,
        help="scheduler loops side by side in (b) (NURTURE_SCHEDULER_LOOPS)",
    )
    parser.add_argument("--profile", action="store_true", help="time each part of a round")
    args = parser.parse_args()
    if args.enrollments < 100 * BATCH or not BATCH <= args.due <= args.enrollments:
        parser.error(f"need --enrollments >= {100 * BATCH}, {BATCH} <= --due <= --enrollments")
    if importlib.util.find_spec("procrastinate") is None:
        parser.error("the baseline needs procrastinate: .venv/bin/pip install procrastinate")
    jobs = args.jobs or args.due
    r = asyncio.run(run(args.enrollments, args.due, args.claims, jobs, args.loops, args.profile))
    fill, claims, emit, relay, proc = (
        r["fill"],
        r["claims"],
        r["emit"],
        r["relay"],
        r["procrastinate"],
    )
    print(
        f"scheduler ({args.enrollments} enrollments, {r['due_now']} due now,"
        f" {args.due} due for (b); batches of {BATCH}):"
    )
    print(
        f"  fill            : {args.enrollments / fill['fill_seconds']:8.0f} rows/s"
        f" (INSERT ... SELECT, then indexes), {fill['total_seconds']:.1f} s with emails and"
        " VACUUM ANALYZE"
    )
    latencies = claims["latencies"]
    p99 = _pct(latencies, 0.99) * 1000
    print(
        f"  (a) claim_due   : p50 {_pct(latencies, 0.5) * 1000:.1f} ms,"
        f" p99 {p99:.1f} ms, max {max(latencies) * 1000:.1f} ms ({len(latencies)} claims of"
        f" {BATCH}, rolled back); target p99 <= {CLAIM_TARGET_MS:.0f} ms"
        f" ({_verdict(p99 <= CLAIM_TARGET_MS)})"
    )
    with_gc, pauses = claims["with_gc"], claims["gc_pauses"]
    without_gc = list(latencies)
    for value in with_gc:
        without_gc.remove(value)
    print(
        f"      in the server p50 {_pct(claims['server'], 0.5) * 1000:.1f} ms (EXPLAIN ANALYZE);"
        f" {len(with_gc)} claims ran a full Python GC"
        + (f" (p50 pause {_pct(pauses, 0.5) * 1000:.0f} ms)" if pauses else "")
        + f"; p99 of the others {_pct(without_gc, 0.99) * 1000:.1f} ms"
    )
    rate = emit["emitted"] / emit["seconds"]
    rounds = emit["rounds"]
    print(
        f"  (b) emission    : {rate:8.0f} StepDue/s ({emit['emitted']} in {emit['seconds']:.2f} s,"
        f" {len(rounds)} rounds in {args.loops} loop(s), p50 {_pct(rounds, 0.5) * 1000:.0f} ms,"
        f" p99 {_pct(rounds, 0.99) * 1000:.0f} ms per round);"
        f" target >= {EMIT_TARGET:.0f}/s ({_verdict(rate >= EMIT_TARGET)})"
    )
    print(
        f"      relay       : {relay['published'] / relay['seconds']:8.0f} published/s"
        f" ({relay['published']:.0f} in {relay['seconds']:.2f} s;"
        f" {relay['on_topic']:.0f} distinct events read back from {topics.STEP_DUE})"
    )
    proc_rate = proc["succeeded"] / proc["drain_seconds"]
    print(
        f"  baseline        : {proc_rate:8.0f} jobs/s, procrastinate worker (concurrency 10)"
        f" draining {proc['succeeded']:.0f} no-op jobs (deferred at"
        f" {jobs / proc['defer_seconds']:.0f}/s in batches of {BATCH})"
    )
    print(f"  ratio           : emission {rate / proc_rate:.1f}x procrastinate's drain rate")
    if args.profile:
        timings: _Timings = r["timings"]
        for name, seconds in sorted(timings.seconds.items(), key=lambda kv: -kv[1]):
            calls = timings.calls[name]
            print(
                f"  {name:<28}: {seconds:6.2f} s, {calls:6d} calls,"
                f" {seconds / calls * 1000:8.3f} ms/call"
            )


if __name__ == "__main__":
    main()
