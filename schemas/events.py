"""Event contracts: one envelope, one model per event.

Every event travels as JSON with the envelope fields (``event_id``, ``event_type``,
``schema_version``, ``occurred_at``, ``tenant_id``) next to its own fields. The
Kafka key is the lead id (for ``leads``: the lead's external id or email), so one
lead's events stay in order on one partition.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    field_validator,
)

from schemas import topics

TenantId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class Event(BaseModel):
    """The envelope every event shares."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    event_type: str
    schema_version: int = 1
    occurred_at: AwareDatetime = Field(default_factory=_utcnow)
    tenant_id: TenantId = "default"

    def kafka_key(self) -> bytes:
        """The partitioning key: the lead this event is about."""
        lead_id = getattr(self, "lead_id", None)
        return str(lead_id).encode() if lead_id is not None else str(self.event_id).encode()

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


# --------------------------------------------------------------------------- leads


class LeadData(BaseModel):
    """A lead as upstream systems describe it."""

    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)

    email: str = Field(min_length=3, max_length=320)
    external_id: str | None = Field(default=None, max_length=200)
    first_name: str | None = Field(default=None, max_length=200)
    last_name: str | None = Field(default=None, max_length=200)
    company: str | None = Field(default=None, max_length=300)
    title: str | None = Field(default=None, max_length=300)
    timezone: str | None = Field(default=None, max_length=64)
    country: str | None = Field(default=None, max_length=2)
    grade: str | None = Field(default=None, max_length=16)
    score: float | None = None
    source: str | None = Field(default=None, max_length=100)
    tags: list[str] = Field(default_factory=list)
    custom_fields: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("first_name", "last_name", "company", "title", "external_id", "source")
    @classmethod
    def _blank_is_none(cls, value: str | None) -> str | None:
        return value or None


class LeadReceived(Event):
    """Upstream says: here is a lead (topic ``leads``)."""

    event_type: Literal["LeadReceived"] = "LeadReceived"
    lead: LeadData
    sequence: str | None = Field(default=None, max_length=100)

    def kafka_key(self) -> bytes:
        return (self.lead.external_id or self.lead.email).encode()


class LeadSnapshot(BaseModel):
    """What downstream services need to know about a lead to act on it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    email: str
    external_id: str | None = None
    first_name: str | None = None
    last_name: str | None = None
    company: str | None = None
    title: str | None = None
    timezone: str | None = None
    country: str | None = None
    custom_fields: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class LeadRouted(Event):
    """The router chose a sequence for a lead (topic ``lead-routed``)."""

    event_type: Literal["LeadRouted"] = "LeadRouted"
    lead_id: uuid.UUID
    lead: LeadSnapshot
    sequence: str
    routing_reason: str


# ------------------------------------------------------------------------- nurture


class LeadAction(StrEnum):
    UPDATE_STATUS = "update_status"
    TAG = "tag_lead"
    MARK_QUALIFIED = "mark_qualified"
    ASSIGN = "assign_to_user"


class LeadUpdateRequested(Event):
    """A sequence action asks the router to change a lead (topic ``lead-updates``)."""

    event_type: Literal["LeadUpdateRequested"] = "LeadUpdateRequested"
    lead_id: uuid.UUID
    action: LeadAction
    #: For ``update_status``: the new status (``mark_qualified`` means "qualified").
    status: str | None = None
    tags: list[str] = Field(default_factory=list)
    assignee: str | None = Field(default=None, max_length=200)
    reason: str = ""
    #: Who asks, e.g. "sequence:aggressive_close v2 step s5".
    requested_by: str
    enrollment_id: uuid.UUID | None = None


class RenderedMessage(BaseModel):
    """A fully rendered email: the sender never renders templates."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    to_email: str
    to_name: str | None = None
    subject: str
    text: str
    html: str | None = None


class StepDue(Event):
    """An email step is due: send it (topic ``step-due``)."""

    event_type: Literal["StepDue"] = "StepDue"
    lead_id: uuid.UUID
    enrollment_id: uuid.UUID
    sequence_id: uuid.UUID
    sequence_key: str
    sequence_version: int
    step_id: uuid.UUID
    step_index: int
    variant: str | None = None
    delivery_key: str = Field(min_length=1, max_length=200)
    #: The delivery key of the first email of the enrollment; follow-ups thread to it.
    thread_delivery_key: str | None = None
    due_at: AwareDatetime
    message: RenderedMessage
    tracking: bool = True


