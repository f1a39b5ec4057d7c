"""A custom sequence that thinks, end to end on the real stack: a condition on opens
branches, business-day waits and a send window shape when mail goes out, and an
action updates the lead."""

from __future__ import annotations

import asyncio
import email.utils
import re
from datetime import UTC, datetime, timedelta
from email.message import Message
from zoneinfo import ZoneInfo

import httpx
import pytest

from tests.e2e.conftest import DeploymentFactory
from tests.e2e.harness import Deployment

pytestmark = pytest.mark.e2e

LONDON = ZoneInfo("Europe/London")
BROWSER = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
#: Product time starts on Monday 23 November 2026, 07:00 in London (before opening).
START = "2026-11-23T07:00:00+00:00"

SEQUENCE = {
    "key": "smart_flow",
    "name": "Smart flow",
    "settings": {
        "send_window": {
            "timezone": "Europe/London",
            "start": "08:00",
            "end": "18:00",
            "weekdays": ["mon", "tue", "wed", "thu", "fri"],
            "holidays": "GB",
        },
    },
    "steps": [
        {
            "key": "e1",
            "type": "email",
            "subject": "Idea for {{ company }}",
            "html": "<p>Hi {{ first_name }}, have a look at "
            '<a href="https://example.com/guide">our guide</a>.</p>',
        },
        {"key": "w1", "type": "wait", "days": 2},
        {
            "key": "c1",
            "type": "condition",
            "condition": "if_opened",
            "step": "e1",
            "within_days": 2,
            "then": "e2a",
            "else": "e2b",
        },
        {
            "key": "e2a",
            "type": "email",
            "subject": "Glad you took a look",
            "text": "Hi {{ first_name }}, what did you think?",
            "next": "w2",
        },
        {
            "key": "e2b",
            "type": "email",
            "subject": "In case you missed it",
            "text": "Hi {{ first_name }}, resending the guide.",
        },
        {"key": "w2", "type": "wait", "business_days": 3},
        {"key": "e3", "type": "email", "subject": "Last note", "text": "Bye {{ first_name }}."},
        {"key": "a1", "type": "action", "action": "update_status", "status": "qualified"},
    ],
}


def _local(message: Message) -> datetime:
    return email.utils.parsedate_to_datetime(str(message["Date"])).astimezone(LONDON)


def _pixel(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/html":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found = re.search(r'<img src="([^"]+/t/o/[^"]+)"', payload.decode())
            assert found, "no open pixel"
            return found.group(1)
    raise AssertionError("no html part")


async def _completed(d: Deployment, count: int) -> bool:
    done = await d.fetchval("SELECT count(*) FROM nurture.enrollments WHERE status = 'completed'")
    return bool(done == count)


async def test_opener_and_non_opener_get_the_right_emails_inside_the_window(
    deploy: DeploymentFactory,
) -> None:
    # The product clock reaches Monday 07:00 a few seconds from now, once every process
    # is up; leads arrive on the Sunday before, outside the window.
    speed = 28800
    origin = datetime.now(UTC) + timedelta(seconds=15)
    d = await deploy(
        clock_speed=speed,
        extra_env={
            "TOUCHSTREAM_CLOCK_START": START,
            "TOUCHSTREAM_CLOCK_ORIGIN": origin.isoformat(),
        },
    )
    sunday_noon = origin - timedelta(hours=19) / speed
    await asyncio.sleep(max(0.0, (sunday_noon - datetime.now(UTC)).total_seconds()))
    async with httpx.AsyncClient() as client:
        created = await client.post(d.url("nurture", "/sequences"), json=SEQUENCE)
        assert created.status_code == 201, created.text
        activated = await client.post(d.url("nurture", "/sequences/smart_flow/activate"))
        assert activated.status_code == 200, activated.text
    # The router refuses leads for sequences its catalog does not have yet.
    await d.sequence_known("smart_flow")

    for address, name in (("opener@acme.example", "Olive"), ("quiet@globex.example", "Quinn")):
        await d.publish_lead(
            address, "smart_flow", first_name=name, company="Acme", timezone="Europe/London"
        )
    first = (
        await d.eventually(
            lambda: d.mail_to("opener@acme.example"), timeout=30, what="the opener's first email"
        )
    )[0]
    async with httpx.AsyncClient() as client:
        # A person's mail client (machine opens, e.g. privacy proxies, do not count).
        pixel = await client.get(_pixel(first), headers={"User-Agent": BROWSER})
    assert pixel.status_code == 200 and pixel.headers["content-type"] == "image/gif"

    await d.eventually(lambda: _completed(d, 2), timeout=90, what="both enrollments complete")

    opener = d.mail_to("opener@acme.example")
    quiet = d.mail_to("quiet@globex.example")
    assert [m["Subject"] for m in opener] == ["Idea for Acme", "Glad you took a look", "Last note"]
    assert [m["Subject"] for m in quiet] == ["Idea for Acme", "In case you missed it", "Last note"]

    for message in opener + quiet:
        at = _local(message)
        assert at.weekday() < 5, (message["Subject"], at)
        # Sent inside 08:00-18:00 (the sender hands off a moment after the decision).
        assert 8 <= at.hour < 18 or (at.hour == 18 and at.minute < 30), (message["Subject"], at)
    for mails in (opener, quiet):
        sent = [_local(m) for m in mails]
        # Monday: email 1 at the window's opening, not at 07:00 when it became due.
        assert sent[0].date() == datetime(2026, 11, 23).date() and sent[0].hour >= 8
        assert sent[1] - sent[0] >= timedelta(days=2) - timedelta(minutes=5)
        # Three business days after Wednesday: Monday.
        assert sent[2].weekday() == 0 and sent[2] - sent[1] >= timedelta(days=4, hours=20)

    for address in ("opener@acme.example", "quiet@globex.example"):
        lead = await d.eventually(
            lambda a=address: _qualified(d, a), timeout=20, what=f"{address} qualified"
        )
        assert lead["status"] == "qualified"
    log = await d.fetch(
        "SELECT l.decision, l.reason FROM nurture.execution_log l JOIN nurture.enrollments e"
        " ON e.id = l.enrollment_id WHERE e.lead->>'email' = 'opener@acme.example' ORDER BY l.id"
    )
    decisions = [r["decision"] for r in log]
    assert "deferred" in decisions  # email 1 waited for the window to open
    assert any(r["decision"] == "branch" and "if_opened is true" in r["reason"] for r in log)
    quiet_log = await d.fetch(
        "SELECT l.reason FROM nurture.execution_log l JOIN nurture.enrollments e"
        " ON e.id = l.enrollment_id WHERE e.lead->>'email' = 'quiet@globex.example'"
        " AND l.decision = 'branch'"
    )
    assert ["if_opened is false" in r["reason"] for r in quiet_log] == [True]


async def _qualified(d: Deployment, address: str) -> dict[str, object] | None:
    lead = await d.lead(address)
    return lead if lead is not None and lead["status"] == "qualified" else None
