"""The sender as separate processes on the real stack: caps and the global rate that
hold across replicas, deferral on throttling, suppression on a hard refusal,
exactly-once delivery through SIGKILLs, and a stopped enrollment's email that
never goes out."""

from __future__ import annotations

import asyncio
import collections
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from schemas import topics
from schemas.events import (
    EngagementReceived,
    EngagementType,
    LeadRouted,
    LeadSnapshot,
    RenderedMessage,
    StepDue,
)
from tests.e2e.conftest import DeploymentFactory
from tests.e2e.harness import Deployment
from tests.smtp_server import smtp_server

pytestmark = pytest.mark.e2e


def step_due(
    to_email: str, *, sequence: str = "outreach", due_at: datetime | None = None
) -> StepDue:
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
        due_at=due_at or datetime.now(UTC),
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
        server.reply("lost@example.org", "DROP")
        d = await deploy(
            clock_speed=1,
            services=("sender",),
            smtp=(server.host, server.port),
            extra_env={"SENDER_RETRY_BASE_SECONDS": "1"},
        )
        addresses = ("slow@example.org", "gone@example.org", "lost@example.org")
        await _publish_all(d, [step_due(address) for address in addresses])

        async def done() -> bool:
            counts = await _statuses(d)
            return counts["sent"] == 1 and counts["failed"] == 1 and counts["uncertain"] == 1

        await d.eventually(
            done, timeout=30, what="one sent after a deferral, one failed, one uncertain"
        )
        # The server kept the dropped message but its answer never came: flagged, never
        # sent again (nor through another transport).
        lost = (
            await d.fetch("SELECT * FROM sender.deliveries WHERE to_email = $1", "lost@example.org")
        )[0]
        assert "no answer after the end of the message" in lost["status_reason"]
        uncertain_events = [
            json.loads(r["payload"])
            for r in await d.fetch(
                "SELECT payload FROM sender.outbox WHERE event_type = 'EmailSent'"
            )
            if json.loads(r["payload"])["uncertain"]
        ]
        assert [e["to_email"] for e in uncertain_events] == ["lost@example.org"]
        assert sorted(r.rcpt_tos[0] for r in server.received) == [
            "lost@example.org",
            "slow@example.org",
        ]
        assert server.attempts["lost@example.org"] == 1
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
        assert server.attempts["lost@example.org"] == 1


async def _has(d: Deployment, status: str) -> bool:
    return bool((await _statuses(d))[status])


async def test_sigkill_during_2000_deliveries_sends_each_key_once_or_flags_it(
    deploy: DeploymentFactory,
) -> None:
    """At least five SIGKILLs, each while the sender is working through deliveries
    (sends recorded since the previous kill, deliveries claimed or sending right
    before it). Afterwards every delivery key reached the SMTP server exactly once,
    or is flagged uncertain (at most once at the server, and at most one per kill);
    no key is missing."""
    d = await deploy(clock_speed=1, services=("sender",))
    events = [step_due(f"r{i}@example.com") for i in range(2000)]
    publishing = asyncio.create_task(_publish_all(d, events))
    rng = random.Random(7)
    kills = 0
    sent_at_last_kill = 0
    while kills < 6:

        async def in_flight(last: int = sent_at_last_kill) -> collections.Counter[str] | None:
            counts = await _statuses(d)
            progressed = counts["sent"] > last
            busy = counts["claimed"] + counts["sending"] > 0
            return counts if progressed and busy else None

        try:
            await d.eventually(in_flight, timeout=60, interval=0.05, what="sends in flight")
        except AssertionError:
            break  # nothing left in flight: the deliveries are done
        await asyncio.sleep(rng.uniform(0.0, 0.15))
        counts = await _statuses(d)
        d.kill("sender")
        kills += 1
        sent_at_last_kill = counts["sent"]
        await d.restart("sender")
    await publishing
    assert kills >= 5, f"only {kills} kills landed while deliveries were in flight"

    async def finished() -> bool:
        counts = await _statuses(d)
        return counts["sent"] + counts["uncertain"] == len(events)

    await d.eventually(finished, timeout=240, interval=0.5, what="all 2000 deliveries finished")
    rows = await d.fetch("SELECT delivery_key, status, message_id FROM sender.deliveries")
    assert {r["delivery_key"] for r in rows} == {e.delivery_key for e in events}
    at_server = collections.Counter(m["Message-ID"] for m in d.mail())
    twice = [message_id for message_id, n in at_server.items() if n > 1]
    assert not twice, f"sent twice: {twice[:5]}"
    by_message_id = {r["message_id"]: r for r in rows}
    assert set(at_server) <= set(by_message_id), "the server got a message of no delivery"
    uncertain = [r for r in rows if r["status"] == "uncertain"]
    missing = [
        r["delivery_key"] for r in rows if r["status"] == "sent" and at_server[r["message_id"]] != 1
    ]
    assert not missing, f"recorded as sent, never reached the server: {missing[:5]}"
    assert len(uncertain) <= kills
    print(
        f"kills: {kills}; sent: {len(rows) - len(uncertain)}; uncertain: {len(uncertain)}"
        f" ({sum(at_server[r['message_id']] for r in uncertain)} of them at the server)"
    )


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


