"""Nurture's HTTP API: sequences, steps, enrollments, stats."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

import asyncpg
from fastapi import APIRouter, Body, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from services.nurture import handlers, repo, sequences
from services.nurture.model import SEQUENCE_KEY, SequenceInvalid
from services.nurture.sequences import Conflict, NotFound
from services.runtime.outbox import enqueue_many

if TYPE_CHECKING:
    from services.nurture.app import NurtureService

T = TypeVar("T")
ENROLLMENT_STATUSES = ("active", "awaiting_send", "paused", "completed", "stopped")
SEQUENCE_STATUSES = ("draft", "active", "paused", "archived")


class SequenceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(pattern=SEQUENCE_KEY)
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)
    settings: dict[str, Any] = Field(default_factory=dict)
    steps: list[dict[str, Any]] = Field(default_factory=list, max_length=100)


class SequencePatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    settings: dict[str, Any] | None = None


class Duplicate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(pattern=SEQUENCE_KEY)
    name: str | None = Field(default=None, min_length=1, max_length=200)


class Reorder(BaseModel):
    model_config = ConfigDict(extra="forbid")
    order: list[str] = Field(min_length=1)


class LeadRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lead_id: uuid.UUID | None = None
    email: str | None = Field(default=None, min_length=3, max_length=320)

    @model_validator(mode="after")
    def _one(self) -> LeadRef:
        if (self.lead_id is None) == (self.email is None):
            raise ValueError("give either lead_id or email")
        return self


class EnrollRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sequence: str = Field(min_length=1)
    lead_id: uuid.UUID | None = None
    email: str | None = Field(default=None, min_length=3, max_length=320)
    leads: list[LeadRef] = Field(default_factory=list, max_length=10_000)

    @model_validator(mode="after")
    def _some(self) -> EnrollRequest:
        if self.lead_id is not None or self.email is not None:
            self.leads = [LeadRef(lead_id=self.lead_id, email=self.email), *self.leads]
        if not self.leads:
            raise ValueError("name the leads to enroll: lead_id, email or leads")
        return self


class StopRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(default="stopped by a user", min_length=1, max_length=500)


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    until: AwareDatetime | None = None


def enrollment_view(
    row: dict[str, Any], counts: dict[str, int] | None = None, emails_sent: int | None = None
) -> dict[str, Any]:
    view = {
        "id": row["id"],
        "tenant_id": row["tenant_id"],
        "lead_id": row["lead_id"],
        "email": (row["lead"] or {}).get("email"),
        "sequence_id": row["sequence_id"],
        "sequence": row["sequence_key"],
        "version": row["version"],
        "status": row["status"],
        "current_step": row["position"],
        "steps_done": row["steps_done"],
        "next_action_at": row["next_action_at"],
        "waiting_on": row["waiting_on"],
        "stop_reason": row["stop_reason"],
        "paused_until": row["paused_until"],
        "enrolled_at": row["enrolled_at"],
        "last_activity_at": row["last_activity_at"],
        "finished_at": row["finished_at"],
    }
    if counts is not None:
        view["engagement"] = counts
    if emails_sent is not None:
        view["emails_sent"] = emails_sent
    return view


def install(app: FastAPI, service: NurtureService) -> None:
    router = APIRouter()

    async def in_transaction(work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            async with service.pool.acquire() as conn, conn.transaction():
                return await work(conn)
        except SequenceInvalid as exc:
            raise HTTPException(422, str(exc)) from exc
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from exc

    async def sequence_view(tenant_id: str, ref: str) -> dict[str, Any]:
        row = await repo.sequence_by_ref(service.pool, tenant_id, ref)
        if row is None:
            raise HTTPException(404, f"no sequence {ref!r}")
        return await sequences.view(service.pool, row)

    # ----------------------------------------------------------------- sequences

    @router.post("/sequences", status_code=201, tags=["sequences"])
    async def create_sequence(body: SequenceCreate, tenant_id: str = "default") -> dict[str, Any]:
        sequence_id = await in_transaction(
            lambda conn: sequences.create(
                conn, tenant_id, body.key, body.name, body.description, body.settings, body.steps
            )
        )
        return await sequence_view(tenant_id, str(sequence_id))

    @router.get("/sequences", tags=["sequences"])
    async def list_sequences(
        tenant_id: str = "default", status: str | None = None
    ) -> dict[str, Any]:
        if status is not None and status not in SEQUENCE_STATUSES:
            raise HTTPException(422, f"status must be one of {', '.join(SEQUENCE_STATUSES)}")
        return {"items": await repo.list_sequences(service.pool, tenant_id, status)}

    @router.get("/sequences/{ref}", tags=["sequences"])
    async def get_sequence(ref: str, tenant_id: str = "default") -> dict[str, Any]:
        return await sequence_view(tenant_id, ref)

    @router.patch("/sequences/{ref}", tags=["sequences"])
    async def patch_sequence(
        ref: str, body: SequencePatch, tenant_id: str = "default"
    ) -> dict[str, Any]:
        row = await in_transaction(
            lambda conn: sequences.update(
                conn,
                tenant_id,
                ref,
                name=body.name,
                description=body.description,
                settings=body.settings,
            )
        )
        return await sequences.view(service.pool, row)

    @router.delete("/sequences/{ref}", status_code=204, tags=["sequences"])
    async def delete_sequence(ref: str, tenant_id: str = "default") -> None:
        await in_transaction(lambda conn: sequences.delete(conn, tenant_id, ref))

    @router.post("/sequences/{ref}/duplicate", status_code=201, tags=["sequences"])
    async def duplicate_sequence(
        ref: str, body: Duplicate, tenant_id: str = "default"
    ) -> dict[str, Any]:
        new_id = await in_transaction(
            lambda conn: sequences.duplicate(conn, tenant_id, ref, body.key, body.name)
        )
        return await sequence_view(tenant_id, str(new_id))

    @router.post("/sequences/{ref}/activate", tags=["sequences"])
    async def activate_sequence(ref: str, tenant_id: str = "default") -> dict[str, Any]:
        row = await in_transaction(lambda conn: sequences.activate(conn, tenant_id, ref))
        return await sequences.view(service.pool, row)

    @router.post("/sequences/{ref}/pause", tags=["sequences"])
    async def pause_sequence(ref: str, tenant_id: str = "default") -> dict[str, Any]:
        row = await in_transaction(
            lambda conn: sequences.set_status(conn, tenant_id, ref, "paused")
        )
        return await sequences.view(service.pool, row)

    @router.post("/sequences/{ref}/archive", tags=["sequences"])
    async def archive_sequence(ref: str, tenant_id: str = "default") -> dict[str, Any]:
        row = await in_transaction(
            lambda conn: sequences.set_status(conn, tenant_id, ref, "archived")
        )
        return await sequences.view(service.pool, row)

    @router.get("/sequences/{ref}/versions", tags=["sequences"])
    async def list_versions(ref: str, tenant_id: str = "default") -> dict[str, Any]:
        row = await repo.sequence_by_ref(service.pool, tenant_id, ref)
        if row is None:
            raise HTTPException(404, f"no sequence {ref!r}")
        return {"items": await repo.versions_of(service.pool, row["id"])}

    @router.get("/sequences/{ref}/stats", tags=["sequences"])
    async def sequence_stats(ref: str, tenant_id: str = "default") -> dict[str, Any]:
        row = await repo.sequence_by_ref(service.pool, tenant_id, ref)
        if row is None:
            raise HTTPException(404, f"no sequence {ref!r}")
        stats = await repo.sequence_stats(service.pool, row["id"])
        by_status: dict[str, int] = stats["by_status"]
        enrolled = sum(by_status.values())
        completed = by_status.get("completed", 0)
        return {
            "sequence": row["key"],
            "enrolled": enrolled,
            "active": by_status.get("active", 0) + by_status.get("awaiting_send", 0),
            "paused": by_status.get("paused", 0),
            "completed": completed,
            "stopped": by_status.get("stopped", 0),
            "stopped_by_reason": stats["stopped_by_reason"],
            "completion_rate": round(completed / enrolled, 4) if enrolled else 0.0,
        }

    # --------------------------------------------------------------------- steps

    @router.get("/sequences/{ref}/steps", tags=["steps"])
    async def list_steps(ref: str, tenant_id: str = "default") -> dict[str, Any]:
        return {"items": (await sequence_view(tenant_id, ref))["steps"]}

    @router.post("/sequences/{ref}/steps", status_code=201, tags=["steps"])
    async def add_step(
        ref: str,
        step: dict[str, Any] = Body(...),
        position: int | None = Query(None, ge=0),
        tenant_id: str = "default",
    ) -> dict[str, Any]:
        row = await in_transaction(
            lambda conn: sequences.edit_steps(
                conn, tenant_id, ref, sequences.add_step(step, position)
            )
        )
        return await sequences.view(service.pool, row)

    @router.put("/sequences/{ref}/steps/{key}", tags=["steps"])
    @router.patch("/sequences/{ref}/steps/{key}", tags=["steps"])
    async def update_step(
        ref: str,
        key: str,
        request: Request,
        step: dict[str, Any] = Body(...),
        tenant_id: str = "default",
    ) -> dict[str, Any]:
        if request.method == "PATCH":
            current = {s["key"]: s for s in (await sequence_view(tenant_id, ref))["steps"]}
            if key not in current:
                raise HTTPException(404, f"no step {key!r}")
            step = {**current[key], **step}
        row = await in_transaction(
            lambda conn: sequences.edit_steps(
                conn, tenant_id, ref, sequences.replace_step(key, step)
            )
        )
        return await sequences.view(service.pool, row)

    @router.delete("/sequences/{ref}/steps/{key}", tags=["steps"])
    async def delete_step(ref: str, key: str, tenant_id: str = "default") -> dict[str, Any]:
        row = await in_transaction(
            lambda conn: sequences.edit_steps(conn, tenant_id, ref, sequences.remove_step(key))
        )
        return await sequences.view(service.pool, row)

    @router.post("/sequences/{ref}/steps/reorder", tags=["steps"])
    async def reorder_steps(ref: str, body: Reorder, tenant_id: str = "default") -> dict[str, Any]:
        row = await in_transaction(
            lambda conn: sequences.edit_steps(
                conn, tenant_id, ref, sequences.reorder_steps(body.order)
            )
        )
        return await sequences.view(service.pool, row)

    # --------------------------------------------------------------- enrollments

    @router.post("/enrollments", tags=["enrollments"])
    async def enroll(body: EnrollRequest, tenant_id: str = "default") -> JSONResponse:
        now = service.clock.now()

        async def work(conn: asyncpg.Connection) -> list[dict[str, Any]]:
            sequence = await repo.sequence_by_ref(conn, tenant_id, body.sequence)
            if sequence is None:
                raise NotFound(f"no sequence {body.sequence!r}")
            if sequence["status"] != "active":
                raise Conflict(f"sequence {sequence['key']!r} is {sequence['status']}: activate it")
            results: list[dict[str, Any]] = []
            found: list[tuple[uuid.UUID, dict[str, Any]]] = []
            for ref in body.leads:
                lead = await repo.find_lead(conn, tenant_id, ref.lead_id, ref.email)
                if lead is None:
                    results.append(
                        {**ref.model_dump(exclude_none=True, mode="json"), "result": "unknown_lead"}
                    )
                    continue
                found.append((lead["lead_id"], lead["snapshot"]))
                results.append(
                    {
                        "lead_id": str(lead["lead_id"]),
                        "email": lead["email"],
                        "result": "suppressed" if lead["suppressed_reason"] else None,
                    }
                )
            enrolled = await handlers.enroll(
                conn,
                tenant_id=tenant_id,
                sequence={
                    "id": sequence["id"],
                    "version_id": sequence["version_id"],
                    "key": sequence["key"],
                    "version": sequence["current_version"],
                },
                leads=found,
                now=now,
            )
            for result in results:
                if result["result"] is None:
                    lead_id = uuid.UUID(result["lead_id"])
                    result["result"] = "enrolled" if lead_id in enrolled else "already_enrolled"
            return results

        results = await in_transaction(work)
        service.after_commit()
        status = 201 if any(r["result"] == "enrolled" for r in results) else 200
        return JSONResponse({"results": results}, status_code=status)

    @router.get("/enrollments", tags=["enrollments"])
    async def list_enrollments(
        lead_id: uuid.UUID | None = None, email: str | None = None, tenant_id: str = "default"
    ) -> dict[str, Any]:
        if lead_id is None and email is None:
            raise HTTPException(422, "give lead_id or email")
        if lead_id is None:
            lead = await repo.find_lead(service.pool, tenant_id, None, email)
            if lead is None:
                return {"items": []}
            lead_id = lead["lead_id"]
        items = await repo.enrollments_of_lead(service.pool, tenant_id, lead_id)
        return {"items": await _views(items)}

    async def _views(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = [e["id"] for e in items]
        counts = await repo.engagement_counts(service.pool, ids)
        sent = await repo.emails_sent_counts(service.pool, ids)
        return [enrollment_view(e, counts.get(e["id"], {}), sent.get(e["id"], 0)) for e in items]

    @router.get("/enrollments/{enrollment_id}", tags=["enrollments"])
    async def get_enrollment(enrollment_id: uuid.UUID) -> dict[str, Any]:
        enrollment = await repo.get_enrollment(service.pool, enrollment_id)
        if enrollment is None:
            raise HTTPException(404, f"no enrollment {enrollment_id}")
        view = (await _views([enrollment]))[0]
        view["log"] = await repo.execution_log(service.pool, enrollment_id)
        view["notifications"] = await repo.notifications_of(service.pool, enrollment_id)
        return view

    @router.get("/enrollments/{enrollment_id}/log", tags=["enrollments"])
    async def enrollment_log(enrollment_id: uuid.UUID) -> dict[str, Any]:
        if await repo.get_enrollment(service.pool, enrollment_id) is None:
            raise HTTPException(404, f"no enrollment {enrollment_id}")
        return {"items": await repo.execution_log(service.pool, enrollment_id)}

    async def _change(
        enrollment_id: uuid.UUID, work: Callable[[asyncpg.Connection], Awaitable[bool]], what: str
    ) -> dict[str, Any]:
        async def guarded(conn: asyncpg.Connection) -> bool:
            if await repo.enrollment_for_update(conn, enrollment_id) is None:
                raise NotFound(f"no enrollment {enrollment_id}")
            return await work(conn)

        if not await in_transaction(guarded):
            current = await repo.get_enrollment(service.pool, enrollment_id)
            assert current is not None
            raise HTTPException(409, f"cannot {what} an enrollment that is {current['status']}")
        service.after_commit()
        return await get_enrollment(enrollment_id)

    @router.post("/enrollments/{enrollment_id}/pause", tags=["enrollments"])
    async def pause(enrollment_id: uuid.UUID, body: PauseRequest | None = None) -> dict[str, Any]:
        now = service.clock.now()
        until: datetime | None = body.until if body is not None else None

        async def work(conn: asyncpg.Connection) -> bool:
            done = await repo.pause_enrollment(conn, enrollment_id, until, now)
            if done:
                await _log(
                    conn,
                    enrollment_id,
                    "paused",
                    "paused by a user" + (f" until {until.isoformat()}" if until else ""),
                    now,
                )
            return done

        return await _change(enrollment_id, work, "pause")

    @router.post("/enrollments/{enrollment_id}/resume", tags=["enrollments"])
    async def resume(enrollment_id: uuid.UUID) -> dict[str, Any]:
        now = service.clock.now()

        async def work(conn: asyncpg.Connection) -> bool:
            done = await repo.resume_enrollment(conn, enrollment_id, now)
            if done:
                await _log(conn, enrollment_id, "resumed", "resumed by a user", now)
            return done

        return await _change(enrollment_id, work, "resume")

    @router.post("/enrollments/{enrollment_id}/stop", tags=["enrollments"])
    async def stop(enrollment_id: uuid.UUID, body: StopRequest | None = None) -> dict[str, Any]:
        now = service.clock.now()
        reason = body.reason if body is not None else "stopped by a user"

        async def work(conn: asyncpg.Connection) -> bool:
            row = await repo.enrollment_for_update(conn, enrollment_id)
            if row is None or row["status"] not in ("active", "awaiting_send", "paused"):
                return False
            await repo.stop_enrollments(conn, [enrollment_id], reason, now)
            await _log(conn, enrollment_id, "stopped", reason, now)
            # An email still waiting at the sender must not go out.
            await enqueue_many(conn, handlers.stop_notices([row], reason))
            return True

        return await _change(enrollment_id, work, "stop")

    async def _log(
        conn: asyncpg.Connection,
        enrollment_id: uuid.UUID,
        decision: str,
        reason: str,
        now: datetime,
    ) -> None:
        row = await repo.enrollment_for_update(conn, enrollment_id)
        assert row is not None
        await repo.write_log(
            conn,
            [(row["tenant_id"], enrollment_id, handlers.LogEntry(None, decision, reason))],
            now,
        )

    @router.get("/sequences/{ref}/enrollments", tags=["enrollments"])
    async def sequence_enrollments(
        ref: str,
        tenant_id: str = "default",
        status: str | None = None,
        version: int | None = Query(None, ge=1),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        if status is not None and status not in ENROLLMENT_STATUSES:
            raise HTTPException(422, f"status must be one of {', '.join(ENROLLMENT_STATUSES)}")
        row = await repo.sequence_by_ref(service.pool, tenant_id, ref)
        if row is None:
            raise HTTPException(404, f"no sequence {ref!r}")
        items, total = await repo.enrollments_of_sequence(
            service.pool, row["id"], status, version, limit, offset
        )
        return {"items": await _views(items), "total": total, "limit": limit, "offset": offset}

    app.include_router(router)
