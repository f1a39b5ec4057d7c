"""The sender's API and mailbox rules, in-process on the real stack: mailboxes CRUD
with secrets kept out of responses, the suppression list, dry-run switches, a lead
keeping its mailbox for the whole sequence, deferrals that never give up, rejections
classified from real SMTP replies, and a stopped enrollment cancelling what is
still queued."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from schemas import topics
from schemas.events import Event, RenderedMessage, StepDue
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


StartSender = Callable[..., Awaitable[SenderService]]


@pytest.fixture
async def start_sender(
    database_url: str, kafka_bootstrap: str, smtp: ScriptedSmtp
) -> AsyncIterator[StartSender]:
    """Start a sender in-process with the test's SMTP server and extra settings."""
    await create_topics(kafka_bootstrap, 2)
    started: list[SenderService] = []

    async def start(**settings: Any) -> SenderService:
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
                **settings,
            )
        )
        await service.start()
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
            await service.stop()


@pytest.fixture
async def sender(start_sender: StartSender) -> SenderService:
    return await start_sender()


@pytest.fixture
async def publish(kafka_bootstrap: str) -> AsyncIterator[Callable[[Event], Awaitable[None]]]:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()

    async def send(event: Event) -> None:
        topic = topics.STEP_DUE if event.event_type != "EngagementReceived" else topics.ENGAGEMENT
        await producer.send_and_wait(topic, event.to_bytes(), key=event.kafka_key())

    try:
        yield send
    finally:
        await producer.stop()


def step_due(
    to_email: str,
    *,
    lead_id: uuid.UUID | None = None,
    enrollment_id: uuid.UUID | None = None,
    step_index: int = 0,
) -> StepDue:
    enrollment = enrollment_id or uuid.uuid4()
    return StepDue(
        lead_id=lead_id or uuid.uuid4(),
        enrollment_id=enrollment,
        sequence_id=uuid.uuid4(),
        sequence_key="s",
        sequence_version=1,
        step_id=uuid.uuid4(),
        step_index=step_index,
        delivery_key=f"{enrollment}:{step_index}",
        due_at=datetime.now(UTC),
        message=RenderedMessage(to_email=to_email, subject=f"Step {step_index}", text="Hello"),
    )


async def eventually(check: Callable[[], Awaitable[Any]], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def delivery(service: SenderService, to_email: str) -> Any:
    return await service.pool.fetchrow(
        "SELECT * FROM deliveries WHERE to_email = $1 ORDER BY created_at", to_email
    )


async def failed_events(service: SenderService) -> dict[str, dict[str, Any]]:
    rows = await service.pool.fetch(
        "SELECT payload FROM outbox WHERE event_type = 'EmailFailed' ORDER BY id"
    )
    events = [json.loads(r["payload"]) for r in rows]
    return {e["to_email"]: e for e in events}


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
    start_sender: StartSender, kafka_bootstrap: str, smtp: ScriptedSmtp
) -> None:
    from schemas.events import BounceType, EngagementReceived, EngagementType

    service = await start_sender(soft_bounce_retries=2, soft_bounce_retry_seconds=0.2)
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


# ------------------------------------------------------------------ deferrals


async def test_a_throttled_delivery_is_deferred_again_and_again_never_dropped(
    start_sender: StartSender, smtp: ScriptedSmtp, publish: Callable[[Event], Awaitable[None]]
) -> None:
    """Twelve throttles in a row (more than the old give-up after 8): each one defers
    the delivery with a capped backoff, visible on /deliveries, and the message goes
    out once the server takes it."""
    service = await start_sender(retry_base_seconds=0.05, retry_max_seconds=0.2)
    smtp.reply("busy@example.org", *["421 4.7.0 Try again later"] * 12)
    due = step_due("busy@example.org")
    await publish(due)
    url = f"http://127.0.0.1:{service.settings.http_port}"
    seen_deferred: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:

        async def sent() -> bool:
            items = (await client.get("/deliveries")).json()["items"]
            if items and items[0]["status"] == "deferred":
                seen_deferred.append(items[0])
            return bool(items) and items[0]["status"] == "sent"

        await eventually(sent, "the delivery after twelve throttles")
        item = (await client.get("/deliveries")).json()["items"][0]

    assert len(smtp.received) == 1 and smtp.attempts["busy@example.org"] == 13
    assert (item["attempts"], item["deferrals"]) == (13, 12)
    assert "421" in item["last_error"] and item["status_reason"] is None
    assert seen_deferred, "the deferral was never visible"
    shown = seen_deferred[-1]
    assert shown["status_reason"].startswith("deferred: smtp#0: 421")
    assert shown["next_attempt_at"] is not None and shown["attempts"] >= 1
    assert "Try again later" in shown["last_error"]
    assert await failed_events(service) == {}


