"""Event contracts (schemas/events.py) and the topic registry (schemas/topics.py)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas import topics
from schemas.events import (
    TOPIC_EVENTS,
    BounceType,
    EmailFailed,
    EmailSent,
    EngagementReceived,
    EngagementType,
    Event,
    FailureKind,
    LeadData,
    LeadReceived,
    LeadRouted,
    LeadSnapshot,
    RenderedMessage,
    SequenceChanged,
    StepDue,
    WebhookReceived,
    decode,
)

EVENT_ID = "6f1c2a9e-1d8b-4a57-9a43-0d1f0a9e7c11"
LEAD_ID = uuid.UUID("0b7c3d5e-8f90-4a1b-9c2d-3e4f5a6b7c8d")
ENROLLMENT_ID = uuid.UUID("1c8d4e6f-9a01-4b2c-8d3e-4f5a6b7c8d9e")
SEQUENCE_ID = uuid.UUID("2d9e5f70-ab12-4c3d-9e4f-5a6b7c8d9eaf")
STEP_ID = uuid.UUID("3eaf6081-bc23-4d4e-af50-6b7c8d9eafb0")
SENT_AT = datetime(2026, 11, 21, 10, 5, tzinfo=UTC)


def upstream_lead_json(**overrides: Any) -> dict[str, Any]:
    """The lead contract exactly as upstream systems send it."""
    body: dict[str, Any] = {
        "event_type": "LeadReceived",
        "event_id": EVENT_ID,
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
    body.update(overrides)
    return body


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def email_sent(**overrides: Any) -> EmailSent:
    fields: dict[str, Any] = {
        "lead_id": LEAD_ID,
        "enrollment_id": ENROLLMENT_ID,
        "sequence_id": SEQUENCE_ID,
        "sequence_key": "aggressive_close",
        "sequence_version": 1,
        "step_id": STEP_ID,
        "step_index": 0,
        "delivery_key": f"{ENROLLMENT_ID}:0",
        "message_id": "<abc@example.com>",
        "to_email": "ada@example.com",
        "from_email": "sales@example.com",
        "subject": "Hello",
        "sent_at": SENT_AT,
        "links": ["https://example.com/a"],
    }
    fields.update(overrides)
    return EmailSent(**fields)


def email_failed(**overrides: Any) -> EmailFailed:
    fields: dict[str, Any] = {
        "lead_id": LEAD_ID,
        "enrollment_id": ENROLLMENT_ID,
        "sequence_id": SEQUENCE_ID,
        "step_id": STEP_ID,
        "step_index": 0,
        "delivery_key": f"{ENROLLMENT_ID}:0",
        "to_email": "ada@example.com",
        "failure": FailureKind.PERMANENT,
        "reason": "550 no such user",
        "smtp_code": 550,
    }
    fields.update(overrides)
    return EmailFailed(**fields)


def engagement(
    kind: EngagementType, bounce: BounceType | None = None, **overrides: Any
) -> EngagementReceived:
    fields: dict[str, Any] = {
        "engagement_type": kind,
        "lead_id": LEAD_ID,
        "email": "ada@example.com",
        "source": "test",
        "bounce_type": bounce,
    }
    fields.update(overrides)
    return EngagementReceived(**fields)


def step_due() -> StepDue:
    return StepDue(
        lead_id=LEAD_ID,
        enrollment_id=ENROLLMENT_ID,
        sequence_id=SEQUENCE_ID,
        sequence_key="aggressive_close",
        sequence_version=3,
        step_id=STEP_ID,
        step_index=2,
        delivery_key=f"{ENROLLMENT_ID}:1",
        thread_delivery_key=f"{ENROLLMENT_ID}:0",
        due_at=SENT_AT,
        message=RenderedMessage(
            to_email="ada@example.com", to_name="Ada", subject="Hi", text="Hello", html=None
        ),
    )


def lead_routed() -> LeadRouted:
    return LeadRouted(
        lead_id=LEAD_ID,
        lead=LeadSnapshot(email="ada@example.com", first_name="Ada", custom_fields={"n": 3}),
        sequence="regular_nurture",
        routing_reason="rule 'grade b'",
    )


# ------------------------------------------------------------------ upstream leads


def test_upstream_lead_contract_decodes() -> None:
    event = decode(topics.LEADS, encode(upstream_lead_json()))

    assert isinstance(event, LeadReceived)
    assert event.event_id == uuid.UUID(EVENT_ID)
    assert event.occurred_at == datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    assert event.tenant_id == "default"
    assert event.sequence == "aggressive_close"
    assert event.schema_version == 1
    assert event.lead.external_id == "crm-123"
    assert event.lead.email == "ada@example.com"
    assert event.lead.first_name == "Ada"
    assert event.lead.company == "Acme"
    assert event.lead.title == "CTO"
    assert event.lead.timezone == "Europe/London"
    assert event.lead.last_name is None
    assert event.lead.tags == []
    assert event.lead.custom_fields == {}


def test_optional_envelope_fields_are_generated_or_defaulted() -> None:
    body = upstream_lead_json()
    for key in ("event_id", "occurred_at", "tenant_id", "sequence"):
        del body[key]
    before = datetime.now(UTC)

    first = decode(topics.LEADS, encode(body))
    second = decode(topics.LEADS, encode(body))

    assert isinstance(first, LeadReceived)
    assert isinstance(second, LeadReceived)
    assert first.tenant_id == "default"
    assert first.sequence is None
    assert isinstance(first.event_id, uuid.UUID)
    assert first.occurred_at.tzinfo is not None
    assert before <= first.occurred_at <= datetime.now(UTC)


def test_a_lead_without_event_id_gets_one_derived_from_its_bytes() -> None:
    """A redelivered record (the same bytes) must carry the same id, or the inbox
    cannot recognise it; another record gets another id."""
    body = upstream_lead_json()
    del body["event_id"]
    raw = encode(body)

    first = decode(topics.LEADS, raw)
    redelivered = decode(topics.LEADS, bytes(raw))
    other = decode(topics.LEADS, encode({**body, "sequence": "regular_nurture"}))

    assert first.event_id == redelivered.event_id
    assert first.event_id != other.event_id
    assert first.event_id.version == 5
    # An event id upstream states is kept as it is.
    assert decode(topics.LEADS, encode(upstream_lead_json())).event_id == uuid.UUID(EVENT_ID)
    # Events of other topics are produced by the services, always with an id.
    routed = lead_routed()
    assert decode(topics.LEAD_ROUTED, routed.to_bytes()).event_id == routed.event_id


def test_unknown_fields_are_ignored() -> None:
    body = upstream_lead_json(crm_debug={"x": 1})
    body["lead"] = {**body["lead"], "favourite_colour": "green"}

    event = decode(topics.LEADS, encode(body))

    assert isinstance(event, LeadReceived)
    assert not hasattr(event, "crm_debug")
    assert "favourite_colour" not in event.lead.model_dump()


def test_lead_strings_are_stripped_and_blank_optional_fields_become_none() -> None:
    body = upstream_lead_json()
    body["lead"] = {
        **body["lead"],
        "email": "  ada@example.com ",
        "external_id": "  ",
        "company": "",
    }

    event = decode(topics.LEADS, encode(body))

    assert isinstance(event, LeadReceived)
    assert event.lead.email == "ada@example.com"
    assert event.lead.external_id is None
    assert event.lead.company is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b"null",
        json.dumps({"event_type": "LeadReceived"}).encode(),  # no lead
        encode(upstream_lead_json(lead={"first_name": "Ada"})),  # lead without email
        encode(upstream_lead_json(occurred_at="2026-11-21T10:00:00")),  # naive timestamp
        encode(upstream_lead_json(event_id="not-a-uuid")),
        encode(upstream_lead_json(tenant_id="")),
        encode(upstream_lead_json(tenant_id="bad tenant!")),
        encode(upstream_lead_json(tenant_id="x" * 65)),
        encode(upstream_lead_json(sequence="s" * 101)),
    ],
)
def test_invalid_lead_payloads_raise_validation_error(raw: bytes) -> None:
    with pytest.raises(ValidationError):
        decode(topics.LEADS, raw)


@pytest.mark.parametrize("event_type", ["LeadRouted", "EmailSent", "leadreceived", "", None])
def test_wrong_event_type_for_leads_topic_is_rejected(event_type: str | None) -> None:
    with pytest.raises(ValidationError):
        decode(topics.LEADS, encode(upstream_lead_json(event_type=event_type)))


def test_event_of_another_topic_is_rejected() -> None:
    raw = lead_routed().to_bytes()
    assert isinstance(decode(topics.LEAD_ROUTED, raw), LeadRouted)
    with pytest.raises(ValidationError):
        decode(topics.LEADS, raw)
    with pytest.raises(ValidationError):
        decode(topics.STEP_DUE, raw)


def test_unknown_topic_is_not_decoded() -> None:
    with pytest.raises(KeyError):
        decode("no-such-topic", encode(upstream_lead_json()))


# ---------------------------------------------------------------------- email-sent


def test_email_sent_topic_accepts_sent_and_failed() -> None:
    sent = decode(topics.EMAIL_SENT, email_sent().to_bytes())
    failed = decode(topics.EMAIL_SENT, email_failed().to_bytes())

    assert isinstance(sent, EmailSent)
    assert sent.links == ["https://example.com/a"]
    assert sent.uncertain is False
    assert isinstance(failed, EmailFailed)
    assert failed.failure is FailureKind.PERMANENT
    assert failed.smtp_code == 550


def test_email_sent_topic_is_discriminated_by_event_type() -> None:
    body = json.loads(email_failed().to_bytes())
    body["event_type"] = "EmailSent"  # failed fields, sent type: missing sent fields
    with pytest.raises(ValidationError):
        decode(topics.EMAIL_SENT, json.dumps(body).encode())

    body["event_type"] = "StepDue"
    with pytest.raises(ValidationError):
        decode(topics.EMAIL_SENT, json.dumps(body).encode())


def test_email_failed_rejects_unknown_failure_kind() -> None:
    body = json.loads(email_failed().to_bytes())
    body["failure"] = "exploded"
    with pytest.raises(ValidationError):
        decode(topics.EMAIL_SENT, json.dumps(body).encode())


# -------------------------------------------------------------------- kafka keys


def test_lead_received_key_is_external_id() -> None:
    event = decode(topics.LEADS, encode(upstream_lead_json()))
    assert event.kafka_key() == b"crm-123"


def test_lead_received_key_falls_back_to_email() -> None:
    body = upstream_lead_json()
    body["lead"] = {k: v for k, v in body["lead"].items() if k != "external_id"}
    event = decode(topics.LEADS, encode(body))
    assert event.kafka_key() == b"ada@example.com"


@pytest.mark.parametrize(
    "event",
    [
        lead_routed(),
        step_due(),
        email_sent(),
        email_failed(),
        engagement(EngagementType.OPENED),
    ],
    ids=lambda e: type(e).__name__,
)
def test_events_about_a_lead_are_keyed_by_lead_id(event: Event) -> None:
    assert event.kafka_key() == str(LEAD_ID).encode()
    assert event.kafka_key() != str(event.event_id).encode()


def test_webhook_is_keyed_by_provider() -> None:
    event = WebhookReceived.from_request("inbound", "message/rfc822", b"x", {})
    assert event.kafka_key() == b"inbound"


# -------------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    ("topic", "event"),
    [
        (topics.LEAD_ROUTED, lead_routed()),
        (topics.STEP_DUE, step_due()),
        (topics.EMAIL_SENT, email_sent(uncertain=True, variant="b")),
        (topics.EMAIL_SENT, email_failed(smtp_code=None, failure=FailureKind.SUPPRESSED)),
        (
            topics.ENGAGEMENT,
            engagement(
                EngagementType.BOUNCED,
                BounceType.SOFT,
                detail={"diagnostic": "452 mailbox full", "n": 2},
                tenant_id="acme.eu-1",
            ),
        ),
        (
            topics.WEBHOOKS_RAW,
            WebhookReceived.from_request(
                "inbound", "message/rfc822", b"\x00\xff raw", {"X-A": "1"}
            ),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_to_bytes_then_decode_round_trips(topic: str, event: Event) -> None:
    decoded = decode(topic, event.to_bytes())
    assert type(decoded) is type(event)
    assert decoded == event


def test_lead_received_round_trips() -> None:
    event = decode(topics.LEADS, encode(upstream_lead_json()))
    again = decode(topics.LEADS, event.to_bytes())
    assert again == event
    assert again.kafka_key() == event.kafka_key()


def test_events_are_frozen() -> None:
    event = email_sent()
    with pytest.raises(ValidationError):
        event.subject = "changed"  # type: ignore[misc]


@given(
    external_id=st.text(min_size=1, max_size=50).filter(lambda s: s.strip() == s and s != ""),
    tags=st.lists(st.text(max_size=10), max_size=5),
    score=st.none() | st.floats(allow_nan=False, allow_infinity=False),
)
@settings(max_examples=100)
def test_any_valid_lead_round_trips(external_id: str, tags: list[str], score: float | None) -> None:
    event = LeadReceived(
        lead=LeadData(email="ada@example.com", external_id=external_id, tags=tags, score=score)
    )
    decoded = decode(topics.LEADS, event.to_bytes())
    assert decoded == event
    assert decoded.kafka_key() == external_id.encode()


# ----------------------------------------------------------------- engagement rules

STOP_AND_SUPPRESS: list[tuple[EngagementType, BounceType | None, bool, bool]] = [
    # (type, bounce type, stops_sequence, suppresses_address)
    (EngagementType.DELIVERED, None, False, False),
    (EngagementType.OPENED, None, False, False),
    (EngagementType.CLICKED, None, False, False),
    (EngagementType.REPLIED, None, True, False),
    (EngagementType.BOUNCED, BounceType.HARD, True, True),
    (EngagementType.BOUNCED, None, True, True),
    (EngagementType.BOUNCED, BounceType.SOFT, False, False),
    (EngagementType.BOUNCED, BounceType.POLICY, False, False),
    (EngagementType.UNSUBSCRIBED, None, True, True),
    (EngagementType.COMPLAINED, None, True, True),
    # An out-of-office pauses; it neither stops nor suppresses.
    (EngagementType.AUTO_REPLIED, None, False, False),
]


@pytest.mark.parametrize(("kind", "bounce", "stops", "suppresses"), STOP_AND_SUPPRESS)
def test_engagement_stop_and_suppress_truth_table(
    kind: EngagementType, bounce: BounceType | None, stops: bool, suppresses: bool
) -> None:
    event = engagement(kind, bounce)
    assert event.stops_sequence is stops
    assert event.suppresses_address is suppresses


def test_truth_table_covers_every_engagement_type() -> None:
    assert {row[0] for row in STOP_AND_SUPPRESS} == set(EngagementType)


@given(kind=st.sampled_from(EngagementType), bounce=st.none() | st.sampled_from(BounceType))
def test_suppression_implies_stop(kind: EngagementType, bounce: BounceType | None) -> None:
    event = engagement(kind, bounce)
    if event.suppresses_address:
        assert event.stops_sequence
    assert not (kind is EngagementType.REPLIED and event.suppresses_address)


def test_engagement_decodes_from_wire_strings() -> None:
    raw = json.dumps(
        {
            "event_type": "EngagementReceived",
            "engagement_type": "bounced",
            "bounce_type": "hard",
            "lead_id": str(LEAD_ID),
            "email": "ada@example.com",
            "source": "postmark",
        }
    ).encode()
    event = decode(topics.ENGAGEMENT, raw)
    assert isinstance(event, EngagementReceived)
    assert event.engagement_type is EngagementType.BOUNCED
    assert event.bounce_type is BounceType.HARD
    assert event.suppresses_address


def test_engagement_rejects_unknown_type() -> None:
    raw = json.dumps(
        {
            "event_type": "EngagementReceived",
            "engagement_type": "forwarded",
            "lead_id": str(LEAD_ID),
            "email": "ada@example.com",
            "source": "x",
        }
    ).encode()
    with pytest.raises(ValidationError):
        decode(topics.ENGAGEMENT, raw)


# ------------------------------------------------------------------------- topics


def test_all_topics_has_each_topic_and_its_dlq() -> None:
    required = {"leads", "lead-routed", "step-due", "email-sent", "engagement", "webhooks-raw"}
    names = topics.all_topics()

    assert required <= set(topics.ALL)
    assert len(names) == len(set(names)) == 2 * len(topics.ALL)
    for topic in topics.ALL:
        assert topic in names
        assert f"{topic}-dlq" in names
        assert topics.dlq(topic) == f"{topic}-dlq"
        assert not topic.endswith(topics.DLQ_SUFFIX)
    # Nothing but the topics and their dead-letter topics.
    assert set(names) == set(topics.ALL) | {f"{t}-dlq" for t in topics.ALL}


def test_every_topic_has_a_contract() -> None:
    assert set(TOPIC_EVENTS) == set(topics.ALL)


# ----------------------------------------------------------------------- webhooks


@given(body=st.binary(max_size=2048))
@settings(max_examples=200)
def test_webhook_body_round_trips_arbitrary_bytes(body: bytes) -> None:
    event = WebhookReceived.from_request("inbound", "message/rfc822", body, {"X-Id": "1"})
    assert event.raw_body() == body

    decoded = decode(topics.WEBHOOKS_RAW, event.to_bytes())
    assert isinstance(decoded, WebhookReceived)
    assert decoded.raw_body() == body
    assert decoded.headers == {"X-Id": "1"}
    assert decoded.provider == "inbound"


def test_sequence_changed_is_keyed_by_tenant_and_sequence_and_round_trips() -> None:
    event = SequenceChanged(
        tenant_id="acme",
        sequence_key="smart_flow",
        sequence_id=SEQUENCE_ID,
        status="active",
        current_version=2,
    )
    assert event.kafka_key() == b"acme:smart_flow"  # one sequence's changes stay in order
    assert decode(topics.SEQUENCES, event.to_bytes()) == event
    deleted = event.model_copy(update={"status": "deleted", "current_version": None})
    assert decode(topics.SEQUENCES, deleted.to_bytes()) == deleted
    for bad in ({"status": "gone"}, {"current_version": 0}, {"sequence_key": ""}):
        with pytest.raises(ValidationError):
            decode(topics.SEQUENCES, json.dumps({**json.loads(event.to_bytes()), **bad}).encode())
