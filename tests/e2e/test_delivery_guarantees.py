"""At-least-once done right: redelivery, crashes and bad input change nothing they
should not."""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import uuid

import pytest

from schemas import topics
from schemas.events import LeadRouted, LeadSnapshot
from services.runtime.devstack import SERVICES
from tests.e2e.conftest import DeploymentFactory
from tests.e2e.harness import Deployment

pytestmark = pytest.mark.e2e


async def _all_completed(d: Deployment, count: int) -> bool:
    done = await d.fetchval("SELECT count(*) FROM nurture.enrollments WHERE status = 'completed'")
    return bool(done == count)


async def _snapshot(d: Deployment) -> dict[str, object]:
    return {
        "mail": sorted(m["Message-ID"] for m in d.mail()),
        "leads": [
            tuple(r)
            for r in await d.fetch("SELECT id, status, sequence FROM router.leads ORDER BY id")
        ],
        "history": await d.fetchval("SELECT count(*) FROM router.lead_status_history"),
        "enrollments": [
            tuple(r)
            for r in await d.fetch(
                "SELECT id, status, position, cursor, steps_done"
                " FROM nurture.enrollments ORDER BY id"
            )
        ],
        "deliveries": [
            tuple(r)
            for r in await d.fetch(
                "SELECT delivery_key, status, attempts FROM sender.deliveries ORDER BY 1"
            )
        ],
        "messages": await d.fetchval("SELECT count(*) FROM tracker.messages"),
        "engagement": await d.fetchval("SELECT count(*) FROM tracker.engagement_events"),
    }


async def test_redelivering_every_event_changes_nothing(deploy: DeploymentFactory) -> None:
    d = await deploy(clock_speed=86400)
    lead = await d.publish_lead("ada@example.com", first_name="Ada", company="Acme")
    # The same upstream event twice (same event_id).
    await d.publish(topics.LEADS, lead.to_bytes(), lead.kafka_key())
    await d.eventually(lambda: _all_completed(d, 1), timeout=60, what="completion")
    # A reply and an unsubscribe from another lead, so engagement flows too.
    await d.publish_lead("grace@example.com", sequence="cold_outreach", first_name="Grace")
    first = (await d.eventually(lambda: d.mail_to("grace@example.com"), what="grace's email"))[0]
    assert (await d.post_reply(first)).status_code == 202
    await d.eventually(
        lambda: d.fetchval("SELECT count(*) FROM router.leads WHERE status = 'contacted'"),
        what="grace contacted",
    )
    await asyncio.sleep(1)
    before = await _snapshot(d)
    assert len(before["mail"]) == 4  # type: ignore[arg-type]

    # Every event any service ever emitted, published again with its event_id.
    replayed = 0
    for schema in SERVICES:
        for row in await d.fetch(f"SELECT topic, kafka_key, payload FROM {schema}.outbox"):
            await d.publish(row["topic"], row["payload"], row["kafka_key"])
            replayed += 1
    assert replayed >= 10
    await asyncio.sleep(4)
    assert await _snapshot(d) == before


async def test_sigkill_of_each_service_mid_run_loses_nothing_and_sends_nothing_twice(
    deploy: DeploymentFactory,
) -> None:
    d = await deploy(clock_speed=43200)  # five days of sequence = 10 s
    leads = [f"lead{i}@example.com" for i in range(20)]
    for address in leads[:10]:
        await d.publish_lead(address, first_name="Lin", company="Acme")
    kills = collections.Counter[str]()
    for name in ("sender", "nurture", "router", "tracker", "sender"):
        await asyncio.sleep(1.5)
        d.kill(name)
        kills[name] += 1
        if name == "router":
            # Leads published while the router is down wait in Kafka.
            for address in leads[10:]:
                await d.publish_lead(address, first_name="Lin", company="Acme")
        await d.restart(name)
    await d.eventually(lambda: _all_completed(d, len(leads)), timeout=120, what="completion")

    deliveries = await d.fetch(
        "SELECT delivery_key, status, message_id, to_email FROM sender.deliveries"
    )
    by_status = collections.Counter(r["status"] for r in deliveries)
    assert set(by_status) <= {"sent", "uncertain"}, by_status
    assert len(deliveries) == 3 * len(leads)
    assert by_status["uncertain"] <= kills["sender"]
    mail = d.mail()
    ids = [m["Message-ID"] for m in mail]
    assert len(ids) == len(set(ids)), "a delivery key was sent twice"
    sent_ids = {r["message_id"] for r in deliveries if r["status"] == "sent"}
    assert sent_ids <= set(ids)
    per_lead = collections.Counter(email.utils.parseaddr(str(m["To"]))[1] for m in mail)
    for address in leads:
        # An uncertain delivery may or may not have reached the server; never twice.
        uncertain_here = sum(
            1
            for r in deliveries
            if r["to_email"] == address
            and r["status"] == "uncertain"
            and r["message_id"] not in ids
        )
        assert 3 - uncertain_here <= per_lead[address] <= 3, (address, per_lead[address])
    print(f"kills: {dict(kills)}; deliveries: {dict(by_status)}")


