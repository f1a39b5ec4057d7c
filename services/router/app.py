"""Router wiring: consumer, HTTP face."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Annotated, Any

import asyncpg
from fastapi import Body, FastAPI, HTTPException, Query, Response
from fastapi.responses import JSONResponse

from schemas import topics
from schemas.events import (
    PRESET_SEQUENCE_KEYS,
    EngagementReceived,
    LeadReceived,
    LeadUpdateRequested,
    SequenceChanged,
)
from services.router import domain, handlers, repo
from services.router.domain import LEAD_STATUSES
from services.runtime.consumer import Rejection, TopicHandler
from services.runtime.service import Service
from services.runtime.settings import RouterSettings

log = logging.getLogger(__name__)

#: The tenant a request is for; API keys will replace this query parameter.
Tenant = Annotated[
    str, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$", description="tenant")
]
#: Seeded with the default routing rules at startup when it never had rules.
SEEDED_TENANT = "default"


def _intake_json(result: handlers.IntakeResult) -> dict[str, Any]:
    return {
        "lead_id": str(result.lead_id),
        "created": result.created,
        "routed": result.routed,
        "sequence": result.sequence,
        "reason": result.reason,
        "duplicate": result.duplicate,
    }


class RouterService(Service[RouterSettings]):
    name = "router"
    migrations_dir = Path(__file__).parent / "migrations"

    def topic_handlers(self) -> dict[str, TopicHandler]:
        return {
            topics.LEADS: self._on_leads,
            topics.ENGAGEMENT: self._on_engagement,
            topics.LEAD_UPDATES: self._on_lead_updates,
            topics.SEQUENCES: self._on_sequences,
        }

    def produced_topics(self) -> list[str]:
        return [topics.LEAD_ROUTED]

    async def on_started(self) -> None:
        if await handlers.seed_default_rules(self.pool, SEEDED_TENANT, self.clock.now()):
            log.info("router: seeded the default routing rules of tenant %r", SEEDED_TENANT)

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

    async def _on_lead_updates(
        self, conn: asyncpg.Connection, events: list[LeadUpdateRequested]
    ) -> list[Rejection]:
        return await handlers.handle_lead_update_requested(conn, events, now=self.clock.now())

    async def _on_sequences(self, conn: asyncpg.Connection, events: list[SequenceChanged]) -> None:
        await handlers.handle_sequence_changed(conn, events, now=self.clock.now())

    def add_routes(self, app: FastAPI) -> None:
        self._add_lead_routes(app)
        self._add_rule_routes(app)

        @app.get("/sequences", tags=["sequences"])
        async def sequence_catalog(tenant_id: Tenant = "default") -> dict[str, Any]:
            """The sequences the router knows of a tenant (nurture's, as its
            SequenceChanged events reported them), and the preset keys, which exist
            for every tenant unless the catalog says otherwise."""
            return {
                "items": await repo.list_catalog(self.pool, tenant_id),
                "presets": list(PRESET_SEQUENCE_KEYS),
            }

    def _add_lead_routes(self, app: FastAPI) -> None:
        @app.post(
            "/leads",
            tags=["leads"],
            status_code=201,
            responses={
                200: {
                    "description": "one lead that updated an existing lead (or an event"
                    " applied already: `duplicate`), or a batch"
                },
                201: {"description": "one lead, created"},
                409: {"description": "a concurrent write to the same lead; retry"},
                422: {
                    "description": "invalid input, or a sequence the tenant does not have"
                    " or that takes no leads; nothing was written"
                },
            },
        )
        async def post_leads(
            body: Annotated[handlers.IntakeBody, Body()],
            tenant_id: Annotated[
                str | None, Query(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
            ] = None,
        ) -> JSONResponse:
            """Intake, like the `leads` topic and with its JSON (envelope included; an
            `event_id` makes the request idempotent): one `{"lead": {...}, "sequence":
            ...}` or a batch `{"leads": [...]}` of at most 1000, applied all or none."""
            batch = isinstance(body, handlers.LeadIntakeBatch)
            try:
                tenant = handlers.request_tenant(tenant_id, body)
                results = await handlers.intake_leads(
                    self.pool,
                    tenant_id=tenant,
                    items=body.leads if isinstance(body, handlers.LeadIntakeBatch) else [body],
                    default_sequence=self.settings.default_sequence,
                    now=self.clock.now(),
                )
            except domain.LeadInvalid as exc:
                raise HTTPException(422, str(exc)) from exc
            except handlers.InvalidItems as exc:
                if batch:
                    raise HTTPException(422, exc.detail()) from exc
                raise HTTPException(422, exc.errors[0][1]) from exc
            except asyncpg.UniqueViolationError as exc:
                raise HTTPException(
                    409, "another request wrote the same lead at the same time; retry"
                ) from exc
            self.wake_relay()
            if batch:
                return JSONResponse({"results": [_intake_json(r) for r in results]})
            (result,) = results
            return JSONResponse(_intake_json(result), status_code=201 if result.created else 200)

        @app.get("/leads/{lead_id}", tags=["leads"])
        async def get_lead(lead_id: uuid.UUID, tenant_id: str = "default") -> dict[str, Any]:
            lead = await repo.get_lead(self.pool, tenant_id, lead_id)
            if lead is None:
                raise HTTPException(404, f"no lead {lead_id}")
            lead["status_history"] = await repo.status_history(self.pool, lead_id, tenant_id)
            return lead

        @app.get("/leads/{lead_id}/history", tags=["leads"])
        async def get_lead_history(
            lead_id: uuid.UUID, tenant_id: str = "default"
        ) -> dict[str, Any]:
            """A lead's status changes, oldest first."""
            if await repo.get_lead(self.pool, tenant_id, lead_id) is None:
                raise HTTPException(404, f"no lead {lead_id}")
            history = await repo.status_history(self.pool, lead_id, tenant_id)
            return {"lead_id": lead_id, "status_history": history}

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

    def _add_rule_routes(self, app: FastAPI) -> None:
        @app.get("/routing-rules", tags=["routing rules"])
        async def get_rules(tenant_id: Tenant = "default") -> list[dict[str, Any]]:
            """The tenant's rules in order: the first enabled rule that matches fires."""
            return await repo.list_routing_rules(self.pool, tenant_id)

        @app.put("/routing-rules", tags=["routing rules"])
        async def put_rules(
            rules: Annotated[list[handlers.RoutingRuleIn], Body(max_length=handlers.MAX_RULES)],
            tenant_id: Tenant = "default",
        ) -> list[dict[str, Any]]:
            """Replace the whole ordered list at once (an empty list removes every rule)."""
            try:
                return await handlers.replace_rules(self.pool, tenant_id, rules, self.clock.now())
            except handlers.InvalidItems as exc:
                raise HTTPException(422, exc.detail()) from exc

        @app.post("/routing-rules", tags=["routing rules"], status_code=201)
        async def post_rule(
            rule: handlers.RoutingRuleIn, tenant_id: Tenant = "default"
        ) -> dict[str, Any]:
            """Append one rule: it fires after every existing rule."""
            try:
                return await handlers.append_rule(self.pool, tenant_id, rule, self.clock.now())
            except domain.RuleInvalid as exc:
                raise HTTPException(422, str(exc)) from exc

        @app.delete("/routing-rules/{rule_id}", tags=["routing rules"], status_code=204)
        async def delete_rule(rule_id: uuid.UUID, tenant_id: Tenant = "default") -> Response:
            if not await handlers.delete_rule(self.pool, tenant_id, rule_id, self.clock.now()):
                raise HTTPException(404, f"no routing rule {rule_id}")
            return Response(status_code=204)