async def test_an_explicit_give_up_is_a_soft_failure_that_never_suppresses(
    start_sender: StartSender, smtp: ScriptedSmtp, publish: Callable[[Event], Awaitable[None]]
) -> None:
    service = await start_sender(retry_base_seconds=0.05, retry_max_seconds=0.1, max_attempts=3)
    smtp.reply("busy@example.org", *["451 4.3.0 Local error"] * 10)
    await publish(step_due("busy@example.org"))

    async def failed() -> Any:
        row = await delivery(service, "busy@example.org")
        return row if row is not None and row["status"] == "failed" else None

    row = await eventually(failed, "the give-up")
    assert row["attempts"] == 3 and smtp.attempts["busy@example.org"] == 3
    assert "gave up after 3 attempts (SENDER_MAX_ATTEMPTS)" in row["status_reason"]
    assert row["bounce_type"] == "soft"
    event = (await failed_events(service))["busy@example.org"]
    assert (event["failure"], event["bounce_type"], event["smtp_code"]) == (
        "permanent",
        "soft",
        451,
    )
    assert await service.pool.fetchval("SELECT count(*) FROM suppressions") == 0


# ------------------------------------------------------------- classification


REJECTIONS = {
    # address: (stage, reply, bounce type, enhanced status, suppressed)
    "hard@example.org": (
        "rcpt",
        "550 5.1.1 <hard@example.org>: Recipient address rejected: User unknown",
        "hard",
        "5.1.1",
    ),
    "gone@example.org": ("rcpt", "550 No such user here", "hard", None),
    "spam@example.org": ("data", "550 5.7.1 Message rejected as spam", "policy", "5.7.1"),
    "dmarc@example.org": (
        "data",
        "550 5.7.26 Unauthenticated email from acme.example is not accepted due to"
        " domain's DMARC policy",
        "policy",
        "5.7.26",
    ),
    "blocked@example.org": (
        "rcpt",
        "554 Service unavailable; Client host blocked using zen.spamhaus.org",
        "policy",
        None,
    ),
    "full@example.org": ("data", "552 5.2.2 Mailbox full", "soft", "5.2.2"),
}


async def test_rejections_are_classified_and_only_hard_ones_suppress(
    sender: SenderService, smtp: ScriptedSmtp, publish: Callable[[Event], Awaitable[None]]
) -> None:
    for address, (stage, reply, _kind, _status) in REJECTIONS.items():
        (smtp.reply_rcpt if stage == "rcpt" else smtp.reply)(address, reply)
        await publish(step_due(address))

    async def all_failed() -> bool:
        rows = await sender.pool.fetch("SELECT status FROM deliveries WHERE status = 'failed'")
        return len(rows) == len(REJECTIONS)

    await eventually(all_failed, "every delivery failed")
    url = f"http://127.0.0.1:{sender.settings.http_port}"
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        items = {i["to_email"]: i for i in (await client.get("/deliveries")).json()["items"]}
        suppressed = {s["email"] for s in (await client.get("/suppressions")).json()["items"]}
    events = await failed_events(sender)
    for address, (stage, reply, kind, status) in REJECTIONS.items():
        item, event = items[address], events[address]
        assert (item["bounce_type"], item["enhanced_status"]) == (kind, status), address
        assert item["smtp_code"] == int(reply[:3])
        assert (event["failure"], event["bounce_type"]) == ("permanent", kind), address
        assert (event["enhanced_status"], event["smtp_code"]) == (status, int(reply[:3]))
        # Refused at RCPT: the message itself never left, so it never was "sending".
        assert (item["handed_off_at"] is None) is (stage == "rcpt"), address
    assert suppressed == {"hard@example.org", "gone@example.org"}
    assert smtp.received == []
    assert smtp.attempts["hard@example.org"] == 0 and smtp.attempts["spam@example.org"] == 1


