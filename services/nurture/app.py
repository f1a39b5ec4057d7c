"""Nurture wiring: consumer, scheduler, notification dispatcher, HTTP face."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from fastapi import FastAPI

from schemas import topics
from schemas.events import EmailFailed, EmailSent, EngagementReceived, LeadRouted
from services.nurture import api, handlers, notify, repo, sequences
from services.nurture.presets import PRESETS
from services.runtime.consumer import Rejection, TopicHandler, is_transient
from services.runtime.service import BackgroundLoop, Service
from services.runtime.settings import NurtureSettings

log = logging.getLogger(__name__)


class NurtureService(Service[NurtureSettings]):
    name = "nurture"
    migrations_dir = Path(__file__).parent / "migrations"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = handlers.StepCache()
        self._due = asyncio.Event()
        self._notifications = asyncio.Event()

    def topic_handlers(self) -> dict[str, TopicHandler]:
        return {
            topics.LEAD_ROUTED: self._on_lead_routed,
            topics.EMAIL_SENT: self._on_email_outcome,
            topics.ENGAGEMENT: self._on_engagement,
        }

    def produced_topics(self) -> list[str]:
        return [topics.STEP_DUE, topics.LEAD_UPDATES, topics.SEQUENCES]

    def after_commit(self) -> None:
        self._due.set()  # new enrollments or advanced ones may be due right now
        self._notifications.set()
        self.wake_relay()

    async def on_started(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            for preset in PRESETS.values():
                await sequences.ensure_preset(conn, "default", preset)

    async def _on_lead_routed(
        self, conn: asyncpg.Connection, events: list[LeadRouted]
    ) -> list[Rejection]:
        return await handlers.handle_lead_routed(conn, events, now=self.clock.now())

    async def _on_email_outcome(
        self, conn: asyncpg.Connection, events: list[EmailSent | EmailFailed]
    ) -> None:
        await handlers.handle_email_outcome(conn, events, now=self.clock.now(), steps=self.steps)

    async def _on_engagement(
        self, conn: asyncpg.Connection, events: list[EngagementReceived]
    ) -> None:
        await handlers.handle_engagement(conn, events, now=self.clock.now())

    def background_loops(self) -> list[BackgroundLoop]:
        loops: list[BackgroundLoop] = [self.scheduler] * self.settings.scheduler_loops
        return [*loops, self.notifier]

    async def scheduler(self, stop: asyncio.Event) -> None:
        """Claim due enrollments in batches (FOR UPDATE SKIP LOCKED) and advance them.

        Any number of nurture replicas run this loop side by side. A round after an
        idle one claims a small batch, and each full round doubles it up to
        ``scheduler_batch``: when a launch makes thousands due at once, the first
        StepDue go out after a few renders rather than after a whole batch's."""
        settings = self.settings
        backoff = 0.1
        first = max(1, settings.scheduler_batch // 8)
        limit = first
        while not stop.is_set():
            self._due.clear()
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    claimed = await handlers.run_due(
                        conn, now=self.clock.now(), limit=limit, steps=self.steps
                    )
                backoff = 0.1
            except Exception as exc:
                if not is_transient(exc):
                    log.exception("scheduler round failed")
                else:
                    log.warning("scheduler: database unavailable: %r", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if claimed:
                self.wake_relay()
                self._notifications.set()
            if claimed >= limit:
                limit = min(limit * 2, settings.scheduler_batch)
                continue
            limit = first
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._due.wait(), settings.scheduler_idle_seconds)

    async def notifier(self, stop: asyncio.Event) -> None:
        """Deliver `notify` webhooks, signed, with retries (at least once)."""
        settings = self.settings
        value = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        secret = value.encode() if value.strip() else b""
        if not secret:
            log.error("notifier: %s", notify.UNSIGNED_REFUSED)
        async with httpx.AsyncClient(timeout=settings.webhook_timeout_seconds) as client:
            while not stop.is_set():
                self._notifications.clear()
                try:
                    sent = await self._notify_batch(client, secret)
                except Exception as exc:
                    log.warning("notifier: %r", exc)
                    sent = 0
                if not sent:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._notifications.wait(), 1.0)

    async def _notify_batch(self, client: httpx.AsyncClient, secret: bytes) -> int:
        max_attempts = self.settings.webhook_max_attempts
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await repo.claim_notifications(conn, 20)
            if rows and not secret:
                # Never unsigned: a receiver could not tell our webhook from a forgery.
                log.error("notifier: %d notification(s) %s", len(rows), notify.UNSIGNED_REFUSED)
                for row in rows:
                    await repo.finish_notification(
                        conn,
                        row["id"],
                        delivered=False,
                        failed=True,
                        error=notify.UNSIGNED_REFUSED,
                        response_status=None,
                        retry_in=0,
                    )
                return len(rows)
            for row in rows:
                body = notify.encode({"id": str(row["id"]), **row["payload"]})
                headers = {
                    "Content-Type": "application/json",
                    "User-Agent": "touchstream-webhooks/1",
                }
                headers["X-Touchstream-Signature"] = notify.signature_header(secret, body)
                error: str | None = None
                status: int | None = None
                try:
                    response = await client.post(row["url"], content=body, headers=headers)
                    status = response.status_code
                    if status >= 300:
                        error = f"HTTP {status}"
                except httpx.HTTPError as exc:
                    error = repr(exc)
                attempts = row["attempts"] + 1
                await repo.finish_notification(
                    conn,
                    row["id"],
                    delivered=error is None,
                    failed=error is not None and attempts >= max_attempts,
                    error=error,
                    response_status=status,
                    retry_in=notify.retry_delay(attempts),
                )
        return len(rows)

    def add_routes(self, app: FastAPI) -> None:
        api.install(app, self)
