"""The sender's API and mailbox rules, in-process on the real stack: mailboxes CRUD
with secrets kept out of responses, the suppression list, dry-run switches, and a
lead keeping its mailbox for the whole sequence."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from schemas import topics
from schemas.events import RenderedMessage, StepDue
from services.runtime.devstack import free_port
from services.runtime.kafka import create_topics
from services.runtime.settings import SenderSettings
from services.sender.app import SenderService
from tests.smtp_server import ScriptedSmtp, smtp_server

pytestmark = pytest.mark.integration


@pytest.fixture
async def smtp() -> AsyncIterator[ScriptedSmtp]:
    async with smtp_server() as (server, _):
        yield server


@pytest.fixture
async def sender(
    database_url: str, kafka_bootstrap: str, smtp: ScriptedSmtp
) -> AsyncIterator[SenderService]:
    await create_topics(kafka_bootstrap, 2)
    service = SenderService(
        SenderSettings(
            database_url=database_url,
            kafka_bootstrap_servers=kafka_bootstrap,
            kafka_session_timeout_ms=3000,
            http_port=free_port(),
            http_host="127.0.0.1",
            tracking_secret="test-secret",
            smtp_host=smtp.host,
            smtp_port=smtp.port,
        )
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def client(sender: SenderService) -> AsyncIterator[httpx.AsyncClient]:
    url = f"http://127.0.0.1:{sender.settings.http_port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        yield c


def _mailbox(
    email: str, smtp: ScriptedSmtp, *, login: bool = False, **extra: object
) -> dict[str, object]:
    transport: dict[str, object] = {"type": "smtp", "host": smtp.host, "port": smtp.port}
    if login:
        transport.update(username="u", password="s3cret")
    return {"email": email, "transports": [transport], **extra}


async def test_mailboxes_crud_keeps_secrets_out_of_responses(
    client: httpx.AsyncClient, smtp: ScriptedSmtp, tmp_path: Path
) -> None:
    created = await client.post(
        "/mailboxes", json=_mailbox("ann@acme.example", smtp, login=True, daily_cap=50)
    )
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["transports"][0]["password"] == "***" and "s3cret" not in created.text
    mailbox_id = body["id"]
    assert (
        await client.post("/mailboxes", json=_mailbox("ann@acme.example", smtp))
    ).status_code == 409
    patched = await client.patch(
        f"/mailboxes/{mailbox_id}", json={"hourly_cap": 10, "display_name": "Ann"}
    )
    assert patched.status_code == 200, patched.text
    assert patched.json()["hourly_cap"] == 10 and patched.json()["daily_cap"] == 50
    listed = (await client.get("/mailboxes")).json()["items"]
    assert [m["email"] for m in listed] == ["ann@acme.example"]
    assert (await client.delete(f"/mailboxes/{mailbox_id}")).status_code == 204
    assert (await client.get(f"/mailboxes/{mailbox_id}")).status_code == 404

    for bad, message in (
        ({"email": "no-at-sign", "transports": [{"type": "smtp", "host": "h"}]}, "email"),
        ({"email": "a@b.example", "transports": []}, "transports"),
        ({"email": "a@b.example", "transports": [{"type": "carrier-pigeon"}]}, "transports"),
        (
            {"email": "a@b.example", "transports": [{"type": "smtp", "host": "h"}], "daily_cap": 0},
            "daily_cap",
        ),
        (
            {
                "email": "a@b.example",
                "display_name": "x\r\nBcc: everyone@example.com",
                "transports": [{"type": "smtp", "host": "h"}],
            },
            "line breaks",
        ),
    ):
        response = await client.post("/mailboxes", json=bad)
        assert response.status_code == 422, (bad, response.text)
        assert message in response.text
    assert (await client.get("/mailboxes")).json()["items"] == []


async def test_suppression_list_and_dry_run_switches(client: httpx.AsyncClient) -> None:
    added = await client.post(
        "/suppressions", json={"email": "No.More@Example.com", "reason": "asked by phone"}
    )
    assert added.status_code == 201
    items = (await client.get("/suppressions")).json()["items"]
    assert [(i["email"], i["reason"], i["source"]) for i in items] == [
        ("no.more@example.com", "asked by phone", "api")
    ]
    assert (await client.post("/suppressions", json={"email": "bad"})).status_code == 422
    assert (await client.delete("/suppressions/no.more@example.com")).status_code == 204
    assert (await client.delete("/suppressions/no.more@example.com")).status_code == 404

    on = await client.put("/dry-run", json={"sequence": "*"})
    assert on.json()["sequences"] == ["*"]
    off = await client.put("/dry-run", json={"sequence": "*", "enabled": False})
    assert off.json()["sequences"] == []
    assert (await client.get("/deliveries", params={"status": "lost"})).status_code == 422


async def test_a_lead_keeps_its_mailbox_for_the_whole_sequence(
    client: httpx.AsyncClient, sender: SenderService, smtp: ScriptedSmtp, kafka_bootstrap: str
) -> None:
    for address in ("one@acme.example", "two@acme.example", "three@acme.example"):
        assert (await client.post("/mailboxes", json=_mailbox(address, smtp))).status_code == 201
    enrollments = [uuid.uuid4() for _ in range(6)]
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        for step in range(3):
            for n, enrollment in enumerate(enrollments):
                event = StepDue(
                    lead_id=uuid.UUID(int=n + 1),
                    enrollment_id=enrollment,
                    sequence_id=uuid.uuid4(),
                    sequence_key="s",
                    sequence_version=1,
                    step_id=uuid.uuid4(),
                    step_index=step,
                    delivery_key=f"{enrollment}:{step}",
                    due_at=datetime.now(UTC),
                    message=RenderedMessage(
                        to_email=f"lead{n}@example.org", subject=f"Step {step}", text="Hello"
                    ),
                )
                await producer.send_and_wait(
                    topics.STEP_DUE, event.to_bytes(), key=event.kafka_key()
                )
            # Each step goes out before the next is due, as in a sequence.
            deadline = time.monotonic() + 20
            while len(smtp.received) < (step + 1) * len(enrollments):
                assert time.monotonic() < deadline, "deliveries did not go out"
                await asyncio.sleep(0.1)
    finally:
        await producer.stop()
    senders: dict[str, set[str]] = {}
    for received in smtp.received:
        senders.setdefault(received.rcpt_tos[0], set()).add(received.mail_from)
    assert all(len(froms) == 1 for froms in senders.values()), senders
    # And the leads are spread over the mailboxes.
    assert len({next(iter(f)) for f in senders.values()}) == 3


async def test_soft_bounces_are_retried_a_bounded_number_of_times(
    database_url: str, kafka_bootstrap: str, smtp: ScriptedSmtp
) -> None:
    from schemas.events import BounceType, EngagementReceived, EngagementType

    await create_topics(kafka_bootstrap, 2)
    service = SenderService(
        SenderSettings(
            database_url=database_url,
            kafka_bootstrap_servers=kafka_bootstrap,
            kafka_session_timeout_ms=3000,
            http_port=free_port(),
            http_host="127.0.0.1",
            tracking_secret="test-secret",
            smtp_host=smtp.host,
            smtp_port=smtp.port,
            soft_bounce_retries=2,
            soft_bounce_retry_seconds=0.2,
        )
    )
    await service.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    try:
        enrollment = uuid.uuid4()
        due = StepDue(
            lead_id=uuid.uuid4(),
            enrollment_id=enrollment,
            sequence_id=uuid.uuid4(),
            sequence_key="s",
            sequence_version=1,
            step_id=uuid.uuid4(),
            step_index=0,
            delivery_key=f"{enrollment}:0",
            due_at=datetime.now(UTC),
            message=RenderedMessage(to_email="full@example.org", subject="Hi", text="Hello"),
        )
        await producer.send_and_wait(topics.STEP_DUE, due.to_bytes(), key=due.kafka_key())

        async def sends(count: int) -> None:
            deadline = time.monotonic() + 20
            while len(smtp.received) < count:
                assert time.monotonic() < deadline, f"expected {count} sends"
                await asyncio.sleep(0.05)

        await sends(1)
        for n in range(3):  # the mailbox is full, each time
            bounce = EngagementReceived(
                engagement_type=EngagementType.BOUNCED,
                bounce_type=BounceType.SOFT,
                lead_id=due.lead_id,
                enrollment_id=enrollment,
                delivery_key=due.delivery_key,
                email="full@example.org",
                source="inbound",
            )
            await producer.send_and_wait(
                topics.ENGAGEMENT, bounce.to_bytes(), key=bounce.kafka_key()
            )
            if n < 2:
                await sends(n + 2)
        deadline = time.monotonic() + 20
        while await service.pool.fetchval("SELECT status FROM deliveries") != "failed":
            assert time.monotonic() < deadline, "the third soft bounce should end it"
            await asyncio.sleep(0.05)
        row = await service.pool.fetchrow("SELECT soft_bounces, status_reason FROM deliveries")
        assert row["soft_bounces"] == 3 and "gave up after 2 retries" in row["status_reason"]
        assert len(smtp.received) == 3
        # A soft bounce never suppresses the address.
        assert await service.pool.fetchval("SELECT count(*) FROM suppressions") == 0
    finally:
        await producer.stop()
        await service.stop()
