"""Sender wiring: consumer, dispatcher, HTTP face."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI

from schemas import topics
from schemas.events import BounceType, EngagementReceived, EnrollmentStopped, FailureKind, StepDue
from services.runtime.consumer import TopicHandler, is_transient
from services.runtime.db import create_pool
from services.runtime.service import BackgroundLoop, Service, StartupError
from services.runtime.settings import SenderSettings
from services.sender import api, domain, handlers, repo
from services.sender.domain import Caps, RejectionClass
from services.sender.ledger import LEDGER_SESSION, HandOffLedger, Mark, SentRecord
from services.sender.mailboxes import Mailbox, TransportPool, mailbox_from_row
from services.sender.mime import (
    BuiltMessage,
    InvalidMessage,
    OutgoingEmail,
    TrackingConfig,
    build_message,
)
from services.sender.transport import (
    HandOffRefused,
    HandOffUncertain,
    PermanentSendError,
    TransientSendError,
    Transport,
)

log = logging.getLogger(__name__)


@dataclass
class Job:
    row: asyncpg.Record
    mailbox: Mailbox
    dry_run: bool
    #: The cap counters (scope, window start) its claim counted it under.
    reserved: tuple[tuple[str, datetime], ...] = ()
    #: Under a global rate: the wall-clock second (database time) this job's hand-off
    #: was granted in, and the event-loop time at which that second is over here.
    rate_second: datetime | None = None
    rate_deadline: float | None = None


@dataclass
class Ready:
    """A job whose message is built, with the transports to try in order."""

    job: Job
    built: BuiltMessage
    transports: list[Transport]


@dataclass
class Lane:
    """One connection's run of jobs, sent one after the other.

    A hand-off's ``sent`` record goes to the ledger while the lane goes on with the
    next message (whose envelope, pipelined, went out with this one); the ledger
    commits the next hand-off's ``sending`` mark after that record. So a lane never
    has more than one delivery handed off but not recorded, and a crash leaves at
    most one uncertain delivery per lane."""

    transports: TransportPool
    recording: asyncio.Future[None] | None = None

    async def recorded(self) -> None:
        """Wait for the previous hand-off's record; its failure is raised here."""
        future, self.recording = self.recording, None
        if future is not None:
            await asyncio.shield(future)


