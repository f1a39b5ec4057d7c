"""Group commit for the hand-off path.

Every message a lane hands over costs two writes: the ``sending`` mark before DATA
(the point of no return) and the ``sent`` record with its EmailSent after the
server's 250. Lanes ask the ledger for them; the ledger writes whatever the lanes
have asked for meanwhile in one statement, atomic as a whole, and answers each of
them. While one statement is on its way the next requests gather, so under load a
statement carries several lanes' marks and records, and with little load each
request is written at once, as before.

What a lane relies on is kept:

- A mark is answered only once it is committed (True: the delivery is ours to hand
  over; False: it is no longer ours, or its second of the global rate is over).
- A lane's mark is never committed before the record of that lane's previous
  hand-off (``after``): the record went in an earlier statement or goes in the same
  one. So a lane has at most one delivery handed off and not recorded, and a crash
  leaves at most one uncertain delivery per lane.
- A record is never dropped: through a database outage it is written again with a
  backoff, in the next statement. A mark is not retried: the statement's error is
  raised to its lane, as a single statement's would be.
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


# The records' updates and their outbox rows, then the marks, in one statement. The
# records and the marks touch different deliveries (a delivery is marked before it is
# recorded, and a lane waits for its mark's answer). Keys are sorted so that two
# statements lock the rows they share in the same order.
WRITE = """
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
), events AS (
    INSERT INTO outbox (topic, kafka_key, payload, event_id, event_type)
    SELECT e.topic, e.kafka_key, e.payload, e.event_id, e.event_type
    FROM unnest($1::text[], $11::text[], $12::bytea[], $13::bytea[], $14::uuid[],
                $15::text[]) WITH ORDINALITY
        AS e(key, topic, kafka_key, payload, event_id, event_type, n)
    JOIN sent ON sent.delivery_key = e.key
    ORDER BY e.n
), marked AS (
    UPDATE deliveries AS d SET status = 'sending', message_id = m.message_id,
        from_email = m.from_email, from_name = m.from_name, attempts = m.attempt,
        handed_off_at = t.now, lease_until = t.now + make_interval(secs => m.lease),
        updated_at = t.now
    FROM (SELECT clock_timestamp() AS now) AS t,
        unnest($16::text[], $17::text[], $18::float8[], $19::text[], $20::text[],
               $21::text[], $22::int[], $23::timestamptz[])
        AS m(key, owner, lease, message_id, from_email, from_name, attempt, rate_second)
    WHERE d.delivery_key = m.key AND d.claimed_by = m.owner AND d.status = 'claimed'
      AND (m.rate_second IS NULL OR date_trunc('second', t.now) = m.rate_second)
    RETURNING d.delivery_key
)
SELECT delivery_key FROM marked
"""


def _arguments(records: list[SentRecord], marks: list[Mark]) -> list[Any]:
    records = sorted(records, key=lambda r: r.key)
    marks = sorted(marks, key=lambda m: m.key)
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
        [m.key for m in marks],
        [m.owner for m in marks],
        [m.lease_seconds for m in marks],
        [m.message_id for m in marks],
        [m.from_email for m in marks],
        [m.from_name for m in marks],
        [m.attempt for m in marks],
        [m.rate_second for m in marks],
    ]


@dataclass(eq=False, slots=True)
class _Pending:
    mark: Mark | None
    record: SentRecord | None
    future: asyncio.Future[Any]
    #: A mark's lane's previous record: the mark is refused if that record failed.
    after: asyncio.Future[None] | None = None


class HandOffLedger:
    """Writes lanes' ``sending`` marks and ``sent`` records, group-committed."""

    def __init__(self, pool: asyncpg.Pool, *, on_recorded: Callable[[], None]) -> None:
        self._pool = pool
        self._on_recorded = on_recorded
        self._queue: list[_Pending] = []
        self._writer: asyncio.Task[None] | None = None
        #: Statements written and requests they carried (a measure of the batching).
        self.statements = 0
        self.requests = 0

    def mark_sending(
        self, mark: Mark, *, after: asyncio.Future[None] | None
    ) -> asyncio.Future[bool]:
        """True once the mark is committed; False if the delivery is not ours to send.
        ``after``: the lane's previous record, committed first or together."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(mark, None, future, after))
        return future

    def record_sent(self, record: SentRecord) -> asyncio.Future[None]:
        """Done once the record and its event are committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._enqueue(_Pending(None, record, future))
        return future

    async def drain(self) -> None:
        """Wait until everything asked for so far is written (or has failed)."""
        while self._writer is not None:
            await asyncio.shield(self._writer)

    def _enqueue(self, pending: _Pending) -> None:
        self._queue.append(pending)
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())

    async def _write_all(self) -> None:
        backoff = 0.1
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                retry = await self._write(batch)
                if retry:
                    # The records go first in the next statement, with what came meanwhile.
                    self._queue[:0] = retry
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                else:
                    backoff = 0.1
        finally:
            self._writer = None

    async def _write(self, batch: list[_Pending]) -> list[_Pending]:
        """Write one batch; the records to write again (a transient failure)."""
        marks: list[_Pending] = []
        records: list[_Pending] = []
        for pending in batch:
            if pending.record is not None:
                records.append(pending)  # written even if its lane stopped waiting
                continue
            if pending.future.done():  # its lane was cancelled: nothing to hand over
                continue
            after = pending.after
            if after is not None and after.done() and after.exception() is not None:
                pending.future.set_exception(
                    RuntimeError("the lane's previous hand-off could not be recorded")
                )
                continue
            marks.append(pending)
        if not marks and not records:
            return []
        try:
            async with self._pool.acquire() as conn:
                rows = await conn.fetch(
                    WRITE,
                    *_arguments(
                        [p.record for p in records if p.record is not None],
                        [p.mark for p in marks if p.mark is not None],
                    ),
                )
        except Exception as exc:
            for pending in marks:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            if is_transient(exc):
                log.warning("recording hand-offs failed, retrying: %r", exc)
                return records
            for pending in records:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return []
        self.statements += 1
        self.requests += len(marks) + len(records)
        marked = {row["delivery_key"] for row in rows}
        for pending in marks:
            if not pending.future.done() and pending.mark is not None:
                pending.future.set_result(pending.mark.key in marked)
        for pending in records:
            if not pending.future.done():
                pending.future.set_result(None)
        if records:
            self._on_recorded()
        return []