CLOCK_START = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)


async def test_hourly_cap_holds_across_two_sender_processes(deploy: DeploymentFactory) -> None:
    """A mailbox's hourly cap, counted in PostgreSQL: two processes, both sending (the
    server takes 200 ms a message, so neither drains the queue alone), together send
    no more than the cap allows in the hour; the rest waits for the next hour."""
    async with smtp_server() as (smtp, _):
        smtp.data_delay = 0.2
        d = await deploy(
            clock_speed=1,
            services=("sender",),
            smtp=(smtp.host, smtp.port),
            extra_env={
                "SENDER_DISPATCH_BATCH": "2",
                # Product time starts at 10:00 sharp: the test cannot straddle an hour.
                "TOUCHSTREAM_CLOCK_START": CLOCK_START.isoformat(),
            },
        )
        await d.start_replica("sender", "sender-2")
        await _mailbox(
            d,
            {
                "email": "ops@acme.example",
                "transports": [{"type": "smtp", "host": smtp.host, "port": smtp.port}],
                "hourly_cap": 6,
            },
        )
        due = CLOCK_START - timedelta(minutes=1)
        events = [step_due(f"p{i}@d{i}.example", due_at=due) for i in range(16)]
        await _publish_all(d, events)

        async def settled() -> bool:
            counts = await _statuses(d)
            return counts["sent"] + counts["deferred"] == len(events)

        await d.eventually(settled, timeout=60, what="every delivery sent or deferred")
        await asyncio.sleep(1)  # nothing more may go out
        counts = await _statuses(d)
        assert counts == {"sent": 6, "deferred": 10}, counts
        assert len(smtp.received) == 6
        deferred = await d.fetch(
            "SELECT status_reason, next_attempt_at FROM sender.deliveries WHERE status = 'deferred'"
        )
        assert {r["status_reason"] for r in deferred} == {
            "deferred: mailbox ops@acme.example reached its hourly cap of 6"
        }
        assert {r["next_attempt_at"] for r in deferred} == {CLOCK_START + timedelta(hours=1)}
        senders = await d.fetchval(
            "SELECT count(DISTINCT claimed_by) FROM sender.deliveries WHERE status = 'sent'"
        )
        assert senders == 2


async def test_global_rate_limits_hand_offs_per_second_across_two_processes(
    deploy: DeploymentFactory,
) -> None:
    """SENDER_GLOBAL_RATE counts hand-offs, not claims. The server stalls the first
    message for 1.5 s: the process that sent it still holds the rest of its claim
    when the next second's budget goes to the other process. Those held deliveries
    may not be handed off in a second that is not theirs (they go back to the
    queue), so no wall-clock second sees more hand-offs than the rate."""
    rate = 4
    async with smtp_server() as (smtp, _):
        smtp.data_delay = 0.05
        smtp.stall_next(1.5)
        d = await deploy(
            clock_speed=1,
            services=("sender",),
            smtp=(smtp.host, smtp.port),
            extra_env={"SENDER_GLOBAL_RATE": str(rate)},
        )
        await d.start_replica("sender", "sender-2")
        # Due in a few seconds: the whole queue is in place before the first claim.
        due = datetime.now(UTC) + timedelta(seconds=3)
        events = [step_due(f"g{i}@d{i % 5}.example", due_at=due) for i in range(24)]
        await _publish_all(d, events)
        await d.eventually(
            lambda: _count(d, "sent", len(events)), timeout=90, what="all deliveries sent"
        )
        per_second = {
            r["second"]: r["n"]
            for r in await d.fetch(
                "SELECT date_trunc('second', handed_off_at) AS second, count(*) AS n"
                " FROM sender.deliveries GROUP BY 1"
            )
        }
        assert None not in per_second
        assert max(per_second.values()) <= rate, sorted(per_second.items())
        assert sum(per_second.values()) == len(events)
        senders = await d.fetchval("SELECT count(DISTINCT claimed_by) FROM sender.deliveries")
        assert senders == 2
        # Seen from the server too: 24 messages at 4 a second take 5 seconds at least.
        arrivals = sorted(r.at for r in smtp.received)
        assert len(arrivals) == len(events)
        assert arrivals[-1] - arrivals[0] >= len(events) / rate - 1.5


async def _count(d: Deployment, status: str, expected: int) -> bool:
    return (await _statuses(d))[status] == expected


# ----------------------------------------------------------- stopped enrollments


