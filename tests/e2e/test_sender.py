"""The sender as separate processes on the real stack: caps that hold across
replicas, deferral on throttling, suppression on a hard refusal, and exactly-once
delivery through SIGKILLs."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from schemas import topics
from schemas.events import RenderedMessage, StepDue
from tests.e2e.conftest import DeploymentFactory
from tests.e2e.harness import Deployment
from tests.smtp_server import smtp_server

pytestmark = pytest.mark.e2e


def step_due(to_email: str, *, sequence: str = "outreach") -> StepDue:
    enrollment = uuid.uuid4()
    return StepDue(
        lead_id=uuid.uuid4(),
        enrollment_id=enrollment,
        sequence_id=uuid.uuid4(),
        sequence_key=sequence,
        sequence_version=1,
        step_id=uuid.uuid4(),
        step_index=0,
        delivery_key=f"{enrollment}:0",
        due_at=datetime.now(UTC),
        message=RenderedMessage(
            to_email=to_email, to_name="Pat", subject="Hello", text="Hi Pat,\n\nA short note.\n"
        ),
    )


async def _publish_all(d: Deployment, events: list[StepDue]) -> None:
    for event in events:
        await d.publish(topics.STEP_DUE, event.to_bytes(), event.kafka_key())


async def _statuses(d: Deployment) -> collections.Counter[str]:
    rows = await d.fetch("SELECT status FROM sender.deliveries")
    return collections.Counter(r["status"] for r in rows)


async def test_caps_hold_across_two_sender_processes(deploy: DeploymentFactory) -> None:
    d = await deploy(clock_speed=1, services=("sender",), extra_env={"SENDER_DISPATCH_BATCH": "4"})
    await d.start_replica("sender", "sender-2")
    host, port = d.env["SMTP_HOST"], int(d.env["SMTP_PORT"])
    async with httpx.AsyncClient() as client:
        created = await client.post(
            d.url("sender", "/mailboxes"),
            json={
                "email": "sales@acme.example",
                "display_name": "Acme Sales",
                "transports": [{"type": "smtp", "host": host, "port": port}],
                "daily_cap": 12,
                "domain_hourly_cap": 3,
            },
        )
        assert created.status_code == 201, created.text
    events = [step_due(f"p{i}@big.example") for i in range(10)]
    events += [step_due(f"p{i}@d{i}.example") for i in range(20)]
    random.shuffle(events)
    await _publish_all(d, events)

    async def settled() -> bool:
        counts = await _statuses(d)
        return counts["sent"] + counts["deferred"] == len(events)

    await d.eventually(settled, timeout=60, what="every delivery sent or deferred")
    await asyncio.sleep(1)  # nothing more may go out
    counts = await _statuses(d)
    assert counts == {"sent": 12, "deferred": 18}, counts
    mail = d.mail()
    assert len(mail) == 12
    to_big = [m for m in mail if "big.example" in str(m["To"])]
    assert len(to_big) == 3
    assert {str(m["From"]) for m in mail} == {"Acme Sales <sales@acme.example>"}
    reasons = {
        r["status_reason"]
        for r in await d.fetch(
            "SELECT status_reason FROM sender.deliveries WHERE status = 'deferred'"
        )
    }
    assert any("daily cap of 12" in (r or "") for r in reasons)
    assert any("cap of 3 an hour to big.example" in (r or "") for r in reasons)
    # Both processes did the work: the deliveries were claimed by two instances.
    senders = await d.fetchval(
        "SELECT count(DISTINCT claimed_by) FROM sender.deliveries WHERE status = 'sent'"
    )
    assert senders == 2
    deferred = (await d.get("sender", "/deliveries", status="deferred"))["items"]
    assert len(deferred) == 18 and all(i["deferrals"] == 1 for i in deferred)


async def test_throttle_defers_then_delivers_once_and_a_hard_refusal_suppresses(
    deploy: DeploymentFactory,
) -> None:
    async with smtp_server() as (server, _):
        server.reply("slow@example.org", "421 4.7.0 Try again later")
        server.reply("gone@example.org", "550 5.1.1 No such user")
        d = await deploy(
            clock_speed=1,
            services=("sender",),
            smtp=(server.host, server.port),
            extra_env={"SENDER_RETRY_BASE_SECONDS": "1"},
        )
        await _publish_all(d, [step_due("slow@example.org"), step_due("gone@example.org")])

        async def done() -> bool:
            counts = await _statuses(d)
            return counts["sent"] == 1 and counts["failed"] == 1

        await d.eventually(done, timeout=30, what="one sent after a deferral, one failed")
        assert [r.rcpt_tos for r in server.received] == [["slow@example.org"]]
        assert server.attempts["slow@example.org"] == 2
        slow = (
            await d.fetch("SELECT * FROM sender.deliveries WHERE to_email = $1", "slow@example.org")
        )[0]
        assert slow["attempts"] == 2 and slow["status"] == "sent"
        gone = (
            await d.fetch("SELECT * FROM sender.deliveries WHERE to_email = $1", "gone@example.org")
        )[0]
        assert gone["smtp_code"] == 550 and "No such user" in gone["status_reason"]
        suppressed = await d.get("sender", "/suppressions")
        assert [s["email"] for s in suppressed["items"]] == ["gone@example.org"]
        failed = [
            json.loads(r["payload"])
            for r in await d.fetch(
                "SELECT payload FROM sender.outbox WHERE event_type = 'EmailFailed'"
            )
        ]
        assert [(f["failure"], f["smtp_code"]) for f in failed] == [("permanent", 550)]

        # The address stays suppressed: a later step to it is never handed off.
        await _publish_all(d, [step_due("gone@example.org")])
        await d.eventually(lambda: _has(d, "suppressed"), what="the suppressed delivery")
        assert server.attempts["gone@example.org"] == 1


async def _has(d: Deployment, status: str) -> bool:
    return bool((await _statuses(d))[status])


async def test_sigkill_during_2000_deliveries_sends_each_key_once_or_flags_it(
    deploy: DeploymentFactory,
) -> None:
    d = await deploy(clock_speed=1, services=("sender",))
    events = [step_due(f"r{i}@example.com") for i in range(2000)]
    publishing = asyncio.create_task(_publish_all(d, events))
    kills = 0
    rng = random.Random(7)
    while kills < 6:
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        if (await _statuses(d))["sent"] >= 1900:
            break
        d.kill("sender")
        kills += 1
        await d.restart("sender")
    await publishing

    async def finished() -> bool:
        counts = await _statuses(d)
        return counts["sent"] + counts["uncertain"] == len(events)

    await d.eventually(finished, timeout=240, interval=0.5, what="all 2000 deliveries finished")
    counts = await _statuses(d)
    ids = [m["Message-ID"] for m in d.mail()]
    assert len(ids) == len(set(ids)), "a delivery key was sent twice"
    sent = {
        r["message_id"]
        for r in await d.fetch("SELECT message_id FROM sender.deliveries WHERE status = 'sent'")
    }
    assert sent <= set(ids), "a delivery recorded as sent never reached the server"
    assert counts["uncertain"] <= kills
    print(f"kills: {kills}; deliveries: {dict(counts)}; at the server: {len(ids)}")


async def _mailbox(d: Deployment, body: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as client:
        created = await client.post(d.url("sender", "/mailboxes"), json=body)
        assert created.status_code == 201, created.text


async def test_failover_from_smtp_to_an_http_provider_delivers_once(
    deploy: DeploymentFactory,
) -> None:
    from tests.providers import provider_server

    async with smtp_server() as (smtp, _), provider_server("sendgrid") as sendgrid:
        smtp.reply("*", "421 4.3.2 Service not available, closing channel")
        d = await deploy(clock_speed=1, services=("sender",))
        await _mailbox(
            d,
            {
                "email": "team@acme.example",
                "transports": [
                    {"type": "smtp", "host": smtp.host, "port": smtp.port},
                    {
                        "type": "sendgrid",
                        "api_key": sendgrid.api_key,
                        "base_url": sendgrid.base_url,
                    },
                ],
            },
        )
        await _publish_all(d, [step_due("lee@example.net")])
        await d.eventually(lambda: _has(d, "sent"), timeout=30, what="the delivery")
        row = (await d.fetch("SELECT * FROM sender.deliveries"))[0]
        assert row["transport"] == "sendgrid#1" and row["attempts"] == 1
        assert row["provider_message_id"]
        assert smtp.received == [] and smtp.attempts["lee@example.net"] == 1
        assert len(sendgrid.received) == 1
        await asyncio.sleep(1)
        assert len(sendgrid.received) == 1  # once


async def test_dry_run_builds_and_records_but_hands_nothing_off(
    deploy: DeploymentFactory,
) -> None:
    d = await deploy(clock_speed=1, services=("sender",))
    async with httpx.AsyncClient() as client:
        response = await client.put(d.url("sender", "/dry-run"), json={"sequence": "trial"})
        assert response.json()["sequences"] == ["trial"]
    await _publish_all(
        d,
        [
            step_due("a@example.com", sequence="trial"),
            step_due("b@example.com", sequence="outreach"),
        ],
    )

    async def settled() -> bool:
        counts = await _statuses(d)
        return counts["dry_run"] == 1 and counts["sent"] == 1

    await d.eventually(settled, timeout=30, what="one dry run, one real send")
    assert [str(m["To"]) for m in d.mail()] == ["Pat <b@example.com>"]
    events = [
        json.loads(r["payload"])
        for r in await d.fetch(
            "SELECT payload FROM sender.outbox WHERE event_type = 'EmailSent' ORDER BY id"
        )
    ]
    assert sorted(e["dry_run"] for e in events) == [False, True]
    dry = next(e for e in events if e["dry_run"])
    assert dry["to_email"] == "a@example.com" and dry["message_id"].startswith("<")