# ----------------------------------------------------------- stopped enrollments


async def test_a_stopped_enrollment_cancels_what_is_not_handed_off(
    sender: SenderService, smtp: ScriptedSmtp, publish: Callable[[Event], Awaitable[None]]
) -> None:
    from schemas.events import EnrollmentStopped

    lead, enrollment, other = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    first = step_due("pat@example.org", lead_id=lead, enrollment_id=enrollment)
    await publish(first)
    await eventually(lambda: _status_is(sender, first.delivery_key, "sent"), "the first email")
    # The follow-up is throttled (deferred for a minute); another enrollment of the
    # same lead is throttled too.
    smtp.reply("pat@example.org", "421 4.7.0 Try again later", "421 4.7.0 Try again later")
    follow_up = step_due("pat@example.org", lead_id=lead, enrollment_id=enrollment, step_index=1)
    elsewhere = step_due("pat@example.org", lead_id=lead, enrollment_id=other)
    await publish(follow_up)
    await publish(elsewhere)
    for due in (follow_up, elsewhere):
        await eventually(lambda d=due: _status_is(sender, d.delivery_key, "deferred"), "deferral")

    stopped = EnrollmentStopped(lead_id=lead, enrollment_id=enrollment, reason="stopped by a user")
    await publish(stopped)
    await eventually(
        lambda: _status_is(sender, follow_up.delivery_key, "cancelled"), "the cancellation"
    )
    row = await sender.pool.fetchrow(
        "SELECT status_reason FROM deliveries WHERE delivery_key = $1", follow_up.delivery_key
    )
    assert row["status_reason"] == "enrollment stopped: stopped by a user"
    assert await _status_is(sender, first.delivery_key, "sent")  # handed off: left as it is
    assert await _status_is(sender, elsewhere.delivery_key, "deferred")  # another enrollment
    cancelled = [
        json.loads(r["payload"])
        for r in await sender.pool.fetch(
            "SELECT payload FROM outbox WHERE event_type = 'EmailFailed'"
        )
    ]
    assert [(e["delivery_key"], e["failure"]) for e in cancelled] == [
        (follow_up.delivery_key, "cancelled")
    ]
    # A redelivered StepDue does not bring the cancelled delivery back.
    await publish(follow_up)
    await asyncio.sleep(1.0)
    assert await _status_is(sender, follow_up.delivery_key, "cancelled")
    assert len(smtp.received) == 1


async def test_a_claimed_delivery_cancelled_before_its_hand_off_is_not_sent(
    sender: SenderService,
) -> None:
    """The dispatcher holds claimed deliveries in memory before handing them off; a
    stop in between wins: the claim can no longer be marked sending."""
    from schemas.events import EnrollmentStopped
    from services.sender import handlers, repo
    from services.sender.ledger import Mark

    # Due tomorrow: the service's own dispatcher leaves it alone; this test claims it.
    due = step_due("lee@example.org").model_copy(
        update={"due_at": datetime.now(UTC) + timedelta(days=1)}
    )
    stop = EnrollmentStopped(lead_id=due.lead_id, enrollment_id=due.enrollment_id, reason="x")
    pool = sender.pool
    async with pool.acquire() as conn, conn.transaction():
        await handlers.handle_step_due(conn, [due])
        claimed = await repo.claim_ready(conn, due.due_at, 10, 30.0, "me")
    assert [r["delivery_key"] for r in claimed] == [due.delivery_key]
    async with pool.acquire() as conn, conn.transaction():
        await handlers.handle_step_due(conn, [stop])
    marked = await sender.ledger.mark_sending(
        Mark(due.delivery_key, "me", 30.0, "<m@example.org>", "a@example.org", None, 1),
        after=None,
    )
    assert marked is False
    assert await repo.release_claims(pool, [due.delivery_key], "me") == 0
    row = await pool.fetchrow("SELECT status, claimed_by FROM deliveries")
    assert (row["status"], row["claimed_by"]) == ("cancelled", None)


