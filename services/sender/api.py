"""Sender's HTTP API: deliveries, mailboxes, suppression list, dry runs."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, FastAPI, HTTPException, Query
from pydantic import BaseModel, ConfigDict, Field

from services.sender import repo
from services.sender.mailboxes import MailboxInvalid, parse_spec, redacted, stored_transports

if TYPE_CHECKING:
    from services.sender.app import SenderService

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
    "dry_run",
)


class SuppressionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: str = Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")
    reason: str = Field(default="added by a user", min_length=1, max_length=200)


class DryRunIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: A sequence key, or "*" for every sequence of the tenant.
    sequence: str = Field(default="*", min_length=1, max_length=100)
    enabled: bool = True


def mailbox_view(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "tenant_id": row["tenant_id"],
        "email": row["email"],
        "display_name": row["display_name"],
        "transports": redacted(list(row["transports"])),
        "daily_cap": row["daily_cap"],
        "hourly_cap": row["hourly_cap"],
        "domain_hourly_cap": row["domain_hourly_cap"],
        "dkim": {"domain": row["dkim_domain"], "selector": row["dkim_selector"]}
        if row["dkim_domain"]
        else None,
        "enabled": row["enabled"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
    }


def _values(data: dict[str, Any]) -> dict[str, Any]:
    try:
        spec = parse_spec(data)
    except MailboxInvalid as exc:
        raise HTTPException(422, str(exc)) from exc
    return {
        "email": spec.email.lower(),
        "display_name": spec.display_name,
        "transports": stored_transports(spec),
        "daily_cap": spec.daily_cap,
        "hourly_cap": spec.hourly_cap,
        "domain_hourly_cap": spec.domain_hourly_cap,
        "dkim_domain": spec.dkim.domain if spec.dkim else None,
        "dkim_selector": spec.dkim.selector if spec.dkim else None,
        "dkim_private_key": spec.dkim.private_key.get_secret_value() if spec.dkim else None,
        "enabled": spec.enabled,
    }


def install(app: FastAPI, service: SenderService) -> None:
    router = APIRouter()

    @router.get("/deliveries", tags=["deliveries"])
    async def list_deliveries(
        tenant_id: str = "default",
        status: str | None = None,
        lead_id: uuid.UUID | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        if status is not None and status not in DELIVERY_STATUSES:
            raise HTTPException(422, f"status must be one of {', '.join(DELIVERY_STATUSES)}")
        items = await repo.list_deliveries(service.pool, tenant_id, status, lead_id, limit, offset)
        for item in items:
            item.pop("body_text", None)
            item.pop("body_html", None)
        return {"items": items, "limit": limit, "offset": offset}

    @router.get("/deliveries/stats", tags=["deliveries"])
    async def delivery_stats() -> dict[str, int]:
        return await repo.status_counts(service.pool)

    # ------------------------------------------------------------------ mailboxes

    @router.get("/mailboxes", tags=["mailboxes"])
    async def list_mailboxes(tenant_id: str = "default") -> dict[str, Any]:
        return {
            "items": [mailbox_view(r) for r in await repo.mailboxes_of(service.pool, tenant_id)]
        }

    @router.post("/mailboxes", status_code=201, tags=["mailboxes"])
    async def create_mailbox(
        body: dict[str, Any] = Body(...), tenant_id: str = "default"
    ) -> dict[str, Any]:
        values = _values(body)
        async with service.pool.acquire() as conn:
            try:
                row = await repo.insert_mailbox(conn, tenant_id, values)
            except Exception as exc:
                if type(exc).__name__ == "UniqueViolationError":
                    raise HTTPException(409, f"mailbox {values['email']} exists") from exc
                raise
        return mailbox_view(row)

    @router.get("/mailboxes/{mailbox_id}", tags=["mailboxes"])
    async def get_mailbox(mailbox_id: uuid.UUID, tenant_id: str = "default") -> dict[str, Any]:
        row = await repo.mailbox(service.pool, mailbox_id)
        if row is None or row["tenant_id"] != tenant_id:
            raise HTTPException(404, f"no mailbox {mailbox_id}")
        return mailbox_view(row)

    @router.put("/mailboxes/{mailbox_id}", tags=["mailboxes"])
    @router.patch("/mailboxes/{mailbox_id}", tags=["mailboxes"])
    async def update_mailbox(
        mailbox_id: uuid.UUID, body: dict[str, Any] = Body(...), tenant_id: str = "default"
    ) -> dict[str, Any]:
        async with service.pool.acquire() as conn, conn.transaction():
            current = await repo.mailbox(conn, mailbox_id)
            if current is None or current["tenant_id"] != tenant_id:
                raise HTTPException(404, f"no mailbox {mailbox_id}")
            merged = {
                "email": current["email"],
                "display_name": current["display_name"],
                "transports": list(current["transports"]),
                "daily_cap": current["daily_cap"],
                "hourly_cap": current["hourly_cap"],
                "domain_hourly_cap": current["domain_hourly_cap"],
                "enabled": current["enabled"],
                **(
                    {
                        "dkim": {
                            "domain": current["dkim_domain"],
                            "selector": current["dkim_selector"],
                            "private_key": current["dkim_private_key"],
                        }
                    }
                    if current["dkim_domain"]
                    else {}
                ),
                **body,
            }
            merged["transports"] = [
                {k: v for k, v in t.items() if v is not None} for t in merged["transports"]
            ]
            row = await repo.update_mailbox(conn, tenant_id, mailbox_id, _values(merged))
        return mailbox_view(row)

    @router.delete("/mailboxes/{mailbox_id}", status_code=204, tags=["mailboxes"])
    async def delete_mailbox(mailbox_id: uuid.UUID, tenant_id: str = "default") -> None:
        async with service.pool.acquire() as conn:
            if not await repo.delete_mailbox(conn, tenant_id, mailbox_id):
                raise HTTPException(404, f"no mailbox {mailbox_id}")

    # --------------------------------------------------------------- suppression

    @router.get("/suppressions", tags=["suppressions"])
    async def list_suppressions(
        tenant_id: str = "default",
        email: str | None = None,
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0),
    ) -> dict[str, Any]:
        items = await repo.list_suppressions(
            service.pool, tenant_id, email.strip().lower() if email else None, limit, offset
        )
        return {"items": items, "limit": limit, "offset": offset}

    @router.post("/suppressions", status_code=201, tags=["suppressions"])
    async def add_suppression(body: SuppressionIn, tenant_id: str = "default") -> dict[str, Any]:
        async with service.pool.acquire() as conn:
            await repo.add_suppression(
                conn, tenant_id, body.email.strip().lower(), body.reason, "api"
            )
        return {"email": body.email.strip().lower(), "reason": body.reason}

    @router.delete("/suppressions/{email}", status_code=204, tags=["suppressions"])
    async def remove_suppression(email: str, tenant_id: str = "default") -> None:
        if not await repo.remove_suppression(service.pool, tenant_id, email.strip().lower()):
            raise HTTPException(404, f"{email} is not suppressed")

    # ------------------------------------------------------------------- dry run

    @router.get("/dry-run", tags=["dry run"])
    async def get_dry_run(tenant_id: str = "default") -> dict[str, Any]:
        return {
            "tenant_id": tenant_id,
            "sequences": await repo.list_dry_runs(service.pool, tenant_id),
        }

    @router.put("/dry-run", tags=["dry run"])
    async def set_dry_run(body: DryRunIn, tenant_id: str = "default") -> dict[str, Any]:
        await repo.set_dry_run(service.pool, tenant_id, body.sequence, body.enabled)
        return await get_dry_run(tenant_id)

    app.include_router(router)
