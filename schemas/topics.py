"""The one registry of Kafka topic names."""

from __future__ import annotations

from typing import Final

LEADS: Final = "leads"
LEAD_ROUTED: Final = "lead-routed"
#: StepDue, and EnrollmentStopped when nurture stops an enrollment (same key: the lead).
STEP_DUE: Final = "step-due"
EMAIL_SENT: Final = "email-sent"
ENGAGEMENT: Final = "engagement"
WEBHOOKS_RAW: Final = "webhooks-raw"
#: Sequence actions on a lead (status, tags, owner), applied by the router.
LEAD_UPDATES: Final = "lead-updates"
#: Nurture's sequence catalog (SequenceChanged), kept by the router.
SEQUENCES: Final = "sequences"

ALL: Final[tuple[str, ...]] = (
    LEADS,
    LEAD_ROUTED,
    STEP_DUE,
    EMAIL_SENT,
    ENGAGEMENT,
    WEBHOOKS_RAW,
    LEAD_UPDATES,
    SEQUENCES,
)

DLQ_SUFFIX: Final = "-dlq"

#: Topic settings `touchstream topics create` applies (deploy/topics.yaml has the full
#: production layout). The catalog is compacted: the latest SequenceChanged of every
#: sequence stays, so a router with an empty database can rebuild it.
CONFIGS: Final[dict[str, dict[str, str]]] = {SEQUENCES: {"cleanup.policy": "compact"}}


def dlq(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return topic + DLQ_SUFFIX


def all_topics() -> list[str]:
    """Every topic the system uses, dead-letter topics included."""
    return [name for topic in ALL for name in (topic, dlq(topic))]