async def test_a_stop_in_the_same_batch_as_its_step_due_applies_in_order(
    sender: SenderService,
) -> None:
    """One consumer batch can hold a StepDue and the EnrollmentStopped after it: they
    apply in the topic's order, so the delivery is created, then cancelled; a StepDue
    of another enrollment after the stop is queued."""
    from schemas.events import EnrollmentStopped
    from services.sender import handlers

    later = datetime.now(UTC) + timedelta(days=1)
    due = step_due("kim@example.org").model_copy(update={"due_at": later})
    other = step_due("kim@example.org", lead_id=due.lead_id).model_copy(update={"due_at": later})
    stop = EnrollmentStopped(lead_id=due.lead_id, enrollment_id=due.enrollment_id, reason="y")
    async with sender.pool.acquire() as conn, conn.transaction():
        await handlers.handle_step_due(conn, [due, stop, other])
    statuses = {
        r["delivery_key"]: r["status"]
        for r in await sender.pool.fetch("SELECT delivery_key, status FROM deliveries")
    }
    assert statuses == {due.delivery_key: "cancelled", other.delivery_key: "queued"}


async def _status_is(service: SenderService, key: str, status: str) -> bool:
    current = await service.pool.fetchval(
        "SELECT status FROM deliveries WHERE delivery_key = $1", key
    )
    return bool(current == status)


async def _claim(sender: SenderService, *emails: str) -> list[str]:
    """Deliveries due tomorrow (the dispatcher leaves them alone), claimed by "me"."""
    from services.sender import handlers, repo

    later = datetime.now(UTC) + timedelta(days=1)
    dues = [step_due(e).model_copy(update={"due_at": later}) for e in emails]
    async with sender.pool.acquire() as conn, conn.transaction():
        await handlers.handle_step_due(conn, dues)
        claimed = await repo.claim_ready(conn, later, 100, 30.0, "me")
    return sorted(r["delivery_key"] for r in claimed)


async def test_lanes_marks_asked_for_together_go_in_one_statement(sender: SenderService) -> None:
    from services.sender.ledger import Mark

    *keys, other = await _claim(
        sender, "a@example.org", "b@example.org", "c@example.org", "o@example.org"
    )
    ledger = sender.ledger
    before = ledger.marks.statements
    answers = await asyncio.gather(
        *(
            ledger.mark_sending(
                Mark(k, "me", 30.0, f"<{k}@x>", "s@example.com", None, 1), after=None
            )
            for k in keys
        ),
        # Not claimed by this sender: refused, in the same statement.
        ledger.mark_sending(
            Mark(other, "someone-else", 30.0, "<z@x>", "s@example.com", None, 1), after=None
        ),
    )
    assert answers == [True, True, True, False]
    assert ledger.marks.statements == before + 1
    rows = await sender.pool.fetch("SELECT delivery_key, status, message_id FROM deliveries")
    assert {(r["delivery_key"], r["status"], r["message_id"]) for r in rows} == {
        *((k, "sending", f"<{k}@x>") for k in keys),
        (other, "claimed", None),
    }