class SenderService(Service[SenderSettings]):
    name = "sender"
    migrations_dir = Path(__file__).parent / "migrations"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        if s.tracking_secret is None:
            raise ValueError("TOUCHSTREAM_TRACKING_SECRET must be set: it signs tracking links")
        if not domain.serves_one_click(s.tracker_public_url):
            log.warning(
                "TRACKER_PUBLIC_URL %s is not https: mail clients only offer RFC 8058"
                " one-click unsubscribe for https URLs (fine on a laptop, not in production)",
                s.tracker_public_url,
            )
        self.tracking = TrackingConfig(
            base_url=s.tracker_public_url.rstrip("/"),
            secret=s.tracking_secret.get_secret_value().encode(),
            unsubscribe_mailto=s.unsubscribe_mailto,
            physical_address=s.physical_address,
        )
        # One pool of live transports per lane: a lane sends one message at a time.
        self.lanes = [TransportPool() for _ in range(s.concurrency)]
        self._ledger: HandOffLedger | None = None
        self._ledger_pool: asyncpg.Pool | None = None
        self._ready = asyncio.Event()
        #: The next batch, claimed while the lanes send the current one's last jobs.
        self._claim_ahead: asyncio.Task[tuple[list[asyncpg.Record], list[Job]]] | None = None

    def default_mailbox(self, tenant_id: str) -> Mailbox:
        """The deployment's own identity (SMTP_* settings), for tenants without mailboxes."""
        s = self.settings
        transport: dict[str, Any] = {
            "type": "smtp",
            "host": s.smtp_host,
            "port": s.smtp_port,
            "username": s.smtp_username,
            "password": s.smtp_password.get_secret_value() if s.smtp_password else None,
            "starttls": s.smtp_starttls,
            "tls": s.smtp_tls,
            "timeout": s.smtp_timeout,
        }
        return Mailbox(
            id=None,
            tenant_id=tenant_id,
            email=s.from_email,
            display_name=s.from_name,
            transports=[transport],
            caps=Caps(s.daily_cap, s.hourly_cap, s.domain_hourly_cap),
            version="settings",
        )

    def topic_handlers(self) -> dict[str, TopicHandler]:
        return {topics.STEP_DUE: self._on_step_due, topics.ENGAGEMENT: self._on_engagement}

    def produced_topics(self) -> list[str]:
        return [topics.EMAIL_SENT]

    async def on_started(self) -> None:
        try:
            self._ledger_pool = await create_pool(
                self.settings.database_url, self.name, size=2, settings=LEDGER_SESSION
            )
        except Exception as exc:
            raise StartupError(str(exc)) from exc
        self._ledger = HandOffLedger(self._ledger_pool, on_recorded=self.wake_relay)

    @property
    def ledger(self) -> HandOffLedger:
        """The lanes' group commit of ``sending`` marks and ``sent`` records."""
        if self._ledger is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._ledger

    def after_commit(self) -> None:
        self._ready.set()

    async def _on_step_due(
        self, conn: asyncpg.Connection, events: list[StepDue | EnrollmentStopped]
    ) -> None:
        await handlers.handle_step_due(conn, events)

    async def _on_engagement(
        self, conn: asyncpg.Connection, events: list[EngagementReceived]
    ) -> None:
        await handlers.handle_engagement(
            conn,
            events,
            now=self.clock.now(),
            soft_bounce_retries=self.settings.soft_bounce_retries,
            soft_bounce_delay=timedelta(seconds=self.settings.soft_bounce_retry_seconds),
        )

    def background_loops(self) -> list[BackgroundLoop]:
        return [self.dispatcher]

    async def stop(self) -> None:
        await super().stop()
        for lane in self.lanes:
            await lane.close()
        if self._ledger_pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ledger_pool.close(), 10)

    def add_routes(self, app: FastAPI) -> None:
        api.install(app, self)

    # ---------------------------------------------------------------- dispatching

    async def dispatcher(self, stop: asyncio.Event) -> None:
        """Claim ready deliveries, fit them under their caps, and hand them over,
        recording each outcome with its event in one transaction."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        last_recovery = 0.0
        backoff = 0.1
        try:
            while not stop.is_set():
                self._ready.clear()
                try:
                    if loop.time() - last_recovery > min(1.0, settings.lease_seconds / 3):
                        await self._recover()
                        last_recovery = loop.time()
                    claimed = await self._dispatch_batch(stop)
                    backoff = 0.1
                except Exception as exc:
                    if is_transient(exc):
                        log.warning("dispatcher: %r", exc)
                    else:
                        log.exception("dispatcher round failed")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if claimed < settings.dispatch_batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._ready.wait(), settings.dispatch_idle_seconds)
        finally:
            await self._give_back_claimed_ahead()

    async def _give_back_claimed_ahead(self) -> None:
        """A batch claimed ahead and not started when the sender stops goes back to the
        queue at once, rather than when its leases expire."""
        ahead, self._claim_ahead = self._claim_ahead, None
        if ahead is None:
            return
        try:
            _, jobs = await ahead
        except Exception:
            return  # its transaction rolled back: nothing was claimed
        try:
            await self._give_back(jobs)
        except Exception as exc:  # the leases expire instead
            log.warning("could not give back %d claimed deliveries: %r", len(jobs), exc)

    async def _recover(self) -> None:
        now = self.clock.now()
        async with self.pool.acquire() as conn, conn.transaction():
            released, uncertain = await handlers.recover_expired(conn, now)
            await repo.prune_counters(conn, now - timedelta(days=2))
        if released or uncertain:
            log.warning(
                "recovered expired leases: %d released, %d flagged uncertain", released, uncertain
            )
            self.wake_relay()

    async def _dispatch_batch(self, stop: asyncio.Event) -> int:
        settings = self.settings
        loop = asyncio.get_running_loop()
        limit = settings.dispatch_batch
        grant: repo.GlobalGrant | None = None
        deadline = 0.0
        if settings.global_rate:
            # Hand-offs, not claims, are what the rate limits: each job may be handed
            # off only within the second it was granted in (mark_sending checks).
            async with self.pool.acquire() as conn:
                grant = await repo.reserve_global(conn, limit, settings.global_rate)
            if grant.granted == 0:
                await asyncio.sleep(grant.seconds_left + 0.001)  # the next second
                return 0
            limit = grant.granted
            deadline = loop.time() + grant.seconds_left
        ahead, self._claim_ahead = self._claim_ahead, None
        rows, jobs = await (ahead if ahead is not None else self._claim(limit))
        if grant is not None:
            handing = [job for job in jobs if not job.dry_run]
            if grant.granted > len(handing):
                await repo.release_global(self.pool, grant.second, grant.granted - len(handing))
            for job in handing:
                job.rate_second, job.rate_deadline = grant.second, deadline
        # The lanes take the batch's jobs from one queue, each its next when it is
        # ready for it, so they run out of work together rather than some idling
        # while another finishes a longer share. A full batch suggests more is ready:
        # once its last job is taken, the next batch is claimed while the lanes send
        # (not under a global rate, whose grants are per second).
        full = grant is None and len(rows) >= limit
        queue = self._queue(jobs, stop, claim_next=limit if full else 0)
        await asyncio.gather(
            *(self._run_lane(pool, queue, stop) for pool in self.lanes[: len(jobs)])
        )
        if stop.is_set():  # the jobs no lane took go back to the queue
            await self._give_back(list(queue))
        return len(rows)

    async def _claim(self, limit: int) -> tuple[list[asyncpg.Record], list[Job]]:
        """Claim up to ``limit`` ready deliveries and plan them, in one transaction."""
        now = self.clock.now()
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await repo.claim_ready(
                conn, now, limit, self.settings.lease_seconds, self.instance_id
            )
            jobs = await self._plan(conn, rows, now)
        if len(jobs) < len(rows):
            self.wake_relay()
        return rows, jobs

    def _queue(self, jobs: list[Job], stop: asyncio.Event, *, claim_next: int) -> Iterator[Job]:
        """The batch's jobs for the lanes to take; once the last is taken, the claim
        of ``claim_next`` more starts (0: none)."""
        yield from jobs
        if claim_next and not stop.is_set() and self._claim_ahead is None:
            self._claim_ahead = asyncio.create_task(self._claim(claim_next))

    async def _plan(
        self, conn: asyncpg.Connection, rows: list[asyncpg.Record], now: Any
    ) -> list[Job]:
        """In the claim's transaction: suppression, dry runs, mailbox, caps."""
        if not rows:
            return []
        suppressed = await repo.suppressed_addresses(
            conn, [(r["tenant_id"], r["to_email"]) for r in rows]
        )
        tenants = sorted({r["tenant_id"] for r in rows})
        dry = await repo.dry_run_scopes(conn, tenants)
        boxes = {
            t: [mailbox_from_row(m) for m in await repo.mailboxes_of(conn, t, enabled_only=True)]
            for t in tenants
        }
        jobs: list[Job] = []
        for row in rows:
            tenant = row["tenant_id"]
            if (tenant, row["to_email"]) in suppressed:
                await handlers.record_failed(
                    conn,
                    row["delivery_key"],
                    FailureKind.SUPPRESSED,
                    "recipient is on the suppression list",
                )
                continue
            mailbox = await self._mailbox_for(conn, row, boxes[tenant])
            is_dry = (tenant, "*") in dry or (tenant, row["sequence_key"]) in dry
            if not is_dry:
                scopes = domain.cap_scopes(
                    mailbox.key, domain.recipient_domain(row["to_email"]), mailbox.caps, now
                )
                full = await self._reserve(conn, scopes)
                if full is not None:
                    await repo.defer_for_cap(
                        conn,
                        row["delivery_key"],
                        full.window_end,
                        f"deferred: mailbox {mailbox.email} reached its {full.label}",
                    )
                    continue
            reserved = () if is_dry else tuple((s.scope, s.window_start) for s in scopes)
            if mailbox.id is not None:
                await repo.set_mailbox(conn, row["delivery_key"], mailbox.id)
            jobs.append(Job(row, mailbox, is_dry, reserved))
        return jobs

    async def _reserve(
        self, conn: asyncpg.Connection, scopes: list[domain.CapScope]
    ) -> domain.CapScope | None:
        """Count the send under every cap, or under none: the first full cap."""
        if not scopes:
            return None

        class Full(Exception):
            def __init__(self, scope: domain.CapScope) -> None:
                self.scope = scope

        try:
            async with conn.transaction():  # a savepoint: all counters or none
                for scope in scopes:
                    if not await repo.reserve(conn, scope.scope, scope.window_start, scope.limit):
                        raise Full(scope)
        except Full as full:
            return full.scope
        return None

    async def _mailbox_for(
        self, conn: asyncpg.Connection, row: asyncpg.Record, boxes: list[Mailbox]
    ) -> Mailbox:
        if not boxes:
            return self.default_mailbox(row["tenant_id"])
        by_id = {m.id: m for m in boxes}
        assigned = await repo.assigned_mailbox(conn, row["enrollment_id"])
        if assigned in by_id:
            return by_id[assigned]
        ids = [m.id for m in boxes if m.id is not None]
        chosen = domain.choose_mailbox(
            ids, await repo.mailbox_loads(conn, ids), row["enrollment_id"]
        )
        holder = await repo.assign_mailbox(conn, row["enrollment_id"], chosen)
        return by_id.get(holder, by_id[chosen])

    async def _run_lane(
        self, pool: TransportPool, queue: Iterator[Job], stop: asyncio.Event
    ) -> None:
        """Hand jobs from ``queue`` over one after the other. Each message is built
        before the previous one goes out, so that an SMTP session with PIPELINING can
        write its envelope right after that message: one round trip per message."""
        lane = Lane(pool)
        try:
            current = await self._next_ready(lane, queue, stop)
            while current is not None and not stop.is_set():
                upcoming = await self._next_ready(lane, queue, stop)
                await self._hand_off(lane, current, upcoming)
                current = upcoming
            if current is not None:  # stopping: the job prepared next goes back
                await self._give_back([current.job])
        finally:
            await lane.recorded()

    async def _next_ready(
        self, lane: Lane, queue: Iterator[Job], stop: asyncio.Event
    ) -> Ready | None:
        """The next job with a message to hand over; the others' outcomes recorded.
        None once the queue is empty or the sender stops (the job is left in it)."""
        while not stop.is_set():
            job = next(queue, None)
            if job is None:
                return None
            ready = await self._prepare(lane, job)
            if ready is not None:
                return ready
        return None

    async def _prepare(self, lane: Lane, job: Job) -> Ready | None:
        """The job's message and transports, or None with its outcome recorded. It runs
        while the lane's current message is still to go: a batch's jobs carry one
        version of each mailbox (read once per claim), so the transports it asks for
        are never new ones replacing (and closing) those the current message uses."""
        row, mailbox = job.row, job.mailbox
        key = row["delivery_key"]
        now = self.clock.now()
        email = OutgoingEmail(
            delivery_key=key,
            from_email=mailbox.email,
            from_name=mailbox.display_name,
            to_email=row["to_email"],
            to_name=row["to_name"],
            subject=row["subject"],
            text=row["body_text"],
            html=row["body_html"],
            thread_delivery_key=row["thread_delivery_key"],
            tracking=row["tracking"],
        )
        placeholder = domain.unrendered_placeholder(email.subject, email.text, email.html)
        if placeholder is not None:
            await self._record(
                handlers.record_failed,
                key,
                FailureKind.INVALID,
                f"unrendered template placeholder {placeholder!r}: refusing to send",
            )
            return None
        try:
            built = build_message(email, self.tracking, now, mailbox.dkim)
        except InvalidMessage as exc:
            await self._record(
                handlers.record_failed, key, FailureKind.INVALID, f"cannot build message: {exc}"
            )
            return None
        if job.dry_run:
            await self._record(
                handlers.record_dry_run,
                key,
                message_id=built.message_id,
                from_email=built.from_email,
                from_name=built.from_name,
                sent_at=now,
                links=built.links,
                mailbox_id=mailbox.id,
            )
            return None
        return Ready(job, built, await lane.transports.for_mailbox(mailbox))

    async def _hand_off(self, lane: Lane, ready: Ready, upcoming: Ready | None) -> None:
        """Try each transport in order; a transient failure fails over to the next.

        The delivery is marked ``sending`` (the point of no return: a crash from here
        leaves it uncertain) only once a transport is about to let the message itself
        go: for SMTP after the server accepted MAIL FROM and RCPT TO, so a refusal of
        the envelope is a clean failure. ``upcoming``, the lane's next message, goes
        to the first transport when it is that message's first transport too."""
        job, built, transports = ready.job, ready.built, ready.transports
        if job.rate_deadline is not None and asyncio.get_running_loop().time() >= job.rate_deadline:
            await self._give_back([job])  # its second of the global rate is over
            return
        ahead = (
            upcoming.built
            if upcoming is not None
            and transports
            and upcoming.transports
            and upcoming.transports[0] is transports[0]
            else None
        )
        s = self.settings
        row = job.row
        key = row["delivery_key"]
        attempt = row["attempts"] + 1
        lease = s.lease_seconds + s.smtp_timeout * len(transports)
        marked = False

        async def gate() -> bool:
            nonlocal marked
            if not marked:
                mark = Mark(
                    key,
                    self.instance_id,
                    lease,
                    built.message_id,
                    built.from_email,
                    built.from_name,
                    attempt,
                    job.rate_second,
                )
                marked = await self.ledger.mark_sending(mark, after=lane.recording)
            return marked

        failures: list[tuple[Transport, TransientSendError]] = []
        for transport in transports:
            try:
                accepted = await transport.send(
                    built, gate, ahead if transport is transports[0] else None
                )
            except HandOffRefused:
                # Cancelled, taken over after our claim expired, or its second of the
                # global rate is over: nothing was handed over.
                await self._give_back([job])
                return
            except HandOffUncertain as exc:
                # It may have been accepted: never sent again, here or elsewhere.
                log.warning("%s: %s", key, exc)
                await self._record(
                    handlers.record_uncertain,
                    key,
                    f"{transport.name}: {exc}",
                    self.clock.now(),
                    owner=self.instance_id,
                )
                return
            except PermanentSendError as exc:
                await self._record(
                    handlers.record_failed,
                    key,
                    FailureKind.PERMANENT,
                    f"{transport.name}: {exc}",
                    exc.code,
                    rejection=exc.rejection,
                    attempts=attempt,
                    owner=self.instance_id,
                )
                return
            except TransientSendError as exc:
                log.info("%s: %s failed transiently: %s", key, transport.name, exc)
                failures.append((transport, exc))
                continue
            # Recorded while the lane prepares its next message (see Lane). The ledger's
            # statement goes out first: until it is committed, a crash leaves this
            # delivery uncertain, so the next message's build waits its turn.
            lane.recording = self._record_sent(row, built, transport.name, accepted)
            await asyncio.sleep(0)
            return
        reason = "; ".join(f"{t.name}: {e}" for t, e in failures) or "no transport"
        retry_after = max(
            (getattr(e, "retry_after", None) or 0.0 for _, e in failures), default=0.0
        )
        await self._defer(
            row, attempt, reason, failures[-1][1].code if failures else None, retry_after or None
        )

    async def _give_back(self, jobs: list[Job]) -> None:
        """Claimed deliveries not handed off go back to the queue (those still ours),
        and what their claim counted under caps is taken back: they were not sent."""
        if not jobs:
            return
        keys = [job.row["delivery_key"] for job in jobs]
        released = await repo.release_claims(self.pool, keys, self.instance_id)
        await repo.unreserve(self.pool, [r for job in jobs for r in job.reserved])
        if released:
            self._ready.set()

    def _record_sent(
        self, row: asyncpg.Record, built: BuiltMessage, transport: str, accepted: Any
    ) -> asyncio.Future[None]:
        """Record the hand-off and its EmailSent (atomically, through the ledger)."""
        sent_at = self.clock.now()
        event = handlers.email_sent_event(
            {
                **dict(row),
                "message_id": built.message_id,
                "from_email": built.from_email,
                "sent_at": sent_at,
                "links": built.links,
                "transport": transport,
                "provider_message_id": accepted.provider_message_id,
                "dry_run": False,
            }
        )
        return self.ledger.record_sent(
            SentRecord(
                row["delivery_key"],
                smtp_code=accepted.code,
                smtp_response=accepted.response[:500],
                sent_at=sent_at,
                links=built.links,
                transport=transport,
                provider_message_id=accepted.provider_message_id,
                message_id=built.message_id,
                from_email=built.from_email,
                from_name=built.from_name,
                outbox_row=(
                    topics.EMAIL_SENT,
                    event.kafka_key(),
                    event.to_bytes(),
                    event.event_id,
                    event.event_type,
                ),
            )
        )

    async def _defer(
        self,
        row: asyncpg.Record,
        attempt: int,
        reason: str,
        code: int | None,
        retry_after: float | None,
    ) -> None:
        """Every transport failed transiently: try again later, with a backoff that
        stops growing at SENDER_RETRY_MAX_SECONDS. Never dropped, unless the deployment
        asked for a give-up (SENDER_MAX_ATTEMPTS)."""
        s = self.settings
        key = row["delivery_key"]
        if s.max_attempts is not None and attempt >= s.max_attempts:
            await self._record(
                handlers.record_failed,
                key,
                FailureKind.PERMANENT,
                f"gave up after {attempt} attempts (SENDER_MAX_ATTEMPTS): {reason}",
                code,
                rejection=RejectionClass(BounceType.SOFT),
                attempts=attempt,
                owner=self.instance_id,
            )
            return
        until = domain.retry_at(
            self.clock.now(),
            attempt,
            s.retry_base_seconds,
            retry_after=retry_after,
            max_seconds=s.retry_max_seconds,
        )

        async def write(conn: asyncpg.Connection) -> None:
            await repo.defer(
                conn,
                key,
                until,
                f"deferred: {reason}",
                code,
                attempts=attempt,
                last_error=reason[:1000],
                owner=self.instance_id,
            )

        await self._in_transaction(write)
        log.info("deferred %s until %s: %s", key, until.isoformat(), reason)

    async def _record(self, writer: Any, *args: Any, **kwargs: Any) -> None:
        async def write(conn: asyncpg.Connection) -> None:
            await writer(conn, *args, **kwargs)

        await self._in_transaction(write)
        self.wake_relay()

    async def _in_transaction(self, write: Any) -> None:
        """The outcome must be recorded: retry through database outages."""
        backoff = 0.1
        while True:
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    await write(conn)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("recording an outcome failed, retrying: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
