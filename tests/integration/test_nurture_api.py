"""The management flow a user walks through, over HTTP, on real PostgreSQL and a real
Kafka-protocol broker: create, add steps, activate, enroll, pause, resume, edit (a new
version), stop; and bad input answered with 4xx and nothing half-written."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from schemas import topics
from schemas.events import LeadRouted, LeadSnapshot
from services.nurture.app import NurtureService

pytestmark = pytest.mark.integration


async def _known_lead(kafka: str, nurture: NurtureService, email: str) -> uuid.UUID:
    """Nurture learns leads from LeadRouted; publish one the way the router does."""
    lead_id = uuid.uuid4()
    event = LeadRouted(
        lead_id=lead_id,
        lead=LeadSnapshot(email=email, first_name="Ada", company="Acme"),
        sequence="cold_outreach",
        routing_reason="test",
    )
    producer = AIOKafkaProducer(bootstrap_servers=kafka)
    await producer.start()
    try:
        await producer.send_and_wait(topics.LEAD_ROUTED, event.to_bytes(), key=event.kafka_key())
    finally:
        await producer.stop()
    for _ in range(200):
        if await nurture.pool.fetchval("SELECT 1 FROM leads WHERE lead_id = $1", lead_id):
            return lead_id
        await asyncio.sleep(0.05)
    raise AssertionError("nurture never heard of the lead")


EMAIL_1 = {
    "key": "e1",
    "type": "email",
    "subject": "Hello {{ first_name }}",
    "text": "Hi {{ first_name }} at {{ company }}.",
}
WAIT = {"key": "w1", "type": "wait", "days": 2}
EMAIL_2 = {
    "key": "e2",
    "type": "email",
    "subject": "Following up",
    "text": "Any thoughts?",
    "reply_to_thread": True,
}


def _detail(response: httpx.Response) -> str:
    body: Any = response.json()
    return str(body.get("detail"))


async def test_the_whole_management_flow(
    client: httpx.AsyncClient, nurture: NurtureService, kafka_bootstrap: str
) -> None:
    created = await client.post(
        "/sequences",
        json={
            "key": "demo_flow",
            "name": "Demo flow",
            "settings": {
                "send_window": {
                    "timezone": "Europe/London",
                    "start": "09:00",
                    "end": "17:00",
                    "weekdays": ["mon", "tue", "wed", "thu", "fri"],
                }
            },
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "draft" and created.json()["steps"] == []

    for step in (EMAIL_1, WAIT, EMAIL_2):
        added = await client.post("/sequences/demo_flow/steps", json=step)
        assert added.status_code == 201, added.text
    steps = (await client.get("/sequences/demo_flow/steps")).json()["items"]
    assert [s["key"] for s in steps] == ["e1", "w1", "e2"]
    assert steps[1] == {
        "key": "w1",
        "type": "wait",
        "days": 2.0,
        "hours": 0.0,
        "minutes": 0.0,
        "business_days": 0,
    }

    reordered = await client.post(
        "/sequences/demo_flow/steps/reorder", json={"order": ["e1", "e2", "w1"]}
    )
    assert [s["key"] for s in reordered.json()["steps"]] == ["e1", "e2", "w1"]
    await client.post("/sequences/demo_flow/steps/reorder", json={"order": ["e1", "w1", "e2"]})

    drafts = (await client.get("/sequences", params={"status": "draft"})).json()["items"]
    assert [s["key"] for s in drafts] == ["demo_flow"]

    activated = await client.post("/sequences/demo_flow/activate")
    assert activated.status_code == 200 and activated.json()["status"] == "active"

    lead_id = await _known_lead(kafka_bootstrap, nurture, "ada@example.com")
    enrolled = await client.post(
        "/enrollments", json={"sequence": "demo_flow", "email": "ada@example.com"}
    )
    assert enrolled.status_code == 201, enrolled.text
    assert enrolled.json()["results"][0]["result"] == "enrolled"
    again = await client.post(
        "/enrollments",
        json={
            "sequence": "demo_flow",
            "leads": [{"lead_id": str(lead_id)}, {"email": "who@example.com"}],
        },
    )
    assert [r["result"] for r in again.json()["results"]] == ["already_enrolled", "unknown_lead"]

    mine = (await client.get("/enrollments", params={"lead_id": str(lead_id)})).json()["items"]
    enrollment = next(e for e in mine if e["sequence"] == "demo_flow")
    assert enrollment["version"] == 1 and enrollment["status"] in ("active", "awaiting_send")
    eid = enrollment["id"]

    paused = await client.post(f"/enrollments/{eid}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    assert (await client.post(f"/enrollments/{eid}/pause")).status_code == 409
    resumed = await client.post(f"/enrollments/{eid}/resume")
    assert resumed.json()["status"] in ("active", "awaiting_send")

    # Editing the running sequence makes version 2; the enrollment stays on version 1.
    edited = await client.patch("/sequences/demo_flow/steps/e2", json={"subject": "Checking in"})
    assert edited.status_code == 200, edited.text
    assert edited.json()["version"] == 2
    assert edited.json()["steps"][2]["subject"] == "Checking in"
    versions = (await client.get("/sequences/demo_flow/versions")).json()["items"]
    assert [(v["version"], v["enrollments"]) for v in versions] == [(1, 1), (2, 0)]
    assert (await client.get(f"/enrollments/{eid}")).json()["version"] == 1

    stopped = await client.post(f"/enrollments/{eid}/stop", json={"reason": "talked on the phone"})
    assert stopped.json()["status"] == "stopped"
    assert stopped.json()["stop_reason"] == "talked on the phone"
    log = (await client.get(f"/enrollments/{eid}/log")).json()["items"]
    decisions = [e["decision"] for e in log if e["decision"] in ("paused", "resumed", "stopped")]
    assert decisions == ["paused", "resumed", "stopped"], log

    listed = (
        await client.get("/sequences/demo_flow/enrollments", params={"status": "stopped"})
    ).json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == eid
    stats = (await client.get("/sequences/demo_flow/stats")).json()
    assert stats["enrolled"] == 1 and stats["stopped_by_reason"] == {"talked on the phone": 1}

    copy = await client.post("/sequences/demo_flow/duplicate", json={"key": "demo_copy"})
    assert copy.status_code == 201
    assert copy.json()["status"] == "draft"
    assert [s["key"] for s in copy.json()["steps"]] == ["e1", "w1", "e2"]
    assert (await client.delete("/sequences/demo_copy")).status_code == 204
    assert (await client.get("/sequences/demo_copy")).status_code == 404
    refused = await client.delete("/sequences/demo_flow")
    assert refused.status_code == 409 and "only drafts" in _detail(refused)


async def test_bad_input_gets_a_4xx_with_a_message_and_writes_nothing(
    client: httpx.AsyncClient, nurture: NurtureService
) -> None:
    async def sequences_count() -> int:
        return int(await nurture.pool.fetchval("SELECT count(*) FROM sequences"))

    async def versions_count() -> int:
        return int(await nurture.pool.fetchval("SELECT count(*) FROM sequence_versions"))

    before = await sequences_count()
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {
                "key": "x1",
                "name": "X",
                "steps": [
                    {"key": "c", "type": "condition", "condition": "if_opened", "then": "nowhere"}
                ],
            },
            "unknown branch target then='nowhere'",
        ),
        (
            {"key": "x2", "name": "X", "steps": [{"type": "wait", "days": -1}]},
            "greater than or equal to 0",
        ),
        (
            {
                "key": "x3",
                "name": "X",
                "steps": [{"type": "email", "subject": "Hi {{ nickname }}", "text": "Hello"}],
            },
            "template variable 'nickname' has no fallback",
        ),
        (
            {"key": "x4", "name": "X", "settings": {"send_window": {"timezone": "Mars/Olympus"}}},
            "Mars/Olympus",
        ),
        (
            {
                "key": "x5",
                "name": "X",
                "steps": [
                    {"key": "a", "type": "email", "subject": "A", "text": "a", "next": "b"},
                    {"key": "b", "type": "condition", "condition": "always", "then": "a"},
                ],
            },
            "loop without a wait",
        ),
        ({"key": "Bad Key", "name": "X"}, "String should match pattern"),
    ]
    for body, message in cases:
        response = await client.post("/sequences", json=body)
        assert response.status_code == 422, (body, response.text)
        assert message in response.text, (message, response.text)
    malformed = await client.post(
        "/sequences", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert malformed.status_code == 422
    assert await sequences_count() == before

    empty = await client.post("/sequences", json={"key": "empty", "name": "Empty"})
    assert empty.status_code == 201
    refused = await client.post("/sequences/empty/activate")
    assert refused.status_code == 422 and "empty sequence" in _detail(refused)

    # An invalid edit of an active sequence leaves no new version behind.
    await client.post("/sequences", json={"key": "live", "name": "Live", "steps": [EMAIL_1]})
    await client.post("/sequences/live/activate")
    versions = await versions_count()
    bad_edit = await client.post(
        "/sequences/live/steps",
        json={"type": "condition", "condition": "if_opened", "else": "missing"},
    )
    assert bad_edit.status_code == 422 and "unknown branch target" in _detail(bad_edit)
    assert await versions_count() == versions

    assert (
        await client.post("/enrollments", json={"sequence": "nope", "email": "a@example.com"})
    ).status_code == 404
    not_active = await client.post(
        "/enrollments", json={"sequence": "empty", "email": "a@example.com"}
    )
    assert not_active.status_code == 409
    no_leads = await client.post("/enrollments", json={"sequence": "live"})
    assert no_leads.status_code == 422
    unknown = await client.post(f"/enrollments/{uuid.uuid4()}/pause")
    assert unknown.status_code == 404
    assert (await client.get("/sequences", params={"status": "weird"})).status_code == 422
