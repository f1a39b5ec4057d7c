"""Engagement you can believe, end to end: an out-of-office pauses a sequence until
its return date, a hard-bounce DSN stops one and invalidates the lead, and the
analytics count it all."""

from __future__ import annotations

import email.utils
import uuid
from datetime import timedelta
from email.message import Message
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import DeploymentFactory
from tests.e2e.harness import Deployment

pytestmark = pytest.mark.e2e

SPEED = 43200  # half a day per second


def _date(message: Message) -> email.utils.datetime.datetime:
    return email.utils.parsedate_to_datetime(str(message["Date"]))


def out_of_office(message: Message, back: str) -> bytes:
    return (
        f"From: {message['To']}\r\nTo: {message['From']}\r\n"
        f"Subject: Automatic reply: {message['Subject']}\r\n"
        f"Message-ID: <{uuid.uuid4()}@mail.example.org>\r\n"
        "Auto-Submitted: auto-replied\r\nX-Auto-Response-Suppress: All\r\n"
        f"In-Reply-To: {message['Message-ID']}\r\nReferences: {message['Message-ID']}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
        f"Thank you for your message. I am out of the office, returning {back}.\r\n"
    ).encode()


def hard_bounce(message: Message) -> bytes:
    recipient = email.utils.parseaddr(str(message["To"]))[1]
    boundary = "bounce-boundary"
    return (
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.net>\r\n"
        f"To: {message['From']}\r\nSubject: Undelivered Mail Returned to Sender\r\n"
        f"Message-ID: <{uuid.uuid4()}@mx.example.net>\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"'
        "\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/plain\r\n\r\n"
        "I'm sorry to have to inform you that your message could not be delivered.\r\n\r\n"
        f"--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {recipient}\r\nAction: failed\r\nStatus: 5.1.1\r\n"
        "Remote-MTA: dns; mail.example.org\r\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{recipient}>: Recipient address rejected: "
        "User unknown\r\n\r\n"
        f"--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        f"From: {message['From']}\r\nTo: {message['To']}\r\nSubject: {message['Subject']}\r\n"
        f"Message-ID: {message['Message-ID']}\r\n\r\n"
        f"--{boundary}--\r\n"
    ).encode()


async def _post_inbound(d: Deployment, raw: bytes) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            d.url("tracker", "/webhooks/inbound"),
            content=raw,
            headers={
                "Content-Type": "message/rfc822",
                "Authorization": f"Bearer {d.env['TRACKER_INBOUND_TOKEN']}",
            },
        )
    assert response.status_code == 202, response.text


async def test_out_of_office_pauses_a_bounce_stops_and_analytics_count(
    deploy: DeploymentFactory,
) -> None:
    d = await deploy(clock_speed=SPEED)
    await d.publish_lead("away@acme.example", "aggressive_close", first_name="Avery")
    await d.publish_lead("nobody@acme.example", "aggressive_close", first_name="Nat")
    away_1 = (await d.eventually(lambda: d.mail_to("away@acme.example"), what="email 1"))[0]
    gone_1 = (await d.eventually(lambda: d.mail_to("nobody@acme.example"), what="email 1"))[0]

    back = (_date(away_1) + timedelta(days=6)).date()
    await _post_inbound(d, out_of_office(away_1, back.isoformat()))
    await _post_inbound(d, hard_bounce(gone_1))

    async def paused() -> bool:
        enrollments = await d.enrollments("away@acme.example")
        return enrollments[0]["status"] == "paused"

    await d.eventually(paused, timeout=20, what="the out-of-office pause")
    enrollment = (await d.enrollments("away@acme.example"))[0]
    assert enrollment["paused_until"].startswith((back + timedelta(days=1)).isoformat())

    async def invalid() -> bool:
        lead = await d.lead("nobody@acme.example")
        return lead is not None and lead["status"] == "invalid"

    await d.eventually(invalid, timeout=20, what="the hard bounce to invalidate the lead")
    assert (await d.enrollments("nobody@acme.example"))[0]["stop_reason"] == "bounced"

    # Email 2 comes after the return date, not on day 2; the rest follows.
    await d.eventually(
        lambda: len(d.mail_to("away@acme.example")) == 3,
        timeout=60,
        what="the rest of the sequence after the pause",
    )
    away = d.mail_to("away@acme.example")
    assert _date(away[1]).date() > back
    assert len(d.mail_to("nobody@acme.example")) == 1
    lead = await d.lead("away@acme.example")
    assert lead is not None and lead["status"] == "new"  # an out-of-office is not a reply

    # The sink has the mail before the tracker has consumed its EmailSent.
    async def all_sent_counted() -> dict[str, Any] | None:
        report = await d.get("tracker", "/analytics/sequences/aggressive_close")
        return report if report["totals"]["sent"] >= 4 else None

    report = await d.eventually(all_sent_counted, timeout=20, what="4 sent in the analytics")
    totals = report["totals"]
    assert totals["sent"] == 4
    assert totals["replied"] == 0 and totals["auto_replied"] == 1
    assert totals["bounced"] == 1 and totals["hard_bounced"] == 1
    assert report["rates"]["bounce_rate"] == 0.25
    first = report["steps"][0]
    assert first["counts"]["sent"] == 2 and first["counts"]["bounced"] == 1
    async with httpx.AsyncClient() as client:
        csv = await client.get(d.url("tracker", "/analytics/sequences/aggressive_close/export.csv"))
    assert csv.status_code == 200 and csv.text.splitlines()[0].startswith("sequence,step_index")
    assert len(csv.text.splitlines()) == 4  # header + three steps
