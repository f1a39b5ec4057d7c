"""Chaos: a stream of leads through the whole stack while a random service is
SIGKILLed and restarted every few seconds and PostgreSQL crashes once mid-run.
Afterwards no lead has lost a step and no delivery key went out twice.

The short version runs in CI; the long one (10,000 leads, 50+ kills) is marked
``slow`` and run by ``make chaos``. ``CHAOS_LEADS`` / ``CHAOS_KILLS`` size the long
version, ``CHAOS_SEED`` replays a kill schedule (timings still vary from run to run).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.parser
import email.utils
import os
import pwd
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import topics
from services.runtime.devstack import (
    SERVICES,
    ProcessRecord,
    Stack,
    StackError,
    port_open,
    wait_for_port,
)
from tests.conftest import Infra
from tests.e2e.conftest import DeploymentFactory
from tests.e2e.harness import Deployment

pytestmark = pytest.mark.e2e

EMAILS_PER_LEAD = 3  # aggressive_close: days 0, 2 and 5


@dataclass(frozen=True)
class Size:
    leads: int
    kills: int
    settle_timeout: float  # wall seconds for the backlog to drain once the kills stop


def _size(name: str) -> Size:
    if name == "short":
        return Size(leads=300, kills=12, settle_timeout=120)
    leads = int(os.environ.get("CHAOS_LEADS", "10000"))
    return Size(
        leads=leads,
        kills=int(os.environ.get("CHAOS_KILLS", "50")),
        settle_timeout=max(600.0, leads * 0.12),
    )


# ---------------------------------------------------------------------------- PostgreSQL


class LocalPostgres:
    """The session's PostgreSQL when tests/conftest.py started it from the system's
    binaries (infra "local"). It is found through its data directory, whose parent is
    the root of the Stack that started it; it is crashed with SIGKILL and started again
    with the command line recorded there (same binary, data directory and port)."""

    def __init__(self, stack: Stack, admin_dsn: str, user: str | None) -> None:
        self.stack = stack
        self.admin_dsn = admin_dsn
        self.user = user
        self.respawned = False
        argv = stack.processes["postgres"].argv
        self.port = int(argv[argv.index("-p") + 1])

    @classmethod
    async def find(cls, infra: Infra) -> tuple[LocalPostgres | None, str]:
        """The server, or None and why it cannot be restarted from here."""
        if infra.source != "local":
            return None, f"PostgreSQL comes from {infra.source}: not ours to restart"
        conn = await asyncpg.connect(infra.admin_dsn)
        try:
            data = Path(await conn.fetchval("SHOW data_directory"))
        finally:
            await conn.close()
        return await asyncio.to_thread(cls._from_data_directory, data, infra.admin_dsn)

    @classmethod
    def _from_data_directory(cls, data: Path, admin_dsn: str) -> tuple[LocalPostgres | None, str]:
        stack = Stack.load(data.parent)
        record = stack.processes.get("postgres")
        if record is None or not record.alive():
            return None, f"no live postgres recorded in {stack.state_file}"
        pidfile = (data / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        if pidfile != str(record.pid):
            return None, f"postmaster.pid says {pidfile}, the stack recorded {record.pid}"
        user = None
        if os.geteuid() == 0:  # as in Stack.start_postgres: the server runs as its owner
            owner = pwd.getpwuid(data.stat().st_uid).pw_name
            user = None if owner == "root" else owner
        return cls(stack, admin_dsn, user), ""

    async def crash(self) -> None:
        """SIGKILL the postmaster, as a power cut would (its backends follow)."""
        record = self.stack.processes["postgres"]
        record.signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not _gone(record, self.port):
            if time.monotonic() > deadline:
                raise AssertionError("postgres survived SIGKILL")
            await asyncio.sleep(0.05)

    async def start(self, timeout: float = 60) -> None:
        """The same command line again; retried while the killed server's backends
        still hold its shared memory."""
        argv = self.stack.processes["postgres"].argv
        log = self.stack.root / "logs" / "postgres.log"
        deadline = time.monotonic() + timeout
        while True:
            proc = self.stack.spawn("postgres", argv, user=self.user)
            self.respawned = True
            try:
                await asyncio.to_thread(
                    wait_for_port, "127.0.0.1", self.port, 30, proc, "postgres", log
                )
                break
            except StackError:
                proc.wait(5)
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)
        while True:  # crash recovery, then connections are accepted
            try:
                conn = await asyncpg.connect(self.admin_dsn, timeout=2)
                await conn.close()
                return
            except (OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    def stop(self) -> None:
        """At the end of the session: the server we started is ours to stop (the
        infra fixture only knows the PID of the one we killed)."""
        if self.respawned:
            self.stack.stop("postgres")


def _gone(record: ProcessRecord, port: int) -> bool:
    """Dead, reaped and off its port. A zombie postmaster still holds its PID, and a
    new server refuses to start while the PID in ``postmaster.pid`` exists."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(record.pid, os.WNOHANG)  # reap it when it is our child (the infra's)
    return not Path(f"/proc/{record.pid}").exists() and not port_open("127.0.0.1", port)