async def test_the_ledger_plans_once_and_by_index_even_when_planned_on_an_empty_table(
    sender: SenderService,
) -> None:
    """The ledger's statements are planned once per connection (not at every call)
    and the plans look deliveries up by key: one made while the table was empty still
    does once it has grown. The service's other sessions keep PostgreSQL's defaults."""
    from services.sender.ledger import MARK, RECORD

    statements = {RECORD: 15, MARK: 8}
    assert await sender.pool.fetchval("SELECT count(*) FROM deliveries") == 0
    async with sender.ledger.records.pool.acquire() as conn:
        assert await conn.fetchval("SHOW search_path") == "sender"
        prepared = [await conn.prepare(sql) for sql in statements]  # kept, not closed
        for statement, (sql, count) in zip(prepared, statements.items(), strict=True):
            for _ in range(7):  # past the five custom plans PostgreSQL tries first
                await statement.fetch(*([[]] * count))
            plans = await conn.fetchrow(
                "SELECT generic_plans, custom_plans FROM pg_prepared_statements"
                " WHERE statement = $1",
                sql,
            )
            assert plans is not None
            assert (plans["custom_plans"], plans["generic_plans"]) == (0, 7)
        # The plans above were made on an empty table; they stay cached as it grows.
        await _claim(sender, *(f"grow{n}@example.org" for n in range(300)))
        for sql, count in statements.items():
            name = await conn.fetchval(
                "SELECT name FROM pg_prepared_statements WHERE statement = $1", sql
            )
            empty = ", ".join(["'{}'"] * count)
            text = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN EXECUTE {name}({empty})"))
            assert "Index Scan using deliveries_pkey on deliveries" in text, text
            assert "Seq Scan on deliveries" not in text, text
    assert await sender.pool.fetchval("SHOW plan_cache_mode") == "auto"
    assert await sender.pool.fetchval("SHOW enable_seqscan") == "on"


async def test_a_mark_waits_for_its_lanes_previous_record_and_fails_with_it(
    sender: SenderService,
) -> None:
    """A lane's mark is committed only after its previous hand-off's record: never
    two deliveries of one lane handed off and unrecorded. A record that could not be
    written stops the lane's next hand-off."""
    from services.sender.ledger import Mark

    first, second = await _claim(sender, "d@example.org", "e@example.org")
    ledger = sender.ledger
    previous: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    mark = ledger.mark_sending(
        Mark(second, "me", 30.0, "<2@x>", "s@example.com", None, 1), after=previous
    )
    waiting = asyncio.ensure_future(mark)
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert (
        await sender.pool.fetchval("SELECT status FROM deliveries WHERE delivery_key = $1", second)
        == "claimed"
    )
    previous.set_result(None)
    assert await waiting is True

    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    failed.set_exception(RuntimeError("record failed"))
    with pytest.raises(RuntimeError):
        await ledger.mark_sending(
            Mark(first, "me", 30.0, "<1@x>", "s@example.com", None, 1), after=failed
        )
    assert (
        await sender.pool.fetchval("SELECT status FROM deliveries WHERE delivery_key = $1", first)
        == "claimed"
    )


async def test_records_asked_for_together_go_in_one_statement_with_their_events(
    sender: SenderService,
) -> None:
    from services.sender.ledger import SentRecord

    keys = await _claim(sender, "f@example.org", "g@example.org")
    ledger = sender.ledger
    before = ledger.records.statements
    ids = [uuid.uuid4() for _ in keys]
    await asyncio.gather(
        *(
            ledger.record_sent(
                SentRecord(
                    key,
                    smtp_code=250,
                    smtp_response="2.0.0 queued",
                    sent_at=datetime.now(UTC),
                    links=["https://example.com/a"],
                    transport="smtp",
                    provider_message_id=None,
                    message_id=f"<{key}@x>",
                    from_email="s@example.com",
                    from_name="Sam",
                    outbox_row=(topics.EMAIL_SENT, key.encode(), b"{}", event_id, "EmailSent"),
                )
            )
            for key, event_id in zip(keys, ids, strict=True)
        )
    )
    assert ledger.records.statements == before + 1
    rows = await sender.pool.fetch(
        "SELECT delivery_key, status, links FROM deliveries ORDER BY delivery_key"
    )
    assert [(r["delivery_key"], r["status"], r["links"]) for r in rows] == [
        (k, "sent", ["https://example.com/a"]) for k in keys
    ]
    events = await sender.pool.fetch(
        "SELECT event_id, kafka_key FROM outbox WHERE event_type = 'EmailSent' ORDER BY id"
    )
    assert {(e["event_id"], e["kafka_key"]) for e in events} == {
        (i, k.encode()) for k, i in zip(keys, ids, strict=True)
    }