MALFORMED = [b"not json at all", json.dumps({"event_type": "Nope", "x": 1}).encode()]


async def test_malformed_messages_go_to_each_dlq_and_consumers_keep_going(
    deploy: DeploymentFactory,
) -> None:
    d = await deploy(clock_speed=86400)
    consumers_of = {
        topics.LEADS: 1,
        topics.LEAD_ROUTED: 1,
        topics.STEP_DUE: 1,
        topics.EMAIL_SENT: 2,
        topics.ENGAGEMENT: 3,
        topics.WEBHOOKS_RAW: 1,
        topics.LEAD_UPDATES: 1,
        topics.SEQUENCES: 1,
    }
    for topic in consumers_of:
        for value in MALFORMED:
            await d.publish(topic, value, b"some-key")
    # A lead that validates as JSON but breaks a rule, and one that routes nowhere: the
    # router knows nurture's sequences and refuses it.
    await d.publish(topics.LEADS, b'{"lead": {"email": "nobody-at-example"}}', b"k")
    await d.publish_lead("nowhere@example.com", sequence="no_such_sequence")
    # Nurture's own check, for a LeadRouted that raced its sequence's deletion.
    stray = LeadRouted(
        lead_id=uuid.uuid4(),
        lead=LeadSnapshot(email="stray@example.com"),
        sequence="deleted_meanwhile",
        routing_reason="test",
    )
    await d.publish(topics.LEAD_ROUTED, stray.to_bytes(), stray.kafka_key())
    # The pipeline still works after all that.
    await d.publish_lead("ada@example.com", first_name="Ada")
    await d.eventually(lambda: _all_completed(d, 1), timeout=60, what="completion")

    for topic, consumers in consumers_of.items():
        expected = len(MALFORMED) * consumers + {topics.LEADS: 2, topics.LEAD_ROUTED: 1}.get(
            topic, 0
        )
        records = await d.dead_letters(topic, expected)
        assert len(records) == expected, (topic, len(records))
        for record in records:
            headers = {k: v.decode() for k, v in record.headers}
            assert headers["dlq-topic"] == topic
            assert headers["dlq-reason"]
            if record.value in MALFORMED:
                assert headers["dlq-reason"].startswith("invalid event")
            assert headers["dlq-consumer"] in SERVICES
        values = {r.value for r in records}
        assert set(MALFORMED) <= values  # original bytes kept
    lead_routed = await d.dead_letters(topics.LEAD_ROUTED, 3)
    reasons = {dict(r.headers)["dlq-reason"].decode() for r in lead_routed}
    assert "unknown sequence 'deleted_meanwhile'" in reasons
    leads_dlq = await d.dead_letters(topics.LEADS, 4)
    leads_reasons = [dict(r.headers)["dlq-reason"].decode() for r in leads_dlq]
    assert any(r.startswith("invalid email 'nobody-at-example'") for r in leads_reasons)
    assert any(
        r.startswith("unknown sequence 'no_such_sequence' (requested by the event)")
        for r in leads_reasons
    )
    assert await d.lead("nowhere@example.com") is None  # refused: nothing written