@pytest.fixture(scope="session")
def _restarted_postgres() -> Iterator[list[LocalPostgres]]:
    """Servers a chaos test started again, stopped when the session ends: after every
    test that still uses them, before the infra fixture removes their data."""
    servers: list[LocalPostgres] = []
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture
async def postgres(
    infra: Infra, _restarted_postgres: list[LocalPostgres]
) -> tuple[LocalPostgres | None, str]:
    server, why = await LocalPostgres.find(infra)
    if server is not None:
        _restarted_postgres.append(server)
    return server, why


async def _durable_commits(database_url: str) -> str:
    """Commits in the test database survive a PostgreSQL crash.

    The embedded server runs with ``synchronous_commit=off`` for speed: a crash then
    loses the last commits it acknowledged, e.g. the sender's ``sending`` mark written
    just before an SMTP hand-off, after which the delivery is claimed again and sent a
    second time. Production servers keep the default (``on``); a per-database setting
    outranks the server's command line. ``CHAOS_SYNCHRONOUS_COMMIT=off`` keeps the
    embedded setting, to see what a crash does to a non-durable database."""
    setting = os.environ.get("CHAOS_SYNCHRONOUS_COMMIT", "on")
    assert setting in ("on", "off"), setting
    conn = await asyncpg.connect(database_url)
    try:
        if setting == "on":
            name = await conn.fetchval("SELECT current_database()")
            await conn.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = on')
    finally:
        await conn.close()
    conn = await asyncpg.connect(database_url)
    try:
        return str(await conn.fetchval("SHOW synchronous_commit"))
    finally:
        await conn.close()


# --------------------------------------------------------------------------------- chaos


@dataclass
class Chaos:
    d: Deployment
    rng: random.Random
    addresses: list[str]
    batch: int
    published: int = 0
    published_while_router_down: int = 0
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    pg_restarts: int = 0

    async def publish_batch(self, size: int | None = None) -> int:
        start = self.published
        chosen = self.addresses[start : start + (self.batch if size is None else size)]
        await asyncio.gather(
            *(self.d.publish_lead(a, first_name="Lin", company="Acme") for a in chosen)
        )
        self.published += len(chosen)
        return len(chosen)

    async def kill_and_restart(self, name: str) -> None:
        self.d.kill(name)
        self.kills[name] += 1
        if name == "router":
            # These wait in Kafka until the router is back.
            self.published_while_router_down += await self.publish_batch()
            await asyncio.sleep(self.rng.uniform(0, 1))
        await self.d.restart(name)
        if name != "router":
            await self.publish_batch()

    async def restart_postgres(self, server: LocalPostgres) -> float:
        started = time.monotonic()
        await server.crash()
        await self.publish_batch()  # the router cannot store these until it is back
        await asyncio.sleep(self.rng.uniform(1, 3))
        await server.start()
        self.pg_restarts += 1
        return time.monotonic() - started


