"""Sequence versions on the real stack: a sequence's settings (send window,
company_stop, tracking) are versioned with its steps, so an enrollment that started on
version 1 keeps version 1's window and content after the sequence is edited, while
new enrollments join the new version. Nurture runs in-process on a frozen clock that
the test moves."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from schemas import topics
from schemas.events import EmailSent, Event, LeadRouted, LeadSnapshot
from services.nurture.app import NurtureService
from services.runtime.clock import FrozenClock
from services.runtime.devstack import free_port
from services.runtime.kafka import create_topics
from services.runtime.settings import NurtureSettings

pytestmark = pytest.mark.integration

T = TypeVar("T")
#: Monday 15 June 2026, 10:00 UTC.
MONDAY = datetime(2026, 6, 15, 10, 0, tzinfo=UTC)
WINDOW_V1 = {"timezone": "UTC", "start": "09:00", "end": "17:00", "weekdays": [0, 1, 2, 3, 4]}
WINDOW_V2 = {**WINDOW_V1, "start": "13:00", "end": "14:00"}
SEQUENCE = {
    "key": "versioned",
    "name": "Versioned",
    "settings": {"send_window": WINDOW_V1},
    "steps": [
        {"key": "e1", "type": "email", "subject": "v1 first", "text": "Hello"},
        {"key": "w1", "type": "wait", "days": 1},
        {"key": "e2", "type": "email", "subject": "v1 second", "text": "Again"},
    ],
}


class Nurture:
    def __init__(
        self, service: NurtureService, http: httpx.AsyncClient, producer: AIOKafkaProducer
    ) -> None:
        self.service = service
        self.http = http
        self.producer = producer

    @property
    def clock(self) -> FrozenClock:
        assert isinstance(self.service.clock, FrozenClock)
        return self.service.clock

    async def publish(self, topic: str, event: Event) -> None:
        await self.producer.send_and_wait(topic, event.to_bytes(), key=event.kafka_key())

    async def route(self, email: str) -> uuid.UUID:
        """A lead routed into the sequence, the way the router publishes it."""
        lead_id = uuid.uuid4()
        await self.publish(
            topics.LEAD_ROUTED,
            LeadRouted(
                lead_id=lead_id,
                lead=LeadSnapshot(email=email),
                sequence="versioned",
                routing_reason="test",
            ),
        )
        return lead_id

    async def enrollment(self, lead_id: uuid.UUID) -> dict[str, Any] | None:
        row = await self.service.pool.fetchrow(
            "SELECT * FROM enrollments WHERE lead_id = $1", lead_id
        )
        return dict(row) if row is not None else None

    async def step_dues(self, lead_id: uuid.UUID) -> list[dict[str, Any]]:
        rows = await self.service.pool.fetch(
            "SELECT payload FROM outbox WHERE event_type = 'StepDue' ORDER BY id"
        )
        dues = [json.loads(r["payload"]) for r in rows]
        return [d for d in dues if d["lead_id"] == str(lead_id)]


async def eventually(check: Callable[[], Awaitable[T | None]], what: str, timeout: float = 20) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.fixture
async def nurture(database_url: str, kafka_bootstrap: str) -> AsyncIterator[Nurture]:
    await create_topics(kafka_bootstrap, 2)
    settings = NurtureSettings(
        database_url=database_url,
        kafka_bootstrap_servers=kafka_bootstrap,
        kafka_session_timeout_ms=3000,
        http_port=free_port(),
        http_host="127.0.0.1",
        scheduler_idle_seconds=0.05,
    )
    service = NurtureService(settings, clock=FrozenClock(MONDAY))
    await service.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        base_url = f"http://127.0.0.1:{settings.http_port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            yield Nurture(service, http, producer)
    finally:
        await producer.stop()
        await service.stop()


async def test_a_running_enrollment_keeps_its_versions_window_and_content(
    nurture: Nurture,
) -> None:
    http = nurture.http
    assert (await http.post("/sequences", json=SEQUENCE)).status_code == 201
    assert (await http.post("/sequences/versioned/activate")).status_code == 200

    first_lead = await nurture.route("first@example.com")
    (first_email,) = await eventually(
        lambda: nurture.step_dues(first_lead), "the first lead's first email"
    )
    assert first_email["message"]["subject"] == "v1 first"
    assert first_email["sequence_version"] == 1

    # Edit the running sequence: its window (version 2), then a step (version 3).
    patched = await http.patch(
        "/sequences/versioned", json={"settings": {"send_window": WINDOW_V2}}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["version"] == 2
    assert patched.json()["settings"]["send_window"]["start"] == "13:00"
    renamed = await http.patch("/sequences/versioned", json={"name": "Versioned, renamed"})
    assert renamed.json()["version"] == 2  # a name is not versioned
    edited = await http.patch(
        "/sequences/versioned/steps/e2", json={"subject": "v3 second", "text": "Changed"}
    )
    assert edited.status_code == 200, edited.text
    assert edited.json()["version"] == 3
    versions = (await http.get("/sequences/versioned/versions")).json()["items"]
    assert [(v["version"], v["settings"]["send_window"]["start"]) for v in versions] == [
        (1, "09:00"),
        (2, "13:00"),
        (3, "13:00"),
    ]

    # The first email goes out; the enrollment waits a day on version 1.
    await nurture.publish(
        topics.EMAIL_SENT,
        EmailSent(
            lead_id=first_lead,
            enrollment_id=uuid.UUID(first_email["enrollment_id"]),
            sequence_id=uuid.UUID(first_email["sequence_id"]),
            sequence_key="versioned",
            sequence_version=1,
            step_id=uuid.UUID(first_email["step_id"]),
            step_index=first_email["step_index"],
            delivery_key=first_email["delivery_key"],
            message_id=f"<{first_email['delivery_key']}@test>",
            to_email="first@example.com",
            from_email="outreach@example.com",
            subject="v1 first",
            sent_at=MONDAY,
        ),
    )

    async def waiting() -> dict[str, Any] | None:
        enrollment = await nurture.enrollment(first_lead)
        return enrollment if enrollment and enrollment["waiting_on"] == "wait" else None

    enrollment = await eventually(waiting, "the wait after the first email")
    assert enrollment["version"] == 1
    assert enrollment["next_action_at"] == MONDAY + timedelta(days=1)

    # Tuesday 10:30: inside version 1's window (09-17), outside the new one (13-14).
    nurture.clock.advance(timedelta(days=1, minutes=30))
    tuesday = MONDAY + timedelta(days=1, minutes=30)
    second = await eventually(
        lambda: _nth(nurture.step_dues(first_lead), 2), "the first lead's second email"
    )
    assert second["message"]["subject"] == "v1 second"  # version 1's content
    assert second["sequence_version"] == 1
    assert datetime.fromisoformat(second["due_at"]) == tuesday  # version 1's window

    # A lead enrolled now joins version 3 and waits for its window to open at 13:00.
    late_lead = await nurture.route("late@example.com")

    async def deferred() -> dict[str, Any] | None:
        enrollment = await nurture.enrollment(late_lead)
        return enrollment if enrollment and enrollment["waiting_on"] == "window" else None

    late = await eventually(deferred, "the new lead deferred to the new window")
    assert late["version"] == 3
    assert late["next_action_at"] == datetime(2026, 6, 16, 13, 0, tzinfo=UTC)
    assert await nurture.step_dues(late_lead) == []


async def _nth(items: Awaitable[list[dict[str, Any]]], n: int) -> dict[str, Any] | None:
    found = await items
    return found[n - 1] if len(found) >= n else None


async def test_settings_of_a_draft_change_in_place_and_an_archived_sequence_is_refused(
    nurture: Nurture,
) -> None:
    http = nurture.http
    assert (await http.post("/sequences", json=SEQUENCE)).status_code == 201
    draft = await http.patch("/sequences/versioned", json={"settings": {"company_stop": True}})
    assert draft.status_code == 200 and draft.json()["version"] == 1
    assert draft.json()["settings"]["company_stop"] is True
    same = await http.patch("/sequences/versioned", json={"settings": {"company_stop": True}})
    assert same.json()["version"] == 1

    await http.post("/sequences/versioned/activate")
    unchanged = await http.patch("/sequences/versioned", json={"settings": {"tracking": True}})
    assert unchanged.json()["version"] == 1  # nothing changed: no new version
    bad = await http.patch(
        "/sequences/versioned", json={"settings": {"send_window": {"timezone": "Mars/Olympus"}}}
    )
    assert bad.status_code == 422 and "Mars/Olympus" in bad.text
    assert len((await http.get("/sequences/versioned/versions")).json()["items"]) == 1

    await http.post("/sequences/versioned/archive")
    archived = await http.patch("/sequences/versioned", json={"settings": {"tracking": False}})
    assert archived.status_code == 409 and "archived" in archived.text
    listed = (await http.get("/sequences", params={"status": "archived"})).json()["items"]
    assert [(s["key"], s["settings"]["company_stop"]) for s in listed] == [("versioned", True)]
