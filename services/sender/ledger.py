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
- A lane's mark is committed only with or after that lane's previous record
  (``after``). So a lane has at most one delivery handed off and not recorded. A
  lane usually asks for its next mark right after its record (the next envelope
  came back with the 250); if that record is still waiting for its statement and
  no marks statement is on its way, the two go together, at once, in one
  statement (atomic: the mark cannot stand without the record).
- A mark is answered once committed (True: the delivery is ours to hand over; False:
  it is no longer ours, or its second of the global rate is over). It is not retried:
  the statement's error is raised to its lane, as a single statement's would be (a
  record that went with it goes back to the records, and is written again).
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

log = logging.getLogger(__name__)


#: The ledger's sessions (two connections of their own: its writers hold one each).
#: Its statements update deliveries by primary key, a handful at a time, and the
#: only good plan for them is index lookups. PostgreSQL plans them anew at every
#: call by default (the arrays' sizes make custom plans look cheaper), which took
#: longer than running them; here each is planned once per connection. A plan made
#: while the table is nearly empty would seq-scan it for as long as it stays cached:
#: so no sequential scans and no hash or merge joins in these sessions.
LEDGER_SESSION = {
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}


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


# The records' updates ($1-$10) and their outbox rows ($11-$15), for the statements
# below. Keys are sorted so that two statements lock the rows they share in the same
# order.
_SENT = """
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
"""
_EVENTS = """
    INSERT INTO outbox (topic, kafka_key, payload, event_id, event_type)
    SELECT e.topic, e.kafka_key, e.payload, e.event_id, e.event_type
    FROM unnest($1::text[], $11::text[], $12::bytea[], $13::bytea[], $14::uuid[],
                $15::text[])
        WITH ORDINALITY AS e(key, topic, kafka_key, payload, event_id, event_type, n)
    JOIN sent ON sent.delivery_key = e.key
    ORDER BY e.n
"""

RECORD = f"WITH sent AS ({_SENT}){_EVENTS}"


def _mark_sql(first: int) -> str:
    """The marks' update, its arguments numbered from ``first``: RETURNING the keys
    marked and their owners."""
    n = [f"${first + i}" for i in range(8)]
    return f"""
UPDATE deliveries AS d SET status = 'sending', message_id = m.message_id,
    from_email = m.from_email, from_name = m.from_name, attempts = m.attempt,
    handed_off_at = t.now, lease_until = t.now + make_interval(secs => m.lease),
    updated_at = t.now
FROM (SELECT clock_timestamp() AS now) AS t,
    unnest({n[0]}::text[], {n[1]}::text[], {n[2]}::float8[], {n[3]}::text[],
           {n[4]}::text[], {n[5]}::text[], {n[6]}::int[], {n[7]}::timestamptz[])
    AS m(key, owner, lease, message_id, from_email, from_name, attempt, rate_second)
WHERE d.delivery_key = m.key AND d.claimed_by = m.owner AND d.status = 'claimed'
  AND (m.rate_second IS NULL OR date_trunc('second', t.now) = m.rate_second)
RETURNING d.delivery_key, m.owner
"""


MARK = _mark_sql(1)


