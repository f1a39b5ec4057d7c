"""One lead through all four services on the real stack."""

from __future__ import annotations

import asyncio
import email.utils

import httpx
import pytest

from tests.e2e.conftest import DeploymentFactory
from tests.e2e.harness import body_text

pytestmark = pytest.mark.e2e

#: Half a day per second: email 2 is due 4 s after email 1.
SPEED = 43200


async def test_aggressive_close_sends_three_threaded_emails_and_completes(
    deploy: DeploymentFactory,
) -> None:
    d = await deploy(clock_speed=86400)
    await d.publish_lead(
        "ada@example.com",
        "aggressive_close",
        first_name="Ada",
        company="Acme",
        title="CTO",
        external_id="crm-123",
        timezone="Europe/London",
    )

    async def completed() -> bool:
        enrollments = await d.enrollments("ada@example.com")
        return bool(enrollments) and enrollments[0]["status"] == "completed"

    await d.eventually(completed, timeout=60, what="the enrollment to complete")
    mails = d.mail_to("ada@example.com")
    assert [m["Subject"] for m in mails] == [
        "Quick conversation about Acme?",
        "Still interested in a brief chat?",
        "Final check-in: are you open to one quick call?",
    ]
    first_id = mails[0]["Message-ID"]
    assert len({m["Message-ID"] for m in mails}) == 3
    for follow_up in mails[1:]:
        assert follow_up["In-Reply-To"] == first_id
        assert follow_up["References"] == first_id
    dates = [email.utils.parsedate_to_datetime(m["Date"]) for m in mails]
    assert dates == sorted(dates)
    # Days 0, 2 and 5 from enrollment, on the fast clock.
    assert 1.9 <= (dates[1] - dates[0]).total_seconds() / 86400 <= 2.6
    assert 2.9 <= (dates[2] - dates[1]).total_seconds() / 86400 <= 3.6
    for message in mails:
        text = body_text(message)
        assert "Hi Ada," in text and "Acme" in text
        assert "{{" not in text
        assert message["List-Unsubscribe"].startswith("<http://127.0.0.1:")
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    lead = await d.lead("ada@example.com")
    assert lead is not None and lead["status"] == "new"
    assert lead["external_id"] == "crm-123"
    deliveries = await d.fetch("SELECT status FROM sender.deliveries")
    assert [r["status"] for r in deliveries] == ["sent"] * 3


async def test_reply_stops_the_sequence_and_marks_the_lead_contacted(
    deploy: DeploymentFactory,
) -> None:
    d = await deploy(clock_speed=SPEED)  # two days = 4 s: room to reply in between
    await d.publish_lead(
        "grace@example.com", "aggressive_close", first_name="Grace", company="Navy"
    )
    first = (
        await d.eventually(lambda: d.mail_to("grace@example.com"), timeout=30, what="email 1")
    )[0]
    response = await d.post_reply(first)
    assert response.status_code == 202, response.text

    async def stopped() -> bool:
        enrollments = await d.enrollments("grace@example.com")
        lead = await d.lead("grace@example.com")
        return (
            enrollments[0]["status"] == "stopped"
            and lead is not None
            and lead["status"] == "contacted"
        )

    await d.eventually(stopped, timeout=20, what="the reply to stop the enrollment")
    enrollment = (await d.enrollments("grace@example.com"))[0]
    assert enrollment["stop_reason"] == "replied"
    lead = await d.lead("grace@example.com")
    assert lead is not None
    history = (await d.get("router", f"/leads/{lead['id']}"))["status_history"]
    assert [h["to_status"] for h in history] == ["new", "contacted"]
    # Past the day email 2 was due (it would have come first): nothing more arrives.
    await asyncio.sleep(3 * 86400 / SPEED)
    assert len(d.mail_to("grace@example.com")) == 1


async def test_one_click_unsubscribe_stops_and_marks_the_lead_lost(
    deploy: DeploymentFactory,
) -> None:
    d = await deploy(clock_speed=SPEED)
    await d.publish_lead("alan@example.org", "aggressive_close", first_name="Alan")
    first = (await d.eventually(lambda: d.mail_to("alan@example.org"), timeout=30, what="email 1"))[
        0
    ]
    url = first["List-Unsubscribe"].split(",")[0].strip().strip("<>")
    async with httpx.AsyncClient() as client:
        page = await client.get(url)
        assert page.status_code == 200 and "Unsubscribe" in page.text
        response = await client.post(
            url,
            content=b"List-Unsubscribe=One-Click",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 200
        forged = await client.post(url[:-3] + "AAA", content=b"List-Unsubscribe=One-Click")
        assert forged.status_code == 404

    async def lost() -> bool:
        enrollments = await d.enrollments("alan@example.org")
        lead = await d.lead("alan@example.org")
        return (
            enrollments[0]["status"] == "stopped" and lead is not None and lead["status"] == "lost"
        )

    await d.eventually(lost, timeout=20, what="the unsubscribe to stop the enrollment")
    assert (await d.enrollments("alan@example.org"))[0]["stop_reason"] == "unsubscribed"
    suppressed = await d.fetch("SELECT email, reason FROM sender.suppressions")
    assert [(r["email"], r["reason"]) for r in suppressed] == [("alan@example.org", "unsubscribed")]
    await asyncio.sleep(3 * 86400 / SPEED)
    assert len(d.mail_to("alan@example.org")) == 1
