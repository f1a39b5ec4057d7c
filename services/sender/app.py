"""Sender wiring: consumer, dispatcher, HTTP face."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Query

from schemas import topics
from schemas.events import EngagementReceived, FailureKind, StepDue
from services.runtime.consumer import TopicHandler, is_transient
from services.runtime.service import BackgroundLoop, Service
from services.runtime.settings import SenderSettings
from services.sender import handlers, repo
from services.sender.mime import (
    InvalidMessage,
    OutgoingEmail,
    TrackingConfig,
    build_message,
)
from services.sender.transport import (
    PermanentSendError,
    SmtpConfig,
    SmtpTransport,
    TransientSendError,
)

log = logging.getLogger(__name__)

DELIVERY_STATUSES = (
    "queued",
    "deferred",
    "claimed",
    "sending",
    "sent",
    "failed",
    "uncertain",
    "suppressed",
    "cancelled",
)


class SenderService(Service[SenderSettings]):
    name = "sender"
    migrations_dir = Path(__file__).parent / "migrations"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.settings
        if s.tracking_secret is None:
            raise ValueError("TOUCHSTREAM_TRACKING_SECRET must be set: it signs tracking links")
        self.tracking = TrackingConfig(
            base_url=s.tracker_public_url.rstrip("/"),
            secret=s.tracking_secret.get_secret_value().encode(),
            unsubscribe_mailto=s.unsubscribe_mailto,
            physical_address=s.physical_address,
        )
        self.transport = SmtpTransport(
            SmtpConfig(
                host=s.smtp_host,
                port=s.smtp_port,
                username=s.smtp_username,
                password=s.smtp_password.get_secret_value() if s.smtp_password else None,
                starttls=s.smtp_starttls,
                tls=s.smtp_tls,
                timeout=s.smtp_timeout,
            )
        )
        self._ready = asyncio.Event()

    def topic_handlers(self) -> dict[str, TopicHandler]:
        return {topics.STEP_DUE: self._on_step_due, topics.ENGAGEMENT: self._on_engagement}

    def produced_topics(self) -> list[str]:
        return [topics.EMAIL_SENT]

    def after_commit(self) -> None:
        self._ready.set()

    async def _on_step_due(self, conn: asyncpg.Connection, events: list[StepDue]) -> None:
        await handlers.handle_step_due(conn, events)

    async def _on_engagement(
        self, conn: asyncpg.Connection, events: list[EngagementReceived]
    ) -> None:
        await handlers.handle_engagement(conn, events)

    def background_loops(self) -> list[BackgroundLoop]:
        return [self.dispatcher]

    async def stop(self) -> None:
        await super().stop()
        await self.transport.close()

    # ---------------------------------------------------------------- dispatching

    async def dispatcher(self, stop: asyncio.Event) -> None:
        """Claim ready deliveries and hand them to SMTP, one at a time, recording each
        outcome with its event in one transaction."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        last_recovery = 0.0
        backoff = 0.1
        while not stop.is_set():
            self._ready.clear()
            try:
                if loop.time() - last_recovery > min(1.0, settings.lease_seconds / 3):
                    async with self.pool.acquire() as conn, conn.transaction():
                        released, uncertain = await handlers.recover_expired(conn, self.clock.now())
                    if released or uncertain:
                        log.warning(
                            "recovered expired leases: %d released, %d flagged uncertain",
                            released,
                            uncertain,
                        )
                        self.wake_relay()
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

    async def _dispatch_batch(self, stop: asyncio.Event) -> int:
        settings = self.settings
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await repo.claim_ready(
                conn,
                self.clock.now(),
                settings.dispatch_batch,
                settings.lease_seconds,
                self.instance_id,
            )
            suppressed = await repo.suppressed_addresses(
                conn, [(r["tenant_id"], r["to_email"]) for r in rows]
            )
            for row in rows:
                if (row["tenant_id"], row["to_email"]) in suppressed:
                    await handlers.record_failed(
                        conn,
                        row["delivery_key"],
                        FailureKind.SUPPRESSED,
                        "recipient is on the suppression list",
                    )
        if suppressed:
            self.wake_relay()
        for row in rows:
            if (row["tenant_id"], row["to_email"]) in suppressed:
                continue
            if stop.is_set():
                break  # the claims expire and another sender takes them
            await self._deliver(row)
        return len(rows)

    async def _deliver(self, row: asyncpg.Record) -> None:
        s = self.settings
        key = row["delivery_key"]
        now = self.clock.now()
        email = OutgoingEmail(
            delivery_key=key,
            from_email=row["from_email"] or s.from_email,
            from_name=row["from_name"] or s.from_name,
            to_email=row["to_email"],
            to_name=row["to_name"],
            subject=row["subject"],
            text=row["body_text"],
            html=row["body_html"],
            thread_delivery_key=row["thread_delivery_key"],
            tracking=row["tracking"],
        )
        try:
            built = build_message(email, self.tracking, now)
        except InvalidMessage as exc:
            await self._record(
                handlers.record_failed, key, FailureKind.INVALID, f"cannot build message: {exc}"
            )
            return
        if not await repo.mark_sending(
            self.pool,
            key,
            self.instance_id,
            s.lease_seconds,
            built.message_id,
            email.from_email,
            email.from_name,
        ):
            return  # our lease ran out and someone else has it
        try:
            accepted = await self.transport.send(built)
        except PermanentSendError as exc:
            await self._record(
                handlers.record_failed,
                key,
                FailureKind.PERMANENT,
                str(exc),
                exc.code,
                suppress=exc.code is not None and exc.code in (550, 551, 553),
            )
            return
        except TransientSendError as exc:
            await self._defer(row, str(exc), exc.code)
            return
        await self._record(
            handlers.record_sent,
            key,
            sent_at=self.clock.now(),
            code=accepted.code,
            response=accepted.response,
            links=built.links,
        )

    async def _defer(self, row: asyncpg.Record, reason: str, code: int | None) -> None:
        s = self.settings
        attempts = row["attempts"] + 1
        if attempts >= s.max_attempts:
            await self._record(
                handlers.record_failed,
                row["delivery_key"],
                FailureKind.PERMANENT,
                f"gave up after {attempts} attempts: {reason}",
                code,
            )
            return
        delay = s.retry_base_seconds * (2 ** (attempts - 1)) * (0.5 + random.random())
        until = self.clock.now() + timedelta(seconds=delay)

        async def write(conn: asyncpg.Connection) -> None:
            await repo.defer(conn, row["delivery_key"], until, reason, code)

        await self._in_transaction(write)
        log.info("deferred %s until %s: %s", row["delivery_key"], until.isoformat(), reason)

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

    # ------------------------------------------------------------------------ HTTP

    def add_routes(self, app: FastAPI) -> None:
        @app.get("/deliveries", tags=["deliveries"])
        async def list_deliveries(
            tenant_id: str = "default",
            status: str | None = None,
            lead_id: uuid.UUID | None = None,
            limit: int = Query(100, ge=1, le=1000),
            offset: int = Query(0, ge=0),
        ) -> dict[str, Any]:
            if status is not None and status not in DELIVERY_STATUSES:
                raise HTTPException(422, f"status must be one of {', '.join(DELIVERY_STATUSES)}")
            items = await repo.list_deliveries(self.pool, tenant_id, status, lead_id, limit, offset)
            for item in items:
                item.pop("body_text", None)
                item.pop("body_html", None)
            return {"items": items, "limit": limit, "offset": offset}

        @app.get("/deliveries/stats", tags=["deliveries"])
        async def delivery_stats() -> dict[str, int]:
            return await repo.status_counts(self.pool)
