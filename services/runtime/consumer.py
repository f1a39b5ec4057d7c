"""The consumer wrapper every service uses.

A batch of records is decoded; records that are not valid events for their topic
go to ``<topic>-dlq`` with the reason and the original bytes. Valid events are
applied in one database transaction together with their inbox rows (a
redelivered ``event_id`` is skipped). Offsets are committed only after that
transaction commits. Transient failures (database or broker unreachable) are
retried with backoff and never acked; an event that fails on its own while its
neighbours succeed is poison and goes to the DLQ with the error.

Each partition is a lane. A batch of a lane starts once no running batch of the
lane shares a Kafka key (a lead) with it, so each lead's events apply in order
while up to ``concurrency`` batches (of this lane or others) run side by side:
PostgreSQL works on one while Python decodes and prepares another. Offsets are
committed in order, after the database commit, up to the first batch not applied
yet. A batch that cannot be applied rewinds its partition to the first batch not
applied (what was applied after it is skipped by the inbox when it comes again).
When partitions are revoked, their lanes finish what runs, commit, and drop the
rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage
from pydantic import ValidationError

from schemas import topics
from schemas.events import Event, decode
from services.runtime.kafka import OutgoingRecord, publish_all

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A handler's verdict that an event breaks a domain rule: dead-letter it."""

    event: Event
    reason: str


TopicHandler = Callable[[asyncpg.Connection, list[Any]], Awaitable[Sequence[Rejection] | None]]
AfterCommit = Callable[[], None]