def _kill_schedule(rng: random.Random, kills: int) -> list[str]:
    """``kills`` victims: every service at least ``kills // 6`` times (at least once),
    the rest at random, in random order."""
    each = max(1, kills // 6)
    schedule = [name for name in SERVICES for _ in range(each)]
    schedule += [rng.choice(SERVICES) for _ in range(max(0, kills - len(schedule)))]
    rng.shuffle(schedule)
    return schedule


async def _progress(d: Deployment) -> dict[str, int]:
    rows = await d.fetch("SELECT status, count(*) AS n FROM nurture.enrollments GROUP BY 1")
    return {r["status"]: r["n"] for r in rows}


async def _settle(d: Deployment, leads: int, timeout: float, verbose: bool) -> bool:
    """Wait until every lead's enrollment has completed; False on timeout."""
    deadline = time.monotonic() + timeout
    last_print = time.monotonic()
    while time.monotonic() < deadline:
        try:
            progress = await _progress(d)
        except (OSError, asyncpg.PostgresError):
            progress = {}
        if progress.get("completed", 0) >= leads:
            return True
        if verbose and time.monotonic() - last_print > 30:
            print(f"  waiting: enrollments {progress}", flush=True)
            last_print = time.monotonic()
        await asyncio.sleep(0.5)
    return False


async def _unfinished(d: Deployment, limit: int = 10) -> list[dict[str, object]]:
    """Where the enrollments that did not complete are stuck: the delivery nurture
    waits for, the StepDue it emitted for it, whether the sender applied that event."""
    found: list[dict[str, object]] = []
    for e in await d.fetch(
        "SELECT id, lead->>'email' AS email, status, cursor, awaiting_delivery_key"
        " FROM nurture.enrollments WHERE status <> 'completed' ORDER BY id LIMIT $1",
        limit,
    ):
        key = e["awaiting_delivery_key"]
        outbox = (
            await d.fetch(
                "SELECT event_id, event_type, published_at FROM nurture.outbox"
                " WHERE convert_from(payload, 'UTF8') LIKE '%' || $1 || '%'",
                key,
            )
            if key
            else []
        )
        found.append(
            {
                **{k: e[k] for k in ("email", "status", "cursor", "awaiting_delivery_key")},
                "delivery": await d.fetchval(
                    "SELECT status FROM sender.deliveries WHERE delivery_key = $1", key
                ),
                "nurture_outbox": [
                    (
                        r["event_type"],
                        r["published_at"] is not None,
                        await d.fetchval(
                            "SELECT consumer FROM sender.inbox WHERE event_id = $1", r["event_id"]
                        ),
                    )
                    for r in outbox
                ],
            }
        )
    return found


def _sink_headers(d: Deployment) -> list[tuple[str, str]]:
    """(Message-ID, To address) of every message at the SMTP sink, headers only."""
    assert d.mail_dir is not None
    parser = email.parser.BytesHeaderParser()
    found = []
    for path in sorted(d.mail_dir.glob("*.eml")):
        message = parser.parsebytes(path.read_bytes())
        found.append((str(message["Message-ID"]), email.utils.parseaddr(str(message["To"]))[1]))
    return found


async def _dlq_records(d: Deployment) -> dict[str, int]:
    """Records ever written to each dead-letter topic, from the partitions' offsets."""
    consumer = AIOKafkaConsumer(bootstrap_servers=d.kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        await consumer.topics()  # metadata for every topic
        counts: dict[str, int] = {}
        for topic in topics.ALL:
            dlq = topics.dlq(topic)
            partitions = [TopicPartition(dlq, p) for p in consumer.partitions_for_topic(dlq) or ()]
            assert partitions, f"{dlq} has no partitions: an empty read would prove nothing"
            start = await consumer.beginning_offsets(partitions)
            end = await consumer.end_offsets(partitions)
            counts[topic] = sum(end[p] - start[p] for p in partitions)
        return counts
    finally:
        await consumer.stop()


@pytest.mark.parametrize(
    "size_name",
    [
        pytest.param("short", marks=pytest.mark.timeout(300)),
        pytest.param("long", marks=[pytest.mark.slow, pytest.mark.timeout(3600)]),
    ],
)
async def test_chaos_kills_and_a_postgres_crash_lose_no_step_and_send_nothing_twice(
    deploy: DeploymentFactory,
    database_url: str,
    postgres: tuple[LocalPostgres | None, str],
    size_name: str,
) -> None:
    size = _size(size_name)
    seed = int(os.environ.get("CHAOS_SEED", str(random.SystemRandom().randrange(2**32))))
    print(f"\nchaos {size_name}: seed {seed} (CHAOS_SEED={seed} replays the schedule)")
    rng = random.Random(seed)
    server, why_not = postgres
    if server is None:
        print(f"chaos: PostgreSQL restart skipped: {why_not}")
    else:
        print(f"chaos: synchronous_commit {await _durable_commits(database_url)}")

    d = await deploy(clock_speed=86400)  # a day per second: a lead's 5 days take 5 s
    if d.mail_dir is None:
        pytest.skip("the SMTP server is external: the sink cannot be checked")
    started = time.monotonic()
    addresses = [f"chaos{i:05d}@example.com" for i in range(size.leads)]
    chaos = Chaos(d, rng, addresses, batch=-(-size.leads // (size.kills + 2)))
    schedule = _kill_schedule(rng, size.kills)
    pg_at = len(schedule) // 2
    pg_outage = 0.0

    await chaos.publish_batch()
    for index, victim in enumerate(schedule):
        if index == pg_at and server is not None:
            pg_outage = await chaos.restart_postgres(server)
        await chaos.kill_and_restart(victim)
        if size_name != "short":
            print(f"  kill {index + 1}/{len(schedule)}: {victim}", flush=True)
        await asyncio.sleep(rng.uniform(0.5, 3))
    while chaos.published < size.leads:
        await chaos.publish_batch()
    chaos_time = time.monotonic() - started

    settled = await _settle(d, size.leads, size.settle_timeout, verbose=size_name != "short")
    elapsed = time.monotonic() - started

    # ------------------------------------------------------------------ figures
    leads = await d.fetch("SELECT id, email, status FROM router.leads")
    enrollments = await d.fetch("SELECT id, lead_id, status FROM nurture.enrollments")
    deliveries = await d.fetch(
        "SELECT delivery_key, lead_id, enrollment_id, to_email, status, message_id"
        " FROM sender.deliveries"
    )
    sink = await asyncio.to_thread(_sink_headers, d)
    dlq_counts = await _dlq_records(d)
    dead_letters = dict(
        zip(
            topics.ALL,
            await asyncio.gather(
                *(d.dead_letters(topic, expect=1, timeout=3) for topic in topics.ALL)
            ),
            strict=True,
        )
    )

    by_status = collections.Counter(r["status"] for r in deliveries)
    enrollment_status = collections.Counter(r["status"] for r in enrollments)
    lead_status = collections.Counter(r["status"] for r in leads)
    sink_ids = collections.Counter(message_id for message_id, _ in sink)
    uncertain = [r for r in deliveries if r["status"] == "uncertain"]
    uncertain_at_sink = sum(1 for r in uncertain if r["message_id"] in sink_ids)
    print(
        f"chaos {size_name}: leads {len(addresses)} published"
        f" ({chaos.published_while_router_down} while the router was down),"
        f" {len(leads)} at the router {dict(lead_status)}\n"
        f"  kills {sum(chaos.kills.values())}: {dict(sorted(chaos.kills.items()))};"
        f" postgres restarts {chaos.pg_restarts} (outage {pg_outage:.1f} s)\n"
        f"  enrollments {len(enrollments)}: {dict(enrollment_status)}\n"
        f"  deliveries {len(deliveries)}: {dict(by_status)};"
        f" uncertain {len(uncertain)} ({uncertain_at_sink} of them at the sink)\n"
        f"  sink messages {len(sink)} ({len(sink_ids)} distinct Message-IDs);"
        f" dead letters {dlq_counts}\n"
        f"  elapsed {elapsed:.1f} s (chaos {chaos_time:.1f} s, drain {elapsed - chaos_time:.1f} s)",
        flush=True,
    )

    if not settled:
        print("  not completed (event type, published, sender inbox):")
        for stuck in await _unfinished(d):
            print(f"    {stuck}")

    # --------------------------------------------------------------- invariants
    assert settled, f"not every enrollment completed within {size.settle_timeout:.0f} s"
    # The router has every lead once, untouched (no replies, no status actions).
    assert chaos.published == len(addresses)
    assert len(leads) == len(addresses), "a lead was lost or duplicated at the router"
    assert {r["email"] for r in leads} == set(addresses)
    assert lead_status == {"new": len(addresses)}, lead_status

    # No lead lost a step: one enrollment each, completed, three deliveries sent or
    # (a sender killed in the hand-off window) uncertain.
    per_lead = collections.Counter(r["lead_id"] for r in enrollments)
    assert set(per_lead) == {r["id"] for r in leads}
    assert set(per_lead.values()) == {1}, {k: n for k, n in per_lead.items() if n != 1}
    assert enrollment_status == {"completed": len(addresses)}, enrollment_status
    assert set(by_status) <= {"sent", "uncertain"}, by_status
    deliveries_per_enrollment = collections.Counter(r["enrollment_id"] for r in deliveries)
    short = {
        str(e["lead_id"]): deliveries_per_enrollment[e["id"]]
        for e in enrollments
        if deliveries_per_enrollment[e["id"]] != EMAILS_PER_LEAD
    }
    assert not short, f"enrollments without exactly {EMAILS_PER_LEAD} deliveries: {short}"
    assert len(deliveries) == EMAILS_PER_LEAD * len(addresses)

    # No delivery key sent twice; nothing at the sink that the sender did not record.
    twice = {m: n for m, n in sink_ids.items() if n > 1}
    assert not twice, f"sent more than once: {twice}"
    message_ids = {r["message_id"] for r in deliveries}
    assert set(sink_ids) <= message_ids, set(sink_ids) - message_ids
    # Every 'sent' delivery reached the sink; 'uncertain' only from a sender killed
    # between the hand-off and the record (one delivery in flight per sender process).
    missing = [
        r["delivery_key"]
        for r in deliveries
        if r["status"] == "sent" and r["message_id"] not in sink_ids
    ]
    assert not missing, f"recorded sent, never at the sink: {missing[:20]}"
    assert len(uncertain) <= chaos.kills["sender"], (len(uncertain), chaos.kills["sender"])
    mail_per_address = collections.Counter(address for _, address in sink)
    for address in addresses:
        lost_in_window = sum(
            1 for r in uncertain if r["to_email"] == address and r["message_id"] not in sink_ids
        )
        received = mail_per_address[address]
        assert EMAILS_PER_LEAD - lost_in_window <= received <= EMAILS_PER_LEAD, (
            address,
            received,
        )

    # Every dead-letter topic is empty.
    assert dead_letters == {topic: [] for topic in topics.ALL}, {
        t: [(dict(r.headers).get("dlq-reason"), r.value[:200]) for r in records]
        for t, records in dead_letters.items()
        if records
    }
    assert set(dlq_counts.values()) == {0}, dlq_counts

    if server is not None:
        assert chaos.pg_restarts == 1
    assert len(chaos.kills) == len(SERVICES), chaos.kills
    assert sum(chaos.kills.values()) >= size.kills
