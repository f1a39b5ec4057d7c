"""The transactional outbox and its relay.

A service writes its state and the events it emits in one transaction
(:func:`enqueue`). The relay publishes outbox rows in id order and marks them
published; nothing is published before it is committed, and nothing committed is
lost if a process dies (the relay publishes again; consumers dedupe by event id).
One relay per schema publishes at a time (a session advisory lock), which keeps
the per-key order that Kafka consumers rely on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Iterable

import asyncpg
from faststream.kafka import KafkaBroker

from schemas.events import Event
from services.runtime.db import INDEX_LOOKUPS
from services.runtime.kafka import OutgoingRecord, publish_all

log = logging.getLogger(__name__)


async def enqueue(conn: asyncpg.Connection, topic: str, event: Event) -> None:
    await enqueue_many(conn, [(topic, event)])


async def enqueue_many(conn: asyncpg.Connection, items: Iterable[tuple[str, Event]]) -> None:
    """Outbox rows for these events, in this order, in one statement."""
    topics: list[str] = []
    keys: list[bytes] = []
    payloads: list[bytes] = []
    ids: list[uuid.UUID] = []
    types: list[str] = []
    for topic, event in items:
        topics.append(topic)
        keys.append(event.kafka_key())
        payloads.append(event.to_bytes())
        ids.append(event.event_id)
        types.append(event.event_type)
    if ids:
        await conn.execute(
            "INSERT INTO outbox (topic, kafka_key, payload, event_id, event_type)"
            " SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::uuid[], $5::text[])",
            topics,
            keys,
            payloads,
            ids,
            types,
        )


UNPUBLISHED = (
    "SELECT id, topic, kafka_key, payload, event_id, event_type FROM outbox"
    " WHERE published_at IS NULL ORDER BY id LIMIT $1"
)
PUBLISHED = "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1::bigint[])"


def _relay_lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"touchstream-outbox-relay:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class OutboxRelay:
    """Publishes a schema's outbox to Kafka; one active relay per schema."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        broker: KafkaBroker,
        *,
        batch_size: int = 1000,
        idle_seconds: float = 0.5,
        retention_seconds: float = 3600.0,
        linger_seconds: float = 0.005,
    ) -> None:
        self.dsn = dsn
        self.schema = schema
        self.broker = broker
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.retention_seconds = retention_seconds
        self.linger_seconds = linger_seconds
        self.is_leader = False
        self.published = 0
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        while not stop.is_set():
            try:
                await self._lead(stop)
                backoff = 0.2
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("outbox relay (%s) lost its connection: %r", self.schema, exc)
            except Exception:
                log.exception("outbox relay (%s) failed", self.schema)
            self.is_leader = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, 5.0)

    async def connect(self) -> asyncpg.Connection:
        """The leader's own connection: its advisory lock, its LISTEN, and the
        statements it publishes with (by index: see INDEX_LOOKUPS; the outbox grows
        from empty in a burst, and a plan cached while it was small would scan it)."""
        return await asyncpg.connect(
            self.dsn, timeout=10, server_settings={"search_path": self.schema, **INDEX_LOOKUPS}
        )

    async def _lead(self, stop: asyncio.Event) -> None:
        conn = await self.connect()
        try:
            key = _relay_lock_key(self.schema)
            while not stop.is_set():
                if await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            else:
                return
            self.is_leader = True
            await conn.add_listener(f"{self.schema}_outbox", lambda *_: self._wake.set())
            last_cleanup = 0.0
            loop = asyncio.get_running_loop()
            while not stop.is_set():
                self._wake.clear()
                if self.linger_seconds:
                    # Let a burst of commits gather: one round for many rows.
                    await asyncio.sleep(self.linger_seconds)
                published = await self.publish_batch(conn)
                if loop.time() - last_cleanup > 60:
                    await self._cleanup(conn)
                    last_cleanup = loop.time()
                if published < self.batch_size:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.idle_seconds)
                if conn.is_closed():
                    raise asyncpg.InterfaceError("relay leader connection closed")
            # Drain what is left before handing over.
            while await self.publish_batch(conn):
                pass
        finally:
            self.is_leader = False
            await conn.close()

    async def publish_batch(self, conn: asyncpg.Connection) -> int:
        """Publish the oldest unpublished rows, on the leader's connection."""
        rows = await conn.fetch(UNPUBLISHED, self.batch_size)
        if not rows:
            return 0
        await publish_all(
            self.broker,
            [
                OutgoingRecord(
                    topic=r["topic"],
                    key=r["kafka_key"],
                    value=r["payload"],
                    headers={"event_type": r["event_type"], "event_id": str(r["event_id"])},
                )
                for r in rows
            ],
        )
        await conn.execute(PUBLISHED, [r["id"] for r in rows])
        self.published += len(rows)
        return len(rows)

    async def _cleanup(self, conn: asyncpg.Connection) -> None:
        await conn.execute(
            "DELETE FROM outbox WHERE published_at < clock_timestamp() - make_interval(secs => $1)",
            self.retention_seconds,
        )
