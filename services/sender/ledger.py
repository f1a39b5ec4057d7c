"""Group commit for the hand-off path.

Every message a lane hands over costs two writes: the ``sending`` mark before the
message (the point of no return) and the ``sent`` record with its EmailSent after the
server's 250. The ledger writes the records the lanes asked for meanwhile in one
statement, and their marks in another: while one statement is on its way the next
requests gather, so under load a statement carries several lanes' requests, and
with little load each is written at once.

What a lane relies on is kept:

- A record is written as soon as the records before it are: it never waits behind
  marks, which keeps short the window in which a crash leaves a delivery handed over
  but not recorded (uncertain). It is never dropped: through a database outage it is
  written again, with a backoff.
- A lane's mark is asked for only once that lane's previous record is committed
  (``after``), in a statement of its own. So a lane has at most one delivery handed
  off and not recorded, and between that record's commit and the next mark's it has
  none. Writing a record and the lane's next mark in one statement was tried (with
  the next envelope pipelined behind each message): it saves a statement per email
  but keeps every busy lane with a delivery at stake all the time. Chaos runs could
  not tell the two apart (uncertain per sender kill 0.69 and 0.78 together, 0.64 and
  0.5 apart); the smaller exposure was kept.
- A mark is answered once committed (True: the delivery is ours to hand over; False:
  it is no longer ours, or its second of the global rate is over). It is not retried:
  the statement's error is raised to its lane, as a single statement's would be.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from services.runtime.consumer import is_transient
from services.runtime.db import INDEX_LOOKUPS

log = logging.getLogger(__name__)


#: The ledger's sessions (two connections of their own: its writers hold one each).
#: Its statements update deliveries by primary key, a handful at a time.
#: PostgreSQL plans them anew at every call by default (the arrays' sizes make
#: custom plans look cheaper), which took longer than running them; here each is
#: planned once per connection, and by index (see INDEX_LOOKUPS).
LEDGER_SESSION = {"plan_cache_mode": "force_generic_plan", **INDEX_LOOKUPS}


@dataclass(frozen=True, slots=True)
class Mark:
    """Mark a claimed delivery ``sending``: while still claimed by ``owner`` and,
    under a global rate, within the wall-clock second ``rate_second``."""

    key: str
    owner: str
    lease_seconds: float
    message_id: str
    from_email: str
    from_name: str | None
    attempt: int
    rate_second: datetime | None = None


@dataclass(frozen=True, slots=True)
class SentRecord:
    """A hand-off's outcome and its EmailSent. It carries everything the mark wrote,
    so the outcome stands on its own."""

    key: str
    smtp_code: int
    smtp_response: str
    sent_at: datetime
    links: list[str]
    transport: str | None
    provider_message_id: str | None
    message_id: str
    from_email: str
    from_name: str | None
    #: (topic, kafka key, payload, event id, event type)
    outbox_row: tuple[str, bytes, bytes, Any, str]


# Keys are sorted so that two statements lock the rows they share in the same order.
RECORD = """
WITH sent AS (
    UPDATE deliveries AS d SET status = 'sent', status_reason = NULL,
        smtp_code = r.smtp_code, smtp_response = r.smtp_response, sent_at = r.sent_at,
        links = r.links::jsonb, transport = r.transport,
        provider_message_id = r.provider_message_id, message_id = r.message_id,
        from_email = r.from_email, from_name = r.from_name, lease_until = NULL,
        updated_at = clock_timestamp()
    FROM unnest($1::text[], $2::int[], $3::text[], $4::timestamptz[], $5::text[],
                $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
        AS r(key, smtp_code, smtp_response, sent_at, links, transport,
             provider_message_id, message_id, from_email, from_name)
    WHERE d.delivery_key = r.key
    RETURNING d.delivery_key
)
INSERT INTO outbox (topic, kafka_key, payload, event_id, event_type)
SELECT e.topic, e.kafka_key, e.payload, e.event_id, e.event_type
FROM unnest($1::text[], $11::text[], $12::bytea[], $13::bytea[], $14::uuid[], $15::text[])
    WITH ORDINALITY AS e(key, topic, kafka_key, payload, event_id, event_type, n)
JOIN sent ON sent.delivery_key = e.key
ORDER BY e.n
"""

MARK = """
UPDATE deliveries AS d SET status = 'sending', message_id = m.message_id,
    from_email = m.from_email, from_name = m.from_name, attempts = m.attempt,
    handed_off_at = t.now, lease_until = t.now + make_interval(secs => m.lease),
    updated_at = t.now
FROM (SELECT clock_timestamp() AS now) AS t,
    unnest($1::text[], $2::text[], $3::float8[], $4::text[], $5::text[], $6::text[],
           $7::int[], $8::timestamptz[])
    AS m(key, owner, lease, message_id, from_email, from_name, attempt, rate_second)
WHERE d.delivery_key = m.key AND d.claimed_by = m.owner AND d.status = 'claimed'
  AND (m.rate_second IS NULL OR date_trunc('second', t.now) = m.rate_second)
RETURNING d.delivery_key, m.owner
"""


def _record_arguments(records: list[SentRecord]) -> list[Any]:
    records = sorted(records, key=lambda r: r.key)
    return [
        [r.key for r in records],
        [r.smtp_code for r in records],
        [r.smtp_response for r in records],
        [r.sent_at for r in records],
        [json.dumps(r.links) for r in records],
        [r.transport for r in records],
        [r.provider_message_id for r in records],
        [r.message_id for r in records],
        [r.from_email for r in records],
        [r.from_name for r in records],
        *([row[i] for row in (r.outbox_row for r in records)] for i in range(5)),
    ]


def _mark_arguments(marks: list[Mark]) -> list[Any]:
    marks = sorted(marks, key=lambda m: m.key)
    return [
        [m.key for m in marks],
        [m.owner for m in marks],
        [m.lease_seconds for m in marks],
        [m.message_id for m in marks],
        [m.from_email for m in marks],
        [m.from_name for m in marks],
        [m.attempt for m in marks],
        [m.rate_second for m in marks],
    ]


Batch = list[tuple[Any, asyncio.Future[Any]]]


class _GroupCommit:
    """Requests written together: while one statement is on its way, the next gather.

    ``answer`` settles a written batch's futures from the statement's rows. With
    ``retry``, a batch that fails transiently is written again (with what came
    meanwhile) after a backoff; otherwise the error goes to every future."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        sql: str,
        arguments: Callable[[list[Any]], list[Any]],
        answer: Callable[[Batch, list[asyncpg.Record]], None],
        *,
        retry: bool,
    ) -> None:
        self.pool = pool
        self._sql = sql
        self._arguments = arguments
        self._answer = answer
        self._retry = retry
        self._queue: Batch = []
        self._writer: asyncio.Task[None] | None = None
        #: Statements written and the requests they carried (how well they batch).
        self.statements = 0
        self.requests = 0

    def submit(self, request: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        return future

    async def _write_all(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._write(batch)
        finally:
            self._writer = None

    async def _write(self, batch: Batch) -> None:
        backoff = 0.1
        while True:
            if not self._retry:  # nobody waits for a cancelled request any more
                batch = [(request, future) for request, future in batch if not future.done()]
            if not batch:
                return
            try:
                async with self.pool.acquire() as conn:
                    rows = await conn.fetch(self._sql, *self._arguments([r for r, _ in batch]))
            except Exception as exc:
                if self._retry and is_transient(exc):
                    log.warning("recording hand-offs failed, retrying: %r", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    batch, self._queue = batch + self._queue, []
                    continue
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            self.statements += 1
            self.requests += len(batch)
            self._answer(batch, rows)
            return


def _answer_marks(batch: Batch, rows: list[asyncpg.Record]) -> None:
    marked = {(row["delivery_key"], row["owner"]) for row in rows}
    for mark, future in batch:
        if not future.done():
            future.set_result((mark.key, mark.owner) in marked)


class HandOffLedger:
    """Writes lanes' ``sending`` marks and ``sent`` records, group-committed."""

    def __init__(self, pool: asyncpg.Pool, *, on_recorded: Callable[[], None]) -> None:
        self._on_recorded = on_recorded
        self.records = _GroupCommit(
            pool, RECORD, _record_arguments, self._answer_records, retry=True
        )
        self.marks = _GroupCommit(pool, MARK, _mark_arguments, _answer_marks, retry=False)

    async def mark_sending(self, mark: Mark, *, after: asyncio.Future[None] | None) -> bool:
        """True once the mark is committed; False if the delivery is not ours to send.
        ``after``: the lane's previous record, committed first (its failure is raised)."""
        if after is not None:
            await asyncio.shield(after)
        marked: bool = await self.marks.submit(mark)
        return marked

    def record_sent(self, record: SentRecord) -> asyncio.Future[None]:
        """Done once the record and its event are committed."""
        future: asyncio.Future[None] = self.records.submit(record)
        return future

    def _answer_records(self, batch: Batch, rows: list[asyncpg.Record]) -> None:
        for _, future in batch:
            if not future.done():
                future.set_result(None)
        self._on_recorded()  # once per statement: the relay publishes its events