# A lane's record and its next mark, together (different deliveries: a delivery is
# marked before it is recorded).
RECORD_AND_MARK = f"""
WITH sent AS ({_SENT}), events AS ({_EVENTS}), marked AS ({_mark_sql(16)})
SELECT delivery_key, owner FROM marked
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


@dataclass(frozen=True, slots=True)
class _MarkRequest:
    mark: Mark
    #: The lane's previous record, taken from the records' queue to go along.
    record: SentRecord | None = None
    recorded: asyncio.Future[None] | None = None


def _marks_statement(requests: list[_MarkRequest]) -> tuple[str, list[Any]]:
    marks = _mark_arguments([r.mark for r in requests])
    records = [r.record for r in requests if r.record is not None]
    if not records:
        return MARK, marks
    return RECORD_AND_MARK, [*_record_arguments(records), *marks]


def _records_statement(records: list[SentRecord]) -> tuple[str, list[Any]]:
    return RECORD, _record_arguments(records)


Batch = list[tuple[Any, asyncio.Future[Any]]]


class _GroupCommit:
    """Requests written together: while one statement is on its way, the next gather.

    ``statement`` makes the SQL and its arguments for a batch; ``answer`` settles a
    written batch's futures from the statement's rows. With ``retry``, a batch that
    fails transiently is written again (with what came meanwhile) after a backoff;
    otherwise the error goes to every future, and ``failed`` hears of the requests
    not written (failed, or cancelled before their statement)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        statement: Callable[[list[Any]], tuple[str, list[Any]]],
        answer: Callable[[Batch, list[asyncpg.Record]], None],
        *,
        retry: bool,
        failed: Callable[[Batch], None] | None = None,
    ) -> None:
        self.pool = pool
        self._statement = statement
        self._answer = answer
        self._retry = retry
        self._failed = failed
        self._queue: Batch = []
        self._writer: asyncio.Task[None] | None = None
        self._writing = False
        #: Statements written and the requests they carried (how well they batch).
        self.statements = 0
        self.requests = 0

    @property
    def writing(self) -> bool:
        """A statement is on its way: what is asked for now waits for it."""
        return self._writing

    def submit(
        self, request: Any, future: asyncio.Future[Any] | None = None
    ) -> asyncio.Future[Any]:
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        return future

    def take(self, future: asyncio.Future[Any]) -> Any | None:
        """The request answered by ``future``, out of the queue if no statement has
        taken it yet (the caller writes it another way); else None."""
        for index, (request, queued) in enumerate(self._queue):
            if queued is future:
                del self._queue[index]
                return request
        return None

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
                cancelled = [(request, future) for request, future in batch if future.done()]
                if cancelled and self._failed is not None:
                    self._failed(cancelled)
                batch = [(request, future) for request, future in batch if not future.done()]
            if not batch:
                return
            try:
                sql, arguments = self._statement([r for r, _ in batch])
                self._writing = True
                try:
                    async with self.pool.acquire() as conn:
                        rows = await conn.fetch(sql, *arguments)
                finally:
                    self._writing = False
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
                if self._failed is not None:
                    self._failed(batch)
                return
            self.statements += 1
            self.requests += len(batch)
            self._answer(batch, rows)
            return


class HandOffLedger:
    """Writes lanes' ``sending`` marks and ``sent`` records, group-committed."""

    def __init__(self, pool: asyncpg.Pool, *, on_recorded: Callable[[], None]) -> None:
        self._on_recorded = on_recorded
        self.records = _GroupCommit(pool, _records_statement, self._answer_records, retry=True)
        self.marks = _GroupCommit(
            pool, _marks_statement, self._answer_marks, retry=False, failed=self._requeue
        )
        #: Records that went out along with their lane's next mark.
        self.records_with_marks = 0

    async def mark_sending(self, mark: Mark, *, after: asyncio.Future[None] | None) -> bool:
        """True once the mark is committed; False if the delivery is not ours to send.
        ``after``: the lane's previous record, committed first or in the same
        statement (its failure is raised)."""
        request = _MarkRequest(mark)
        if after is not None:
            # The record goes with the mark unless it would then wait where it need not:
            # behind a marks statement on its way while no records statement is.
            record = (
                self.records.take(after)
                if not after.done() and (self.records.writing or not self.marks.writing)
                else None
            )
            if record is None:
                await asyncio.shield(after)
            else:
                request = _MarkRequest(mark, record, after)
        marked: bool = await self.marks.submit(request)
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

    def _answer_marks(self, batch: Batch, rows: list[asyncpg.Record]) -> None:
        marked = {(row["delivery_key"], row["owner"]) for row in rows}
        recorded = 0
        for request, future in batch:
            if not future.done():
                future.set_result((request.mark.key, request.mark.owner) in marked)
            if request.recorded is not None:
                recorded += 1
                if not request.recorded.done():
                    request.recorded.set_result(None)
        if recorded:
            self.records_with_marks += recorded
            self._on_recorded()

    def _requeue(self, batch: Batch) -> None:
        """Marks not written (their statement failed, or their lanes gave up on them):
        the records that were to go with them are written on their own (a record is
        never dropped); the marks' lanes have the error."""
        for request, _ in batch:
            if request.record is not None and request.recorded is not None:
                self.records.submit(request.record, request.recorded)
