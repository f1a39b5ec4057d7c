"""The router's HTTP API and its lead-updates consumer, on real PostgreSQL and a real
Kafka-protocol broker: intake (one lead, batches all-or-nothing), routing rules as
data, sequence actions on leads, status history."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import topics
from schemas.events import (
    LeadAction,
    LeadData,
    LeadReceived,
    LeadUpdateRequested,
    SequenceChanged,
)
from services.router.app import RouterService
from services.router.handlers import seed_default_rules
from services.runtime.devstack import free_port
from services.runtime.kafka import create_topics
from services.runtime.settings import RouterSettings

pytestmark = pytest.mark.integration


@dataclass
class Router:
    service: RouterService
    http: httpx.AsyncClient
    db: asyncpg.Connection
    kafka: str

    async def count(self, sql: str, *args: Any) -> int:
        return int(await self.db.fetchval(sql, *args))

    async def written(self) -> tuple[int, int, int]:
        """Leads, status history rows, outbox rows: what an intake writes."""
        return (
            await self.count("SELECT count(*) FROM router.leads"),
            await self.count("SELECT count(*) FROM router.lead_status_history"),
            await self.count("SELECT count(*) FROM router.outbox"),
        )


@pytest.fixture
async def router(database_url: str, kafka_bootstrap: str) -> AsyncIterator[Router]:
    await create_topics(kafka_bootstrap, 2)
    port = free_port()
    # The env names work as keyword arguments for fields with an alias; http_port has
    # none (its variable comes from the ROUTER_ prefix), so it goes by its field name:
    # RouterSettings(ROUTER_HTTP_PORT=...) would be silently ignored (extra="ignore").
    settings = RouterSettings(
        DATABASE_URL=database_url,
        KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
        KAFKA_SESSION_TIMEOUT_MS=3000,
        TOUCHSTREAM_HTTP_HOST="127.0.0.1",
        http_port=port,
    )
    assert settings.http_port == port
    service = RouterService(settings)
    await service.start()
    db = await asyncpg.connect(database_url)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=15) as http:
            yield Router(service, http, db, kafka_bootstrap)
    finally:
        await db.close()
        await service.stop()


def lead(email: str, **fields: Any) -> dict[str, Any]:
    return {"email": email, **fields}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def announce(
    router: Router,
    key: str,
    status: str = "active",
    *,
    tenant_id: str = "default",
    sequence_id: uuid.UUID | None = None,
    occurred_at: Any = None,
) -> SequenceChanged:
    """Publish a SequenceChanged the way nurture does; wait until the router's catalog
    has applied it (the catalog is eventually consistent: wait for it, never sleep)."""
    event = SequenceChanged(
        tenant_id=tenant_id,
        sequence_key=key,
        sequence_id=sequence_id or uuid.uuid4(),
        status=status,
        current_version=None if status == "deleted" else 1,
        **({"occurred_at": occurred_at} if occurred_at is not None else {}),
    )
    producer = AIOKafkaProducer(bootstrap_servers=router.kafka, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topics.SEQUENCES, event.to_bytes(), key=event.kafka_key())
    finally:
        await producer.stop()

    async def applied() -> bool:
        return bool(
            await router.db.fetchval(
                "SELECT 1 FROM router.inbox WHERE event_id = $1", event.event_id
            )
        )

    await eventually(applied)
    return event


# ------------------------------------------------------------------------- intake


async def test_single_intake_creates_then_updates_one_lead(router: Router) -> None:
    body = {
        "lead": lead(
            "  Ada.Lovelace@Example.COM ",
            first_name="  Ada  ",
            last_name="Lovelace",
            company="Analytical  Engines",
            timezone="Europe/London",
            country="gb",
            tags=["CTO", " vip ", "cto"],
            external_id="crm-ada",
        ),
        "sequence": "regular_nurture",
    }
    response = await router.http.post("/leads", json=body)
    assert response.status_code == 201, response.text
    first = response.json()
    assert first["created"] is True and first["routed"] is True
    assert first["sequence"] == "regular_nurture" and first["reason"] == "requested by the event"
    lead_id = uuid.UUID(first["lead_id"])

    row = await router.db.fetchrow("SELECT * FROM router.leads WHERE id = $1", lead_id)
    assert row is not None
    assert row["email"] == "ada.lovelace@example.com"
    assert (row["first_name"], row["company"]) == ("Ada", "Analytical Engines")
    assert row["country"] == "GB" and row["tags"] == ["cto", "vip"]
    assert row["tenant_id"] == "default" and row["status"] == "new"
    assert row["routing_rule_id"] is None
    outbox = await router.db.fetch(
        "SELECT topic, event_type, kafka_key FROM router.outbox ORDER BY id"
    )
    assert [(r["topic"], r["event_type"]) for r in outbox] == [(topics.LEAD_ROUTED, "LeadRouted")]
    assert outbox[0]["kafka_key"] == str(lead_id).encode()

    again = await router.http.post(
        "/leads",
        json={"lead": lead("ada.lovelace@example.com", title="CTO"), "tenant_id": "default"},
    )
    assert again.status_code == 200, again.text
    assert again.json()["created"] is False and again.json()["lead_id"] == str(lead_id)
    assert await router.count("SELECT count(*) FROM router.leads") == 1
    assert await router.db.fetchval("SELECT title FROM router.leads") == "CTO"
    assert await router.count("SELECT count(*) FROM router.outbox") == 2

    fetched = (await router.http.get(f"/leads/{lead_id}")).json()
    assert fetched["email"] == "ada.lovelace@example.com"
    assert [h["to_status"] for h in fetched["status_history"]] == ["new"]
    other_tenant = await router.http.get(f"/leads/{lead_id}", params={"tenant_id": "acme"})
    assert other_tenant.status_code == 404


async def test_batch_intake_is_all_or_nothing(router: Router) -> None:
    batch = {
        "leads": [
            {"lead": lead("one@example.com")},
            {"lead": lead("two@example.com", grade="B"), "sequence": None},
            {"lead": lead("One@Example.com", first_name="One")},  # the first lead again
        ]
    }
    response = await router.http.post("/leads", json=batch)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["created"] for r in results] == [True, True, False]
    assert results[0]["lead_id"] == results[2]["lead_id"]
    assert [r["sequence"] for r in results] == ["cold_outreach", "regular_nurture", "cold_outreach"]
    before = await router.written()
    assert before == (2, 2, 3)

    bad = {
        "leads": [
            {"lead": lead("three@example.com")},
            {"lead": lead("not-an-address")},
            {"lead": lead("four@example.com", timezone="Mars/Olympus_Mons")},
            {"lead": lead("five@example.com"), "sequence": "Bad Sequence"},
        ]
    }
    response = await router.http.post("/leads", json=bad)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert [d["index"] for d in detail] == [1, 2, 3]
    assert "not-an-address" in detail[0]["error"]
    assert "unknown timezone" in detail[1]["error"]
    assert "sequence" in detail[2]["error"]
    assert await router.written() == before
    assert (
        await router.count("SELECT count(*) FROM router.leads WHERE email = 'three@example.com'")
        == 0
    )

    too_many = {"leads": [{"lead": lead(f"l{i}@example.com")} for i in range(1001)]}
    response = await router.http.post("/leads", json=too_many)
    assert response.status_code == 422 and "1000" in response.text
    assert await router.written() == before


async def test_bad_http_input_is_422_and_writes_nothing(router: Router) -> None:
    before = await router.written()
    malformed = await router.http.post(
        "/leads", content=b'{"lead": {"email": ', headers={"content-type": "application/json"}
    )
    assert malformed.status_code == 422
    assert malformed.json()["detail"][0]["type"] == "json_invalid"

    no_email = await router.http.post("/leads", json={"lead": {"first_name": "Ada"}})
    assert no_email.status_code == 422
    assert any(
        d["loc"][-2:] == ["lead", "email"] and d["type"] == "missing"
        for d in no_email.json()["detail"]
    )

    not_an_object = await router.http.post("/leads", json=[{"lead": lead("a@example.com")}])
    assert not_an_object.status_code == 422
    assert '"lead"' in not_an_object.json()["detail"][0]["msg"]

    timezone = await router.http.post(
        "/leads", json={"lead": lead("tz@example.com", timezone="Europe/Atlantis")}
    )
    assert timezone.status_code == 422
    assert timezone.json()["detail"] == "unknown timezone 'Europe/Atlantis'"

    tenants = await router.http.post(
        "/leads",
        params={"tenant_id": "acme"},
        json={"lead": lead("t@example.com"), "tenant_id": "b"},
    )
    assert tenants.status_code == 422 and "acme, b" in tenants.json()["detail"]
    assert await router.written() == before


# ------------------------------------------------------------------ routing rules


async def test_routing_rules_crud_validation_and_grade_routing(router: Router) -> None:
    rules = (await router.http.get("/routing-rules")).json()
    assert [(r["name"], r["match"], r["sequence"]) for r in rules] == [
        ("grade A", {"grade": "A"}, "aggressive_close"),
        ("grade B", {"grade": "B"}, "regular_nurture"),
        ("grade C", {"grade": "C"}, "long_term_nurture"),
    ]
    assert [r["position"] for r in rules] == [0, 1, 2]
    grade_a = rules[0]["id"]

    leads = {"leads": [{"lead": lead(f"grade-{g}@example.com", grade=g)} for g in "aBCD"]}
    leads["leads"].append({"lead": lead("nograde@example.com")})
    results = (await router.http.post("/leads", json=leads)).json()["results"]
    assert [r["sequence"] for r in results] == [
        "aggressive_close",
        "regular_nurture",
        "long_term_nurture",
        "cold_outreach",
        "cold_outreach",
    ]
    assert results[0]["reason"] == "rule 'grade A'" and results[3]["reason"] == "default sequence"
    row = await router.db.fetchrow(
        "SELECT routing_rule_id, routing_reason, sequence FROM router.leads WHERE id = $1",
        uuid.UUID(results[0]["lead_id"]),
    )
    assert row is not None and str(row["routing_rule_id"]) == grade_a
    fetched = (await router.http.get(f"/leads/{results[0]['lead_id']}")).json()
    assert fetched["routing_rule_id"] == grade_a and fetched["routing_reason"] == "rule 'grade A'"
    default_routed = (await router.http.get(f"/leads/{results[3]['lead_id']}")).json()
    assert default_routed["routing_rule_id"] is None

    # POST appends; DELETE removes; both per tenant. A rule names a sequence the
    # tenant has (nurture announces its sequences to the router's catalog).
    await announce(router, "webinar_follow_up")
    await announce(router, "webinar_follow_up", tenant_id="acme")
    webinar = {
        "name": "webinars",
        "match": {"source": ["webinar"], "min_score": 10},
        "sequence": "webinar_follow_up",
    }
    created = await router.http.post("/routing-rules", json=webinar)
    assert created.status_code == 201, created.text
    assert created.json()["position"] == 3 and created.json()["enabled"] is True
    acme = await router.http.post("/routing-rules", params={"tenant_id": "acme"}, json=webinar)
    assert acme.status_code == 201 and acme.json()["position"] == 0
    assert len((await router.http.get("/routing-rules")).json()) == 4
    assert (await router.http.delete(f"/routing-rules/{acme.json()['id']}")).status_code == 404
    gone = await router.http.delete(
        f"/routing-rules/{acme.json()['id']}", params={"tenant_id": "acme"}
    )
    assert gone.status_code == 204
    assert (await router.http.get("/routing-rules", params={"tenant_id": "acme"})).json() == []

    # PUT replaces the whole ordered list; GET output can be edited and put back.
    current = (await router.http.get("/routing-rules")).json()
    reordered = [current[3], {**current[0], "enabled": False}, current[1]]
    put = await router.http.put("/routing-rules", json=reordered)
    assert put.status_code == 200, put.text
    after = (await router.http.get("/routing-rules")).json()
    assert after == put.json()
    assert [(r["id"], r["position"], r["enabled"]) for r in after] == [
        (current[3]["id"], 0, True),
        (current[0]["id"], 1, False),
        (current[1]["id"], 2, True),
    ]
    hot = await router.http.post(
        "/leads", json={"lead": lead("hot@example.com", grade="A", source="Webinar", score=50)}
    )
    assert hot.json()["sequence"] == "webinar_follow_up"
    disabled = await router.http.post("/leads", json={"lead": lead("a2@example.com", grade="A")})
    assert disabled.json()["sequence"] == "cold_outreach"

    # Validation: 422 with a message, and nothing changes.
    invalid: list[tuple[dict[str, Any], str]] = [
        ({"name": "x", "match": {"colour": "red"}, "sequence": "s"}, "unknown match key"),
        ({"name": "x", "match": {"grade": 3}, "sequence": "s"}, "match.grade"),
        ({"name": "x", "match": {"min_score": "10"}, "sequence": "s"}, "match.min_score"),
        ({"name": "x", "match": {"tags_any": "vip"}, "sequence": "s"}, "match.tags_any"),
        ({"name": "x", "match": {"tags_all": ["vip", 1]}, "sequence": "s"}, "match.tags_all"),
        ({"name": "x", "match": {"min_score": 9, "max_score": 1}, "sequence": "s"}, "never"),
        ({"name": "  ", "match": {}, "sequence": "s"}, "name"),
        ({"name": "x", "match": {}, "sequence": "Not A Key"}, "sequence"),
    ]
    for rule, message in invalid:
        response = await router.http.post("/routing-rules", json=rule)
        assert response.status_code == 422, rule
        assert message in response.json()["detail"], (rule, response.text)
    response = await router.http.put(
        "/routing-rules", json=[after[0], invalid[0][0], invalid[1][0]]
    )
    assert response.status_code == 422
    assert [d["index"] for d in response.json()["detail"]] == [1, 2]
    unknown_id = await router.http.put(
        "/routing-rules", json=[{**after[0], "id": str(uuid.uuid4())}]
    )
    assert unknown_id.status_code == 422 and "no rule" in unknown_id.text
    typo = await router.http.post("/routing-rules", json={"name": "x", "mach": {}, "sequence": "s"})
    assert typo.status_code == 422
    assert (await router.http.get("/routing-rules")).json() == after

    # An empty list is a choice: no rules, everything to the default sequence.
    assert (await router.http.put("/routing-rules", json=[])).json() == []
    # Not seeded again at the next start: the tenant's rules are configured.
    assert not await seed_default_rules(router.service.pool, "default", router.service.clock.now())
    assert (await router.http.get("/routing-rules")).json() == []


# -------------------------------------------------------------------- lead updates


async def _publish(kafka: str, events: list[LeadUpdateRequested]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=kafka, acks="all")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                topics.LEAD_UPDATES, event.to_bytes(), key=event.kafka_key()
            )
    finally:
        await producer.stop()


async def _dead_letters(kafka: str, topic: str, event_ids: set[str]) -> list[Any]:
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        found: list[Any] = []
        deadline = time.monotonic() + 20
        while len(found) < len(event_ids) and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                found += [r for r in batch if any(i.encode() in r.value for i in event_ids)]
        return found
    finally:
        await consumer.stop()


async def test_lead_updates_change_status_tags_and_assignee(router: Router) -> None:
    response = await router.http.post(
        "/leads", json={"lead": lead("grace@example.com", tags=["navy"])}
    )
    lead_id = uuid.UUID(response.json()["lead_id"])
    by = "sequence:aggressive_close v2 step s5"

    def update(action: LeadAction, **fields: Any) -> LeadUpdateRequested:
        return LeadUpdateRequested(lead_id=lead_id, action=action, requested_by=by, **fields)

    bad_status = update(LeadAction.UPDATE_STATUS, status="won")
    events = [
        update(LeadAction.UPDATE_STATUS, status="contacted"),
        update(LeadAction.UPDATE_STATUS, status="contacted"),  # no change: not recorded
        update(LeadAction.TAG, tags=["VIP", " Enterprise ", "vip"]),
        bad_status,
        update(LeadAction.ASSIGN, assignee="alice@example.com"),
        LeadUpdateRequested(
            lead_id=uuid.uuid4(), action=LeadAction.MARK_QUALIFIED, requested_by=by
        ),  # not our lead: skipped
        update(LeadAction.MARK_QUALIFIED, reason="booked a demo"),
    ]
    await _publish(router.kafka, events)

    async def qualified() -> bool:
        status = await router.db.fetchval("SELECT status FROM router.leads WHERE id = $1", lead_id)
        return bool(status == "qualified")

    await eventually(qualified)
    row = await router.db.fetchrow(
        "SELECT tags, assigned_to FROM router.leads WHERE id = $1", lead_id
    )
    assert row is not None
    assert row["tags"] == ["enterprise", "navy", "vip"]
    assert row["assigned_to"] == "alice@example.com"

    history = (await router.http.get(f"/leads/{lead_id}/history")).json()
    assert history["lead_id"] == str(lead_id)
    moves = [
        (h["from_status"], h["to_status"], h["reason"], h["changed_by"])
        for h in history["status_history"]
    ]
    assert moves == [
        (None, "new", "lead received", "router"),
        ("new", "contacted", "update_status", by),
        ("contacted", "qualified", "booked a demo", by),
    ]
    assert history["status_history"][2]["event_id"] == str(events[-1].event_id)
    fetched = (await router.http.get(f"/leads/{lead_id}")).json()
    assert fetched["status_history"] == history["status_history"]
    assert fetched["assigned_to"] == "alice@example.com"
    missing = await router.http.get(f"/leads/{uuid.uuid4()}/history")
    assert missing.status_code == 404

    (dead,) = await _dead_letters(
        router.kafka, topics.dlq(topics.LEAD_UPDATES), {str(bad_status.event_id)}
    )
    assert dead.value == bad_status.to_bytes()
    reason = dict(dead.headers)["dlq-reason"].decode()
    assert "status must be one of" in reason and "'won'" in reason


# --------------------------------------------------------------- sequence catalog


async def test_the_sequence_catalog_decides_what_leads_and_rules_may_name(
    router: Router,
) -> None:
    catalog = (await router.http.get("/sequences")).json()
    assert catalog["items"] == []
    assert "cold_outreach" in catalog["presets"]
    before = await router.written()

    async def post(body: dict[str, Any], **params: str) -> httpx.Response:
        return await router.http.post("/leads", json=body, params=params)

    unknown = await post({"lead": lead("a@example.com"), "sequence": "no_such_sequence"})
    assert unknown.status_code == 422
    assert unknown.json()["detail"].startswith(
        "unknown sequence 'no_such_sequence' (requested by the event): tenant 'default'"
    )
    assert await router.written() == before

    # A preset exists for every tenant before nurture ever announces it.
    preset = await post({"lead": lead("p@acme.example"), "sequence": "aggressive_close"})
    assert preset.status_code == 201, preset.text
    before = await router.written()

    await announce(router, "smart_flow", "draft")
    draft = await post({"lead": lead("b@example.com"), "sequence": "smart_flow"})
    assert draft.status_code == 422
    assert draft.json()["detail"] == (
        "sequence 'smart_flow' (requested by the event) is draft: it takes no new leads"
    )
    activated = await announce(router, "smart_flow", "active")
    ok = await post({"lead": lead("b@example.com"), "sequence": "smart_flow"})
    assert ok.status_code == 201, ok.text
    (entry,) = (await router.http.get("/sequences")).json()["items"]
    assert (entry["key"], entry["status"]) == ("smart_flow", "active")
    assert entry["sequence_id"] == str(activated.sequence_id)
    # Another tenant does not have it.
    other = await post({"lead": lead("c@example.com"), "sequence": "smart_flow"}, tenant_id="acme")
    assert other.status_code == 422 and "tenant 'acme'" in other.json()["detail"]

    await announce(router, "smart_flow", "paused", sequence_id=activated.sequence_id)
    # An older change replayed late (e.g. from a DLQ) does not undo a newer one.
    await announce(
        router,
        "smart_flow",
        "active",
        sequence_id=activated.sequence_id,
        occurred_at=activated.occurred_at - timedelta(minutes=1),
    )
    before = await router.written()
    batch = {
        "leads": [
            {"lead": lead("d@example.com"), "sequence": "regular_nurture"},
            {"lead": lead("e@example.com"), "sequence": "smart_flow"},
            {"lead": lead("f@example.com"), "sequence": "ghost"},
        ]
    }
    refused = await post(batch)
    assert refused.status_code == 422
    assert [(d["index"], d["error"].split(":")[0]) for d in refused.json()["detail"]] == [
        (1, "sequence 'smart_flow' (requested by the event) is paused"),
        (2, "unknown sequence 'ghost' (requested by the event)"),
    ]
    assert await router.written() == before

    # A tenant's own sequence of a preset's key wins over the preset; once deleted,
    # the preset (created by nurture on first use) is back.
    await announce(router, "cold_outreach", "draft", tenant_id="acme")
    default_routed = await post({"lead": lead("g@example.com")}, tenant_id="acme")
    assert default_routed.status_code == 422
    assert default_routed.json()["detail"] == (
        "sequence 'cold_outreach' (default sequence) is draft: it takes no new leads"
    )
    await announce(router, "cold_outreach", "deleted", tenant_id="acme")
    assert (await post({"lead": lead("g@example.com")}, tenant_id="acme")).status_code == 201

    # Routing rules may name sequences the tenant has, active or not.
    ghost_rule = {"name": "ghost", "match": {"grade": "Z"}, "sequence": "ghost"}
    response = await router.http.post("/routing-rules", json=ghost_rule)
    assert response.status_code == 422
    assert response.json()["detail"].startswith("unknown sequence 'ghost': tenant 'default'")
    rules = (await router.http.get("/routing-rules")).json()
    put = await router.http.put("/routing-rules", json=[*rules, ghost_rule])
    assert put.status_code == 422
    assert [d["index"] for d in put.json()["detail"]] == [len(rules)]
    assert (await router.http.get("/routing-rules")).json() == rules
    paused_rule = {"name": "grade Z", "match": {"grade": "Z"}, "sequence": "smart_flow"}
    assert (await router.http.post("/routing-rules", json=paused_rule)).status_code == 201
    by_rule = await post({"lead": lead("z@example.com", grade="Z")})
    assert by_rule.status_code == 422
    assert by_rule.json()["detail"] == (
        "sequence 'smart_flow' (rule 'grade Z') is paused: it takes no new leads"
    )


async def test_the_leads_topic_dead_letters_a_lead_for_an_unknown_sequence(
    router: Router,
) -> None:
    await announce(router, "paused_flow", "paused")
    events = [
        LeadReceived(lead=LeadData(email="ghost@example.com"), sequence="no_such_sequence"),
        LeadReceived(lead=LeadData(email="paused@example.com"), sequence="paused_flow"),
        LeadReceived(lead=LeadData(email="fine@example.com"), sequence="regular_nurture"),
    ]
    producer = AIOKafkaProducer(bootstrap_servers=router.kafka, acks="all")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(topics.LEADS, event.to_bytes(), key=event.kafka_key())
    finally:
        await producer.stop()

    async def fine_stored() -> bool:
        return (
            await router.count("SELECT count(*) FROM router.leads WHERE email = 'fine@example.com'")
            == 1
        )

    await eventually(fine_stored)
    dead = await _dead_letters(
        router.kafka, topics.dlq(topics.LEADS), {str(e.event_id) for e in events[:2]}
    )
    reasons = {
        json.loads(r.value)["lead"]["email"]: dict(r.headers)["dlq-reason"].decode() for r in dead
    }
    assert reasons["ghost@example.com"].startswith(
        "unknown sequence 'no_such_sequence' (requested by the event)"
    )
    assert reasons["paused@example.com"] == (
        "sequence 'paused_flow' (requested by the event) is paused: it takes no new leads"
    )
    assert {r.value for r in dead} == {e.to_bytes() for e in events[:2]}  # original bytes
    assert await router.count("SELECT count(*) FROM router.leads") == 1
    assert await router.count("SELECT count(*) FROM router.outbox") == 1


# ------------------------------------------------- HTTP intake takes the topic's JSON

#: The upstream contract, exactly as issue 2 and the README state it.
UPSTREAM = {
    "event_type": "LeadReceived",
    "event_id": "6a1f0c52-2f7a-4c39-9d7e-0b6f1d0c9a11",
    "occurred_at": "2026-11-21T10:00:00Z",
    "tenant_id": "default",
    "lead": {
        "external_id": "crm-123",
        "email": "ada@example.com",
        "first_name": "Ada",
        "company": "Acme",
        "title": "CTO",
        "timezone": "Europe/London",
    },
    "sequence": "aggressive_close",
}


async def test_http_intake_takes_the_topics_json_and_its_event_id_is_idempotent(
    router: Router,
) -> None:
    first = await router.http.post("/leads", json=UPSTREAM)
    assert first.status_code == 201, first.text
    assert first.json()["duplicate"] is False and first.json()["sequence"] == "aggressive_close"
    written = await router.written()
    assert written == (1, 1, 1)

    again = await router.http.post("/leads", json={**UPSTREAM, "sequence": "regular_nurture"})
    assert again.status_code == 200, again.text
    assert again.json()["duplicate"] is True
    assert again.json()["lead_id"] == first.json()["lead_id"]
    assert again.json()["sequence"] == "aggressive_close"  # nothing changed
    assert await router.written() == written

    # The same event id published on the topic is the same event: skipped there too.
    producer = AIOKafkaProducer(bootstrap_servers=router.kafka, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topics.LEADS, json.dumps(UPSTREAM).encode(), key=b"crm-123")
        marker = LeadReceived(lead=LeadData(email="marker@example.com"))
        await producer.send_and_wait(topics.LEADS, marker.to_bytes(), key=marker.kafka_key())
    finally:
        await producer.stop()

    async def marker_stored() -> bool:
        return await router.count("SELECT count(*) FROM router.leads") == 2

    await eventually(marker_stored)
    assert await router.count("SELECT count(*) FROM router.outbox") == 2  # the marker's only

    # An event applied from the topic first is a duplicate over HTTP.
    posted = {**UPSTREAM, "event_id": str(marker.event_id), "lead": {"email": "marker@example.com"}}
    duplicate = await router.http.post("/leads", json=posted)
    assert duplicate.status_code == 200 and duplicate.json()["duplicate"] is True

    # The envelope's tenant_id selects the tenant.
    acme = {**UPSTREAM, "event_id": str(uuid.uuid4()), "tenant_id": "acme"}
    created = await router.http.post("/leads", json=acme)
    assert created.status_code == 201, created.text
    assert (
        await router.http.get(f"/leads/{created.json()['lead_id']}", params={"tenant_id": "acme"})
    ).status_code == 200

    # A batch: an event id twice is applied once.
    repeated = str(uuid.uuid4())
    batch = {
        "leads": [
            {"event_id": repeated, "lead": {"email": "grace@example.com"}},
            {"event_id": repeated, "lead": {"email": "grace@example.com"}},
        ]
    }
    results = (await router.http.post("/leads", json=batch)).json()["results"]
    assert [(r["created"], r["duplicate"]) for r in results] == [(True, False), (False, True)]

    # A refused event does not use its event id up: once fixed, it is applied.
    retry_id = str(uuid.uuid4())
    bad = {"event_id": retry_id, "lead": {"email": "alan@example.com"}, "sequence": "ghost"}
    assert (await router.http.post("/leads", json=bad)).status_code == 422
    fixed = await router.http.post("/leads", json={**bad, "sequence": "cold_outreach"})
    assert fixed.status_code == 201 and fixed.json()["duplicate"] is False


async def test_http_intake_refuses_unknown_fields_with_a_clear_message(router: Router) -> None:
    before = await router.written()
    cases: list[tuple[dict[str, Any], str]] = [
        ({**UPSTREAM, "colour": "red"}, "unknown field(s) colour; a lead intake takes lead,"),
        ({"leads": [{"lead": lead("a@example.com")}], "extra": 1}, "unknown field(s) extra"),
        ({"leads": [{"lead": lead("a@example.com"), "priority": 1}]}, "unknown field(s) priority"),
        ({**UPSTREAM, "event_type": "LeadRouted"}, "LeadReceived"),
        ({**UPSTREAM, "event_id": "not-a-uuid"}, "event_id"),
        ({**UPSTREAM, "occurred_at": "2026-11-21T10:00:00"}, "timezone"),
        ({**UPSTREAM, "schema_version": 2}, "schema_version"),
    ]
    for body, message in cases:
        response = await router.http.post("/leads", json=body)
        assert response.status_code == 422, (body, response.text)
        assert message in response.text, (message, response.text)
    assert await router.written() == before
