"""Router wiring: consumer, HTTP face."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
from fastapi import FastAPI, HTTPException, Query

from schemas import topics
from schemas.events import EngagementReceived, LeadReceived
from services.router import handlers, repo
from services.router.domain import LEAD_STATUSES
from services.runtime.consumer import Rejection, TopicHandler
from services.runtime.service import Service
from services.runtime.settings import RouterSettings


class RouterService(Service[RouterSettings]):
    name = "router"
    migrations_dir = Path(__file__).parent / "migrations"

    def topic_handlers(self) -> dict[str, TopicHandler]:
        return {topics.LEADS: self._on_leads, topics.ENGAGEMENT: self._on_engagement}

    def produced_topics(self) -> list[str]:
        return [topics.LEAD_ROUTED]

    async def _on_leads(
        self, conn: asyncpg.Connection, events: list[LeadReceived]
    ) -> list[Rejection]:
        return await handlers.handle_lead_received(
            conn, events, default_sequence=self.settings.default_sequence, now=self.clock.now()
        )

    async def _on_engagement(
        self, conn: asyncpg.Connection, events: list[EngagementReceived]
    ) -> None:
        await handlers.handle_engagement_received(conn, events, now=self.clock.now())

    def add_routes(self, app: FastAPI) -> None:
        @app.get("/leads/{lead_id}", tags=["leads"])
        async def get_lead(lead_id: uuid.UUID, tenant_id: str = "default") -> dict[str, Any]:
            lead = await repo.get_lead(self.pool, tenant_id, lead_id)
            if lead is None:
                raise HTTPException(404, f"no lead {lead_id}")
            lead["status_history"] = await repo.status_history(self.pool, lead_id)
            return lead

        @app.get("/leads", tags=["leads"])
        async def list_leads(
            tenant_id: str = "default",
            email: str | None = None,
            external_id: str | None = None,
            status: str | None = None,
            limit: int = Query(100, ge=1, le=1000),
            offset: int = Query(0, ge=0),
        ) -> dict[str, Any]:
            if status is not None and status not in LEAD_STATUSES:
                raise HTTPException(422, f"status must be one of {', '.join(LEAD_STATUSES)}")
            items = await repo.find_leads(
                self.pool,
                tenant_id,
                email.strip().lower() if email else None,
                external_id,
                status,
                limit,
                offset,
            )
            return {"items": items, "limit": limit, "offset": offset}