class EnrollmentStopped(Event):
    """Nurture stopped an enrollment that may still have an email waiting at the sender
    (topic ``step-due``, keyed by the lead, so it follows that email's StepDue): the
    sender cancels whatever of the enrollment it has not handed off yet."""

    event_type: Literal["EnrollmentStopped"] = "EnrollmentStopped"
    lead_id: uuid.UUID
    enrollment_id: uuid.UUID
    reason: str = Field(min_length=1, max_length=1000)


# ---------------------------------------------------------------------- sequences

#: The built-in sequences. Nurture creates them for a tenant on first use, so they
#: exist for every tenant unless that tenant has a sequence of the same key.
PRESET_SEQUENCE_KEYS: tuple[str, ...] = (
    "aggressive_close",
    "regular_nurture",
    "long_term_nurture",
    "cold_outreach",
)


class SequenceChanged(Event):
    """A sequence was created, activated, paused, archived, deleted (a draft) or got a
    new version (topic ``sequences``, keyed by tenant and sequence key). The router keeps
    the latest of each in its catalog, to refuse leads and routing rules that name a
    sequence that does not exist or takes no leads."""

    event_type: Literal["SequenceChanged"] = "SequenceChanged"
    sequence_key: str = Field(min_length=1, max_length=100)
    sequence_id: uuid.UUID
    status: Literal["draft", "active", "paused", "archived", "deleted"]
    #: The version new enrollments join (None once deleted).
    current_version: int | None = Field(default=None, ge=1)

    def kafka_key(self) -> bytes:
        return f"{self.tenant_id}:{self.sequence_key}".encode()


# -------------------------------------------------------------------------- sender


class EmailSent(Event):
    """An SMTP server or provider accepted the message (topic ``email-sent``)."""

    event_type: Literal["EmailSent"] = "EmailSent"
    lead_id: uuid.UUID
    enrollment_id: uuid.UUID
    sequence_id: uuid.UUID
    sequence_key: str
    sequence_version: int
    step_id: uuid.UUID
    step_index: int
    variant: str | None = None
    delivery_key: str
    message_id: str
    to_email: str
    from_email: str
    subject: str
    sent_at: AwareDatetime
    links: list[str] = Field(default_factory=list)
    #: The process died between the server's acceptance and the commit: the
    #: message was most probably sent, but that is not certain.
    uncertain: bool = False
    #: A dry run: built and recorded, never handed to a server.
    dry_run: bool = False
    #: The transport that accepted it, and the provider's own id for the message.
    transport: str | None = None
    provider_message_id: str | None = None


class BounceType(StrEnum):
    """How a rejection or bounce is classified: only ``hard`` means the address is bad."""

    HARD = "hard"
    SOFT = "soft"
    POLICY = "policy"


class FailureKind(StrEnum):
    PERMANENT = "permanent"  # the server rejected it for good (5xx)
    INVALID = "invalid"  # the message could not be built (bad address, header injection)
    SUPPRESSED = "suppressed"  # the recipient is on the suppression list
    CANCELLED = "cancelled"  # the enrollment stopped before the send


class EmailFailed(Event):
    """The message will not be sent (topic ``email-sent``)."""

    event_type: Literal["EmailFailed"] = "EmailFailed"
    lead_id: uuid.UUID
    enrollment_id: uuid.UUID
    sequence_id: uuid.UUID
    step_id: uuid.UUID
    step_index: int
    delivery_key: str
    to_email: str
    failure: FailureKind
    reason: str
    smtp_code: int | None = None
    #: For a server's rejection: the RFC 3463 enhanced status code (e.g. "5.1.1") and
    #: its classification; only a hard rejection means the address itself is bad.
    enhanced_status: str | None = None
    bounce_type: BounceType | None = None


# ------------------------------------------------------------------------- tracker


class EngagementType(StrEnum):
    DELIVERED = "delivered"
    OPENED = "opened"
    CLICKED = "clicked"
    REPLIED = "replied"
    BOUNCED = "bounced"
    UNSUBSCRIBED = "unsubscribed"
    COMPLAINED = "complained"
    #: An automatic answer (out of office, ticket acknowledgement): not a reply.
    AUTO_REPLIED = "auto_replied"