async def _publish_at_once(
    db: asyncpg.Pool | asyncpg.Connection,
    publish: Callable[[Event], Awaitable[None]],
    dues: list[StepDue],
) -> None:
    """Queue ``dues`` for tomorrow, then make them all due at once: the dispatcher
    finds every one of them in its first claim, however long the queueing took."""
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    for due in dues:
        await publish(due.model_copy(update={"due_at": tomorrow}))
    keys = [due.delivery_key for due in dues]

    async def queued() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM sender.deliveries WHERE delivery_key = ANY($1::text[])", keys
        )
        return bool(count == len(keys))

    await eventually(queued, "the deliveries queued")
    await db.execute(
        "UPDATE sender.deliveries SET next_attempt_at = clock_timestamp()"
        " WHERE delivery_key = ANY($1::text[])",
        keys,
    )


async def test_a_slow_message_holds_up_its_lane_only_not_the_batchs_other_jobs(
    start_sender: StartSender, smtp: ScriptedSmtp, publish: Callable[[Event], Awaitable[None]]
) -> None:
    """The lanes take a claimed batch's jobs from one queue: while one lane waits on a
    slow server reply, the other lane sends the rest of the batch."""
    sender = await start_sender(concurrency=2, dispatch_batch=50)
    smtp.stall_next(2.0)
    # Due together a moment from now, so that the dispatcher claims them in one batch.
    dues = [step_due(f"lane{i}@example.org") for i in range(20)]
    await _publish_at_once(sender.pool, publish, dues)

    async def all_accepted() -> bool:
        return len(smtp.received) == len(dues)

    await eventually(all_accepted, "every message accepted")
    times = sorted(r.at for r in smtp.received)
    # The stalled message is accepted two seconds after the first, and with it the
    # one job its lane had prepared meanwhile (to pipeline its envelope); every other
    # job went out on the other lane (split in halves, ten would have waited).
    late = [t - times[0] for t in times if t - times[0] >= 1.5]
    assert len(late) == 2, " ".join(f"{t - times[0]:.3f}" for t in times)


async def test_the_next_batch_is_claimed_while_the_lanes_send_and_given_back_on_stop(
    start_sender: StartSender,
    smtp: ScriptedSmtp,
    publish: Callable[[Event], Awaitable[None]],
    database_url: str,
) -> None:
    """Once a full batch's last job is taken, the next batch is claimed while the
    lanes still send: they find it ready. A batch claimed ahead and not started when
    the sender stops goes straight back to the queue, uncounted under its caps."""
    sender = await start_sender(concurrency=2, dispatch_batch=10, daily_cap=1000)
    pg = await asyncpg.connect(database_url)
    smtp.stall_next(4.0)
    await _publish_at_once(pg, publish, [step_due(f"ahead{i}@example.org") for i in range(25)])

    async def counts() -> dict[str, int]:
        rows = await pg.fetch("SELECT status, count(*) AS n FROM sender.deliveries GROUP BY 1")
        return {r["status"]: r["n"] for r in rows}

    async def claimed_ahead() -> dict[str, int] | None:
        now = await counts()
        # One lane's message is stalled at the server; the other lane sent the rest of
        # the first batch, and the second batch is claimed (nothing of it queued).
        return now if now.get("sending") == 1 and now.get("queued") == 5 else None

    seen = await eventually(claimed_ahead, "the second batch claimed ahead", timeout=15)
    # The first batch: 8 sent and 2 on the stalled lane (its message and the next it
    # prepared); the second batch: 10 claimed.
    assert seen == {"sent": 8, "sending": 1, "claimed": 11, "queued": 5}, seen
    await sender.stop()
    after = await counts()
    # The stalled lane finished its message; what it had prepared, and the batch
    # claimed ahead, went back to the queue (no lease to wait out).
    # What the claims counted under the daily cap is taken back for what went back:
    # the counter holds the 9 sent.
    counted = await pg.fetchval("SELECT sum(count) FROM sender.send_counters")
    await pg.close()
    assert after == {"sent": 9, "queued": 16}, after
    assert counted == 9
