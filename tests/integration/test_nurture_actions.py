"""Nurture's reactions through its real consumer and scheduler: a colleague's reply
stops the company (where the sequence asks for it), and `notify` posts a signed
webhook to a real HTTP server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from schemas import topics
from schemas.events import EngagementReceived, EngagementType, LeadRouted, LeadSnapshot
from services.nurture import notify
from services.nurture.app import NurtureService
from services.runtime.devstack import free_port
from tests.integration.conftest import Publish

pytestmark = pytest.mark.integration

SECRET = "whsec-test"


@pytest.fixture
def nurture_settings() -> dict[str, Any]:
    return {"webhook_secret": SECRET}


async def _eventually(check: Any, timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def _sequence(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    created = await client.post("/sequences", json=body)
    assert created.status_code == 201, created.text
    activated = await client.post(f"/sequences/{body['key']}/activate")
    assert activated.status_code == 200, activated.text
    return dict(activated.json())


def _routed(email: str, sequence: str) -> LeadRouted:
    return LeadRouted(
        lead_id=uuid.uuid4(),
        lead=LeadSnapshot(email=email, first_name="Sam"),
        sequence=sequence,
        routing_reason="test",
    )


async def _statuses(nurture: NurtureService, sequence: str) -> dict[str, tuple[str, str | None]]:
    rows = await nurture.pool.fetch(
        "SELECT lead->>'email' AS email, status, stop_reason FROM enrollments"
        " WHERE sequence_key = $1",
        sequence,
    )
    return {r["email"]: (r["status"], r["stop_reason"]) for r in rows}


async def test_a_reply_stops_everyone_at_the_company_when_the_sequence_asks(
    client: httpx.AsyncClient, nurture: NurtureService, publish: Publish
) -> None:
    steps = [
        {"key": "e1", "type": "email", "subject": "Hello", "text": "Hi {{ first_name }}"},
        {"key": "w1", "type": "wait", "days": 30},
        {"key": "e2", "type": "email", "subject": "Again", "text": "Hi again"},
    ]
    sequence = await _sequence(
        client,
        {"key": "accounts", "name": "Accounts", "settings": {"company_stop": True}, "steps": steps},
    )
    await _sequence(client, {"key": "solo", "name": "Solo", "steps": steps})
    leads = {
        address: _routed(address, seq)
        for address, seq in (
            ("ann@acme.example", "accounts"),
            ("bob@acme.example", "accounts"),
            ("cy@other.example", "accounts"),
            ("dee@gmail.com", "accounts"),
            ("eve@gmail.com", "accounts"),
            ("fay@acme.example", "solo"),
        )
    }
    for event in leads.values():
        await publish(topics.LEAD_ROUTED, event)
    await _eventually(lambda: _count(nurture, 6), what="six enrollments")

    async def reply(address: str) -> None:
        event = leads[address]
        enrollment_id = await nurture.pool.fetchval(
            "SELECT id FROM enrollments WHERE lead_id = $1", event.lead_id
        )
        await publish(
            topics.ENGAGEMENT,
            EngagementReceived(
                engagement_type=EngagementType.REPLIED,
                lead_id=event.lead_id,
                enrollment_id=enrollment_id,
                sequence_id=sequence["id"],
                email=address,
                source="inbound",
            ),
        )

    await reply("ann@acme.example")
    await reply("dee@gmail.com")

    async def settled() -> dict[str, tuple[str, str | None]] | None:
        statuses = {**await _statuses(nurture, "accounts"), **await _statuses(nurture, "solo")}
        stopped = [e for e, (status, _) in statuses.items() if status == "stopped"]
        return statuses if len(stopped) >= 4 else None

    statuses = await _eventually(settled, what="the company stop")
    assert statuses["ann@acme.example"] == ("stopped", "replied")
    assert statuses["bob@acme.example"] == ("stopped", "company replied")
    # Other sequences' enrollments at the company stop too: the company has answered.
    assert statuses["fay@acme.example"] == ("stopped", "company replied")
    assert statuses["dee@gmail.com"] == ("stopped", "replied")
    # Another company, and another free-mail user, go on.
    assert statuses["cy@other.example"][0] in ("active", "awaiting_send")
    assert statuses["eve@gmail.com"][0] in ("active", "awaiting_send")


async def _count(nurture: NurtureService, expected: int) -> bool:
    return bool(await nurture.pool.fetchval("SELECT count(*) FROM enrollments") == expected)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A real HTTP server that records webhooks; it fails the first request."""
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=503 if len(received) == 1 else 204)

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/hook", hook, methods=["POST"])]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/hook", received
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