class DlqLimitExceeded(RuntimeError):
    """Most recent messages went to the DLQ: a bad deploy, not bad data."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # A connection left mid-protocol by a server that went away.
    asyncpg.InternalClientError,
    KafkaError,
)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


@dataclass(slots=True)
class _Item:
    record: ConsumerRecord[Any, Any]
    event: Event | None = None
    reason: str | None = None


def _keys(records: Sequence[ConsumerRecord[Any, Any]]) -> frozenset[bytes] | None:
    """The Kafka keys (leads) of these records; None when one has no key: such records
    are ordered against every other."""
    keys = [r.key for r in records]
    if any(not isinstance(k, bytes) for k in keys):
        return None
    return frozenset(keys)


@dataclass(eq=False, slots=True)
class _Batch:
    """Records of one partition applied in one transaction, by ``task``."""

    records: list[ConsumerRecord[Any, Any]]
    keys: frozenset[bytes] | None
    task: asyncio.Task[None]

    @property
    def running(self) -> bool:
        return not self.task.done()

    def conflicts(self, keys: frozenset[bytes] | None) -> bool:
        return self.keys is None or keys is None or not self.keys.isdisjoint(keys)

    def error(self) -> BaseException | None:
        """Why it was not applied (None: applied, or still running)."""
        if self.running:
            return None
        if self.task.cancelled():
            return asyncio.CancelledError()
        return self.task.exception()


class _Lane:
    """One partition's batches. A batch starts once no running batch of the lane shares
    a key (a lead) with it, so each lead's events apply in order while other leads'
    batches run side by side; offsets are committed in order, up to the first batch
    not applied yet."""

    __slots__ = ("queue", "rewind_to", "running", "stopping", "task", "tp", "wake")

    def __init__(self, tp: TopicPartition) -> None:
        self.tp = tp
        #: Fetched, not started.
        self.queue: deque[list[ConsumerRecord[Any, Any]]] = deque()
        #: Started, in offset order, offsets not committed yet.
        self.running: list[_Batch] = []
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        #: Revoked or closing: finish what runs, start nothing more.
        self.stopping = False
        #: After a failed batch the partition is rewound to its first record; what
        #: was fetched before the rewind is dropped until that record comes back.
        self.rewind_to: int | None = None


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, consumer: EventConsumer) -> None:
        self.consumer = consumer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.consumer.release(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        return None


@dataclass
class ConsumerStats:
    applied: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    batches: int = 0
    last_error: str | None = None
    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=1000))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        parts = []
        for error in exc.errors()[:5]:
            loc = ".".join(str(p) for p in error.get("loc", ())) or "(root)"
            parts.append(f"{loc}: {error.get('msg')}")
        return "invalid event: " + "; ".join(parts)
    return f"invalid event: {exc}"


async def _skip_decoding(msg: Any) -> None:
    return None


class EventConsumer:
    """Consumes a service's topics as one consumer group and applies them."""

    def __init__(
        self,
        *,
        service: str,
        pool: asyncpg.Pool,
        broker: KafkaBroker,
        handlers: dict[str, TopicHandler],
        after_commit: AfterCommit | None = None,
        max_batch: int = 500,
        session_timeout_ms: int = 10_000,
        fetch_max_wait_ms: int = 500,
        poll_timeout_ms: int = 20,
        dlq_limit_ratio: float = 0.95,
        dlq_limit_window: int = 1000,
        on_fatal: Callable[[BaseException], None] | None = None,
        concurrency: int = 1,
        pending_batches: int = 4,
    ) -> None:
        self.service = service
        self.group_id = f"touchstream-{service}"
        self.pool = pool
        self.broker = broker
        self.handlers = handlers
        self.after_commit = after_commit
        self.dlq_limit_ratio = dlq_limit_ratio
        self.dlq_limit_window = dlq_limit_window
        self.on_fatal = on_fatal
        self.stats = ConsumerStats(recent=deque(maxlen=dlq_limit_window))
        self.stopping = False
        #: Lanes (partitions) applying side by side, each in its own transaction.
        self.concurrency = max(concurrency, 1)
        self.max_pending = max(pending_batches, 1) * max_batch
        self._lanes: dict[TopicPartition, _Lane] = {}
        self._slots = asyncio.Semaphore(self.concurrency)
        self._pending = 0
        self._room = asyncio.Event()
        self._room.set()
        self._kafka: AIOKafkaConsumer | None = None
        self._generation = 0
        self._offsets: dict[TopicPartition, int] = {}
        self._commit_wake = asyncio.Event()
        self._committer: asyncio.Task[None] | None = None
        self.subscriber = broker.subscriber(
            *handlers.keys(),
            group_id=self.group_id,
            batch=True,
            max_records=max_batch,
            # An empty poll waits this long and then faststream sleeps as long again:
            # the delay before an idle consumer sees its first record.
            batch_timeout_ms=poll_timeout_ms,
            fetch_max_wait_ms=fetch_max_wait_ms,
            ack_policy=AckPolicy.MANUAL,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(session_timeout_ms // 3, 300),
            # The wrapper decodes records itself (and dead-letters what does not decode).
            decoder=_skip_decoding,
            listener=_Rebalance(self),
        )
        self.subscriber(self._consume)

    async def _consume(self, body: Any, msg: KafkaMessage) -> None:
        """Hand a fetched batch to its partitions' lanes; return once there is room
        for more (offsets are committed by the lanes, after each commit in the
        database)."""
        raw = msg.raw_message
        records: tuple[ConsumerRecord[Any, Any], ...] = raw if isinstance(raw, tuple) else (raw,)
        kafka = msg.consumer
        if isinstance(kafka, AIOKafkaConsumer):
            self._kafka = kafka
        generation = self._generation
        while self._pending >= self.max_pending and not self.stopping:
            self._room.clear()
            await self._room.wait()
        if self.stopping or generation != self._generation:
            return  # not committed: whoever owns the partitions now gets them again
        assigned = self._kafka.assignment() if self._kafka is not None else None
        groups: dict[TopicPartition, list[ConsumerRecord[Any, Any]]] = {}
        for record in records:
            groups.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        for tp, group in groups.items():
            if assigned is not None and tp not in assigned:
                continue
            lane = self._lanes.get(tp)
            if lane is None:
                lane = self._lanes[tp] = _Lane(tp)
            if lane.rewind_to is not None:
                if group[0].offset != lane.rewind_to:
                    continue  # fetched before the rewind: it comes again after it
                lane.rewind_to = None
            lane.queue.append(group)
            self._pending += len(group)
            lane.wake.set()
            if lane.task is None or lane.task.done():
                lane.task = asyncio.create_task(self._run_lane(lane))

    async def _run_lane(self, lane: _Lane) -> None:
        broken = False
        while True:
            if not broken and not lane.stopping:
                self._start_ready(lane)
            if not lane.running:
                if lane.stopping or broken:
                    self._drop(lane)
                return
            pending = [b.task for b in lane.running if b.running]
            if pending:
                lane.wake.clear()
                waker = asyncio.ensure_future(lane.wake.wait())
                try:
                    await asyncio.wait([*pending, waker], return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waker.cancel()
            self._commit_applied(lane)
            errors = [e for e in (b.error() for b in lane.running) if e is not None]
            broken = broken or bool(errors)
            if not (broken or lane.stopping):
                continue
            self._drop(lane)
            if any(b.running for b in lane.running):
                continue  # let what runs finish (and commit) first
            if lane.running:
                # The first batch not applied, and all after it, come again.
                first = lane.running[0].records[0].offset
                error = errors[0] if errors else None
                self.stats.last_error = repr(error)
                log.warning("%s: batch not applied, will retry: %r", self.service, error)
                for batch in lane.running:
                    self._release(len(batch.records))
                lane.running.clear()
                if not lane.stopping and self._lanes.get(lane.tp) is lane and self._kafka:
                    lane.rewind_to = first
                    with contextlib.suppress(Exception):  # revoked meanwhile: nothing to do
                        self._kafka.seek(lane.tp, first)
            return

    def _start_ready(self, lane: _Lane) -> None:
        """Start queued batches, in order, while the lane has room and none shares a
        lead with a batch still running."""
        while lane.queue and len(lane.running) < self.concurrency:
            keys = _keys(lane.queue[0])
            if any(b.running and b.conflicts(keys) for b in lane.running):
                return
            records = lane.queue.popleft()
            lane.running.append(_Batch(records, keys, asyncio.ensure_future(self.process(records))))

    def _commit_applied(self, lane: _Lane) -> None:
        """Commit the offsets of the applied batches at the head of the lane."""
        while lane.running:
            head = lane.running[0]
            if head.running or head.error() is not None:
                return
            lane.running.pop(0)
            self._release(len(head.records))
            self._commit(lane.tp, head.records[-1].offset + 1)
            try:
                self._check_dlq_limit()
            except DlqLimitExceeded as exc:
                log.error("%s", exc)
                if self.on_fatal is not None:
                    self.on_fatal(exc)

    def _drop(self, lane: _Lane) -> None:
        """Forget a lane's batches not started."""
        while lane.queue:
            self._release(len(lane.queue.pop()))

    def _release(self, count: int) -> None:
        self._pending -= count
        if self._pending < self.max_pending:
            self._room.set()

    def _commit(self, tp: TopicPartition, offset: int) -> None:
        self._offsets[tp] = offset
        self._commit_wake.set()
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_loop())

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wake.wait()
            self._commit_wake.clear()
            await self._flush_offsets()

    async def _flush_offsets(self) -> None:
        """Commit the offsets of applied batches (one request for every lane)."""
        if not self._offsets or self._kafka is None:
            return
        offsets, self._offsets = self._offsets, {}
        assigned = self._kafka.assignment()
        offsets = {tp: offset for tp, offset in offsets.items() if tp in assigned}
        if not offsets:
            return
        try:
            await self._kafka.commit(offsets)
        except KafkaError as exc:
            # Applied in the database: a redelivery is skipped by the inbox.
            log.warning("%s: offset commit failed: %r", self.service, exc)

    def _stop_lanes(self, lanes: Sequence[_Lane]) -> list[asyncio.Task[None]]:
        """Let these lanes finish what runs and start nothing more; their tasks."""
        running: list[asyncio.Task[None]] = []
        for lane in lanes:
            lane.stopping = True
            lane.wake.set()
            if lane.task is not None and not lane.task.done():
                running.append(lane.task)
            else:
                self._drop(lane)
        return running

    async def release(self, partitions: Sequence[TopicPartition]) -> None:
        """Partitions are being revoked: finish the batches in hand, commit, drop the rest."""
        self._generation += 1
        lanes = [lane for tp in partitions if (lane := self._lanes.pop(tp, None)) is not None]
        running = self._stop_lanes(lanes)
        if running:
            await asyncio.gather(*running, return_exceptions=True)
        await self._flush_offsets()

    async def close(self, timeout: float = 15.0) -> None:
        """Stop taking batches, finish those in hand, commit their offsets."""
        self.stopping = True
        self._room.set()
        running = self._stop_lanes(list(self._lanes.values()))
        if running:
            await asyncio.wait(running, timeout=timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush_offsets(), timeout)
        if self._committer is not None:
            self._committer.cancel()

    async def process(self, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """Apply one batch. Returns when it is committed in the database and every
        dead letter is published; raises when the batch must be retried."""
        self.stats.batches += 1
        items = [self._decode(r) for r in records]
        valid = [i for i in items if i.event is not None]
        dead = [i for i in items if i.event is None]

        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            try:
                # Decoding above and backoff below happen outside the slot: only the
                # transactions count against ``concurrency``.
                async with self._slots:
                    dead += await self._apply(valid)
                break
            except Exception as exc:
                if self.stopping:
                    raise
                if is_transient(exc):
                    log.warning("%s: transient failure, retrying: %r", self.service, exc)
                elif len(valid) > 1:
                    log.warning("%s: batch failed, isolating events: %r", self.service, exc)
                    async with self._slots:
                        dead += await self._apply_one_by_one(valid)
                    break
                elif attempt >= 3 and valid:
                    valid[0].reason = f"handler error: {exc!r}"
                    dead.append(valid[0])
                    break
                else:
                    log.warning("%s: event failed (attempt %d): %r", self.service, attempt, exc)
                self.stats.last_error = repr(exc)
                if attempt >= 8:
                    raise
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 5.0)

        if dead:
            await self._dead_letter(dead)
        self.stats.recent.extend([False] * (len(items) - len(dead)) + [True] * len(dead))

    def _decode(self, record: ConsumerRecord[Any, Any]) -> _Item:
        item = _Item(record)
        value = record.value
        if not isinstance(value, bytes | bytearray):
            item.reason = "invalid event: empty message"
            return item
        try:
            item.event = decode(record.topic, bytes(value))
        except (ValidationError, ValueError) as exc:
            item.reason = _reason(exc)
        return item

    async def _apply(self, items: list[_Item]) -> list[_Item]:
        """Apply valid events in one transaction; return those the handlers rejected."""
        if not items:
            return []
        seen: set[uuid.UUID] = set()
        unique: list[_Item] = []
        for item in items:
            assert item.event is not None
            if item.event.event_id not in seen:
                seen.add(item.event.event_id)
                unique.append(item)
        rejected: list[_Item] = []
        async with self.pool.acquire() as conn, conn.transaction():
            fresh = set(
                await conn.fetchval(
                    "WITH ins AS (INSERT INTO inbox (consumer, event_id)"
                    " SELECT $1, unnest($2::uuid[]) ON CONFLICT DO NOTHING RETURNING event_id)"
                    " SELECT coalesce(array_agg(event_id), '{}') FROM ins",
                    self.service,
                    [i.event.event_id for i in unique if i.event is not None],
                )
            )
            by_topic: dict[str, list[_Item]] = {}
            for item in unique:
                assert item.event is not None
                if item.event.event_id in fresh:
                    by_topic.setdefault(item.record.topic, []).append(item)
            self.stats.duplicates += len(items) - sum(len(v) for v in by_topic.values())
            for topic, topic_items in by_topic.items():
                handler = self.handlers[topic]
                rejections = await handler(conn, [i.event for i in topic_items]) or []
                reasons = {r.event.event_id: r.reason for r in rejections}
                for item in topic_items:
                    assert item.event is not None
                    if item.event.event_id in reasons:
                        item.reason = reasons[item.event.event_id]
                        rejected.append(item)
            if rejected:
                # Forget rejected events so a redelivery (e.g. after a crash before the
                # dead letter is published) rejects them again instead of skipping them.
                await conn.execute(
                    "DELETE FROM inbox WHERE consumer = $1 AND event_id = ANY($2::uuid[])",
                    self.service,
                    [i.event.event_id for i in rejected if i.event is not None],
                )
        self.stats.applied += sum(1 for _ in items) - len(rejected)
        if self.after_commit is not None:
            self.after_commit()
        return rejected

    async def _apply_one_by_one(self, items: list[_Item]) -> list[_Item]:
        dead: list[_Item] = []
        failures: list[tuple[_Item, BaseException]] = []
        for item in items:
            try:
                dead += await self._apply([item])
            except Exception as exc:
                if is_transient(exc):
                    raise
                failures.append((item, exc))
        if failures and len(failures) == len(items):
            # Every event fails on its own: the fault is ours (a bad deploy, a broken
            # schema), not the data's. Retry rather than dead-letter everything.
            raise failures[0][1]
        for item, error in failures:
            item.reason = f"handler error: {error!r}"
            dead.append(item)
        return dead

    async def _dead_letter(self, items: list[_Item]) -> None:
        now = datetime.now(UTC).isoformat()
        records = []
        for item in items:
            r = item.record
            headers = {k: v.decode(errors="replace") for k, v in (r.headers or ())}
            headers.update(
                {
                    "dlq-reason": (item.reason or "unknown")[:2000],
                    "dlq-topic": r.topic,
                    "dlq-partition": str(r.partition),
                    "dlq-offset": str(r.offset),
                    "dlq-consumer": self.service,
                    "dlq-failed-at": now,
                }
            )
            value = r.value if isinstance(r.value, bytes) else b""
            key = r.key if isinstance(r.key, bytes) else b""
            records.append(OutgoingRecord(topics.dlq(r.topic), key, value, headers))
            log.warning(
                "%s: %s[%d]@%d -> %s: %s",
                self.service,
                r.topic,
                r.partition,
                r.offset,
                topics.dlq(r.topic),
                item.reason,
            )
        await publish_all(self.broker, records)
        self.stats.dead_lettered += len(items)

    def _check_dlq_limit(self) -> None:
        recent = self.stats.recent
        if len(recent) < self.dlq_limit_window:
            return
        ratio = sum(recent) / len(recent)
        if ratio >= self.dlq_limit_ratio:
            raise DlqLimitExceeded(
                f"{self.service}: {ratio:.0%} of the last {len(recent)} messages went to the "
                "DLQ; stopping: this looks like a bad deploy, not bad data"
            )