async def test_a_stop_in_nurture_cancels_the_email_waiting_at_the_sender(
    deploy: DeploymentFactory,
) -> None:
    """A manual stop (nurture's API) and a colleague's reply (company stop) reach the
    sender: the emails it still holds for those enrollments are cancelled and never go
    out; another lead's held email stays; a sent one is left as it is."""
    async with smtp_server() as (smtp, _):
        for address in ("ann@acme.example", "bob@acme.example", "dee@other.example"):
            smtp.reply(address, "421 4.7.0 Try again later")
        d = await deploy(
            clock_speed=1,
            services=("nurture", "sender"),
            smtp=(smtp.host, smtp.port),
            extra_env={"SENDER_RETRY_BASE_SECONDS": "3600"},
        )
        steps = [
            {"key": "e1", "type": "email", "subject": "Hello", "text": "Hi {{ first_name }}"},
            {"key": "w1", "type": "wait", "days": 30},
            {"key": "e2", "type": "email", "subject": "Again", "text": "Hi again"},
        ]
        async with httpx.AsyncClient(base_url=d.url("nurture", ""), timeout=10) as client:
            created = await client.post(
                "/sequences",
                json={
                    "key": "accounts",
                    "name": "Accounts",
                    "settings": {"company_stop": True},
                    "steps": steps,
                },
            )
            assert created.status_code == 201, created.text
            activated = await client.post("/sequences/accounts/activate")
            assert activated.status_code == 200, activated.text
            leads: dict[str, LeadRouted] = {}
            for address in (
                "ann@acme.example",
                "bob@acme.example",
                "carl@acme.example",
                "dee@other.example",
            ):
                leads[address] = LeadRouted(
                    lead_id=uuid.uuid4(),
                    lead=LeadSnapshot(email=address, first_name=address.split("@")[0]),
                    sequence="accounts",
                    routing_reason="test",
                )
                event = leads[address]
                await d.publish(topics.LEAD_ROUTED, event.to_bytes(), event.kafka_key())

            async def held() -> bool:
                rows = await d.fetch("SELECT to_email, status FROM sender.deliveries")
                return {r["to_email"]: r["status"] for r in rows} == {
                    "ann@acme.example": "deferred",
                    "bob@acme.example": "deferred",
                    "carl@acme.example": "sent",
                    "dee@other.example": "deferred",
                }

            await d.eventually(held, timeout=60, what="three emails held, one sent")
            enrollments = {
                r["email"]: r
                for r in await d.fetch(
                    "SELECT id, sequence_id, lead->>'email' AS email FROM nurture.enrollments"
                )
            }
            # A user stops Ann's enrollment.
            stopped = await client.post(
                f"/enrollments/{enrollments['ann@acme.example']['id']}/stop",
                json={"reason": "asked us by phone"},
            )
            assert stopped.status_code == 200, stopped.text
        # Carl replies: his colleague Bob's enrollment stops too (company stop).
        carl = enrollments["carl@acme.example"]
        reply = EngagementReceived(
            engagement_type=EngagementType.REPLIED,
            lead_id=leads["carl@acme.example"].lead_id,
            enrollment_id=carl["id"],
            sequence_id=carl["sequence_id"],
            email="carl@acme.example",
            source="inbound",
        )
        await d.publish(topics.ENGAGEMENT, reply.to_bytes(), reply.kafka_key())

        async def cancelled() -> dict[str, Any] | None:
            rows = await d.fetch("SELECT to_email, status, status_reason FROM sender.deliveries")
            by_email = {r["to_email"]: r for r in rows}
            done = all(
                by_email[a]["status"] == "cancelled"
                for a in ("ann@acme.example", "bob@acme.example")
            )
            return by_email if done else None

        by_email = await d.eventually(cancelled, timeout=30, what="both held emails cancelled")
        assert by_email["ann@acme.example"]["status_reason"] == (
            "enrollment stopped: asked us by phone"
        )
        assert by_email["bob@acme.example"]["status_reason"] == (
            "enrollment stopped: company replied"
        )
        assert by_email["carl@acme.example"]["status"] == "sent"
        assert by_email["dee@other.example"]["status"] == "deferred"
        failed = [
            json.loads(r["payload"])
            for r in await d.fetch(
                "SELECT payload FROM sender.outbox WHERE event_type = 'EmailFailed'"
            )
        ]
        assert sorted((f["to_email"], f["failure"]) for f in failed) == [
            ("ann@acme.example", "cancelled"),
            ("bob@acme.example", "cancelled"),
        ]
        # Nothing for Ann or Bob ever reaches the server, even once it would accept them.
        await d.fetch(
            "UPDATE sender.deliveries SET next_attempt_at = now() WHERE status = 'deferred'"
        )
        await d.eventually(lambda: _count(d, "sent", 2), timeout=30, what="the other lead's email")
        await asyncio.sleep(1)
        assert sorted(r.rcpt_tos[0] for r in smtp.received) == [
            "carl@acme.example",
            "dee@other.example",
        ]