class EngagementReceived(Event):
    """The recipient did something with a message we sent (topic ``engagement``)."""

    event_type: Literal["EngagementReceived"] = "EngagementReceived"
    engagement_type: EngagementType
    lead_id: uuid.UUID
    enrollment_id: uuid.UUID | None = None
    sequence_id: uuid.UUID | None = None
    sequence_key: str | None = None
    sequence_version: int | None = None
    step_id: uuid.UUID | None = None
    step_index: int | None = None
    variant: str | None = None
    delivery_key: str | None = None
    message_id: str | None = None
    email: str
    #: Where the fact came from: pixel, click, unsubscribe, inbound, or a provider name.
    source: str
    bounce_type: BounceType | None = None
    #: An open or click made by a machine (privacy proxy, link scanner), not a person.
    machine: bool = False
    url: str | None = None
    provider_event_id: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)

    @property
    def stops_sequence(self) -> bool:
        """Reply, hard bounce, unsubscribe and complaint end a lead's outreach."""
        if self.engagement_type is EngagementType.BOUNCED:
            return self.bounce_type in (None, BounceType.HARD)
        return self.engagement_type in (
            EngagementType.REPLIED,
            EngagementType.UNSUBSCRIBED,
            EngagementType.COMPLAINED,
        )

    @property
    def suppresses_address(self) -> bool:
        """Unsubscribe, hard bounce and complaint put the address on suppression lists."""
        return self.stops_sequence and self.engagement_type is not EngagementType.REPLIED


class WebhookReceived(Event):
    """A verified provider webhook or inbound email, raw (topic ``webhooks-raw``)."""

    event_type: Literal["WebhookReceived"] = "WebhookReceived"
    provider: str
    content_type: str
    #: The raw request body as latin-1 text: a lossless byte-for-character mapping
    #: (``body.encode("latin-1")`` gives the exact bytes back).
    body: str
    headers: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_request(
        cls, provider: str, content_type: str, body: bytes, headers: dict[str, str]
    ) -> WebhookReceived:
        return cls(
            provider=provider,
            content_type=content_type,
            body=body.decode("latin-1"),
            headers=headers,
        )

    def raw_body(self) -> bytes:
        return self.body.encode("latin-1")

    def kafka_key(self) -> bytes:
        return self.provider.encode()


# ------------------------------------------------------------------ topic contracts

LeadsEvent = LeadReceived
LeadRoutedEvent = LeadRouted
StepDueEvent = Annotated[StepDue | EnrollmentStopped, Field(discriminator="event_type")]
EmailOutcome = Annotated[EmailSent | EmailFailed, Field(discriminator="event_type")]
EngagementEvent = EngagementReceived
WebhooksRawEvent = WebhookReceived

#: What may travel on each topic, as a pydantic adapter that validates raw bytes.
TOPIC_EVENTS: dict[str, TypeAdapter[Any]] = {
    topics.LEADS: TypeAdapter(LeadReceived),
    topics.LEAD_ROUTED: TypeAdapter(LeadRouted),
    topics.STEP_DUE: TypeAdapter(StepDueEvent),
    topics.EMAIL_SENT: TypeAdapter(EmailOutcome),
    topics.ENGAGEMENT: TypeAdapter(EngagementReceived),
    topics.WEBHOOKS_RAW: TypeAdapter(WebhookReceived),
    topics.LEAD_UPDATES: TypeAdapter(LeadUpdateRequested),
    topics.SEQUENCES: TypeAdapter(SequenceChanged),
}


#: Namespace of the event ids derived for upstream leads published without one.
LEADS_EVENT_ID_NAMESPACE = uuid.UUID("5b0c7f2e-3d1a-4e8b-9c6f-2a7d4e1b8c90")


def derived_event_id(raw: bytes) -> uuid.UUID:
    """The event id of a record that carries none: the same bytes, the same id, so a
    redelivered record is recognised as the event already applied."""
    return uuid.uuid5(LEADS_EVENT_ID_NAMESPACE, hashlib.sha256(raw).hexdigest())


def decode(topic: str, raw: bytes) -> Event:
    """Validate raw bytes from ``topic`` into its event model.

    A ``LeadReceived`` without an ``event_id`` (upstream may omit it) gets one
    derived from the record's bytes, never a random one: a Kafka redelivery of the
    record then carries the same id and the consumer's inbox skips it.

    Raises ``pydantic.ValidationError`` (or ``ValueError``) when the bytes are not a
    valid event for that topic.
    """
    adapter = TOPIC_EVENTS[topic]
    event: Event = adapter.validate_json(raw)
    if topic == topics.LEADS and "event_id" not in event.model_fields_set:
        event = event.model_copy(update={"event_id": derived_event_id(raw)})
    return event
