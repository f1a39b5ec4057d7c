"""Nurture wiring: consumer, scheduler, HTTP face."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException

from schemas import topics
from schemas.events import EmailFailed, EmailSent, EngagementReceived, LeadRouted
from services.nurture import handlers, repo
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

    def topic_handlers(self) -> dict[str, TopicHandler]:
        return {
            topics.LEAD_ROUTED: self._on_lead_routed,
            topics.EMAIL_SENT: self._on_email_outcome,
            topics.ENGAGEMENT: self._on_engagement,
        }

    def produced_topics(self) -> list[str]:
        return [topics.STEP_DUE]

    def after_commit(self) -> None:
        self._due.set()  # new enrollments or advanced ones may be due right now

    async def on_started(self) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            for preset in PRESETS.values():
                await repo.ensure_preset(conn, "default", preset)

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
        return [self.scheduler]

    async def scheduler(self, stop: asyncio.Event) -> None:
        """Claim due enrollments in batches (FOR UPDATE SKIP LOCKED) and advance them.

        Any number of nurture replicas run this loop side by side."""
        settings = self.settings
        backoff = 0.1
        while not stop.is_set():
            self._due.clear()
            try:
                async with self.pool.acquire() as conn, conn.transaction():
                    claimed = await handlers.run_due(
                        conn,
                        now=self.clock.now(),
                        limit=settings.scheduler_batch,
                        steps=self.steps,
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
            if claimed < settings.scheduler_batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._due.wait(), settings.scheduler_idle_seconds)

    def add_routes(self, app: FastAPI) -> None:
        @app.get("/enrollments", tags=["enrollments"])
        async def list_enrollments(
            lead_id: uuid.UUID, tenant_id: str = "default"
        ) -> dict[str, Any]:
            items = await repo.enrollments_of_lead(self.pool, tenant_id, lead_id)
            return {"items": [_enrollment_view(e) for e in items]}

        @app.get("/enrollments/{enrollment_id}", tags=["enrollments"])
        async def get_enrollment(enrollment_id: uuid.UUID) -> dict[str, Any]:
            enrollment = await repo.get_enrollment(self.pool, enrollment_id)
            if enrollment is None:
                raise HTTPException(404, f"no enrollment {enrollment_id}")
            view = _enrollment_view(enrollment)
            view["log"] = await repo.execution_log(self.pool, enrollment_id)
            return view

        @app.get("/sequences", tags=["sequences"])
        async def list_sequences(tenant_id: str = "default") -> dict[str, Any]:
            return {"items": await repo.list_sequences(self.pool, tenant_id)}


def _enrollment_view(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "tenant_id": row["tenant_id"],
        "lead_id": row["lead_id"],
        "sequence_id": row["sequence_id"],
        "sequence": row["sequence_key"],
        "version": row["version"],
        "status": row["status"],
        "current_step": row["position"],
        "steps_done": row["steps_done"],
        "next_action_at": row["next_action_at"],
        "stop_reason": row["stop_reason"],
        "enrolled_at": row["enrolled_at"],
        "last_activity_at": row["last_activity_at"],
        "finished_at": row["finished_at"],
    }