async def test_notify_posts_a_signed_webhook_and_retries_until_accepted(
    client: httpx.AsyncClient,
    nurture: NurtureService,
    publish: Publish,
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, received = receiver
    await _sequence(
        client,
        {
            "key": "hot",
            "name": "Hot",
            "steps": [
                {
                    "key": "n1",
                    "type": "action",
                    "action": "notify",
                    "url": url,
                    "reason": "hot lead entered",
                },
                {"key": "t1", "type": "action", "action": "tag_lead", "tags": ["Hot"]},
                {"key": "e1", "type": "email", "subject": "Hello", "text": "Hi"},
            ],
        },
    )
    event = _routed("hot@acme.example", "hot")
    await publish(topics.LEAD_ROUTED, event)

    async def delivered() -> bool:
        status = await nurture.pool.fetchval("SELECT status FROM notifications")
        return bool(status == "delivered")

    # The first attempt gets a 503; the retry comes after its backoff (5 s).
    await _eventually(delivered, timeout=30, what="the webhook to be delivered")
    assert len(received) == 2
    headers, body = received[-1]
    assert received[0][1] == body  # the same notification, retried
    assert notify.verify_signature(SECRET.encode(), body, headers["x-touchstream-signature"])
    assert not notify.verify_signature(b"other", body, headers["x-touchstream-signature"])
    payload = json.loads(body)
    assert payload["event"] == "sequence.notify"
    assert payload["lead_id"] == str(event.lead_id)
    assert payload["reason"] == "hot lead entered" and payload["sequence"] == "hot"
    # The tag action went to the router as a LeadUpdateRequested, through the outbox.
    rows = await nurture.pool.fetch(
        "SELECT topic, payload FROM outbox WHERE event_type = 'LeadUpdateRequested'"
    )
    assert len(rows) == 1 and rows[0]["topic"] == topics.LEAD_UPDATES
    update = json.loads(rows[0]["payload"])
    assert update["action"] == "tag_lead" and update["tags"] == ["Hot"]
    assert (
        await nurture.pool.fetchval("SELECT count(*) FROM outbox WHERE event_type = 'StepDue'") == 1
    )


@pytest.mark.parametrize("nurture_settings", [{}, {"webhook_secret": "  "}], ids=["unset", "blank"])
async def test_without_a_webhook_secret_notify_fails_instead_of_posting_unsigned(
    client: httpx.AsyncClient,
    nurture: NurtureService,
    publish: Publish,
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, received = receiver
    await _sequence(
        client,
        {
            "key": "loud",
            "name": "Loud",
            "steps": [
                {"key": "n1", "type": "action", "action": "notify", "url": url},
                {"key": "e1", "type": "email", "subject": "Hello", "text": "Hi"},
            ],
        },
    )
    await publish(topics.LEAD_ROUTED, _routed("loud@acme.example", "loud"))

    async def failed() -> Any:
        return await nurture.pool.fetchrow(
            "SELECT status, attempts, last_error, response_status FROM notifications"
            " WHERE status <> 'pending'"
        )

    row = await _eventually(failed, what="the notification to be settled")
    assert row["status"] == "failed"
    assert row["last_error"] == notify.UNSIGNED_REFUSED
    assert "NURTURE_WEBHOOK_SECRET" in row["last_error"]
    assert row["attempts"] == 1 and row["response_status"] is None
    assert received == []  # nothing went out, signed or not
    # The sequence itself goes on: the email after the action is due.
    assert (
        await nurture.pool.fetchval("SELECT count(*) FROM outbox WHERE event_type = 'StepDue'") == 1
    )
