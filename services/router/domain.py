"""Router decisions: pure functions, no I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

from schemas.events import BounceType, EngagementReceived, EngagementType, LeadData

SEQUENCE_KEY = re.compile(r"^[a-z0-9][a-z0-9_-]{0,99}$")

LEAD_STATUSES = ("new", "contacted", "qualified", "lost", "invalid")
#: Statuses that keep a lead out of every sequence.
SUPPRESSED_STATUSES = frozenset({"lost", "invalid"})


class LeadInvalid(ValueError):
    """The lead breaks a validation rule; the message says which."""


@dataclass(frozen=True, slots=True)
class NormalisedLead:
    email: str
    external_id: str | None
    first_name: str | None
    last_name: str | None
    company: str | None
    title: str | None
    timezone: str | None
    country: str | None
    grade: str | None
    score: float | None
    source: str | None
    tags: list[str] = field(default_factory=list)
    custom_fields: dict[str, Any] = field(default_factory=dict)


def normalise_email(raw: str) -> str:
    """Syntax and domain shape checked, lower-cased; raises LeadInvalid."""
    candidate = raw.strip()
    if any(c in candidate for c in "\r\n\t\0"):
        raise LeadInvalid("email contains control characters")
    try:
        result = validate_email(candidate, check_deliverability=False)
    except EmailNotValidError as exc:
        raise LeadInvalid(f"invalid email {candidate!r}: {exc}") from exc
    return result.normalized.lower()


def validate_timezone(name: str | None) -> str | None:
    if name is None or not name.strip():
        return None
    try:
        ZoneInfo(name.strip())
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise LeadInvalid(f"unknown timezone {name!r}") from exc
    return name.strip()


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = " ".join(value.split())
    if any(c in value for c in "\r\n\0"):
        raise LeadInvalid("names may not contain line breaks")
    return value or None


def normalise_lead(lead: LeadData) -> NormalisedLead:
    country = lead.country.upper() if lead.country else None
    if country is not None and not re.fullmatch(r"[A-Z]{2}", country):
        raise LeadInvalid(f"country must be an ISO 3166 alpha-2 code, not {lead.country!r}")
    return NormalisedLead(
        email=normalise_email(lead.email),
        external_id=_clean(lead.external_id),
        first_name=_clean(lead.first_name),
        last_name=_clean(lead.last_name),
        company=_clean(lead.company),
        title=_clean(lead.title),
        timezone=validate_timezone(lead.timezone),
        country=country,
        grade=lead.grade.strip().upper() if lead.grade else None,
        score=lead.score,
        source=_clean(lead.source),
        tags=sorted({t.strip().lower() for t in lead.tags if t.strip()}),
        custom_fields=dict(lead.custom_fields),
    )


@dataclass(frozen=True, slots=True)
class RoutingRule:
    name: str
    sequence: str
    match: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    route: bool
    sequence: str | None
    reason: str


def rule_matches(rule: RoutingRule, lead: NormalisedLead) -> bool:
    """A rule matches when every condition it states holds (an empty rule always does).

    Conditions: ``grade`` (one or a list), ``min_score``/``max_score``, ``source`` (one
    or a list), ``tags_any`` (at least one), ``tags_all`` (every one).
    """
    m = rule.match

    def one_of(key: str, value: str | None) -> bool:
        wanted = m[key]
        options = [wanted] if isinstance(wanted, str) else list(wanted)
        return value is not None and value.lower() in {str(o).lower() for o in options}

    if "grade" in m and not one_of("grade", lead.grade):
        return False
    if "source" in m and not one_of("source", lead.source):
        return False
    if "min_score" in m and (lead.score is None or lead.score < float(m["min_score"])):
        return False
    if "max_score" in m and (lead.score is None or lead.score > float(m["max_score"])):
        return False
    tags = set(lead.tags)
    if "tags_any" in m and not tags & {str(t).lower() for t in m["tags_any"]}:
        return False
    return not ("tags_all" in m and not {str(t).lower() for t in m["tags_all"]} <= tags)


def choose_sequence(
    lead: NormalisedLead,
    status: str,
    requested: str | None,
    rules: list[RoutingRule],
    default: str,
) -> RoutingDecision:
    if status in SUPPRESSED_STATUSES:
        return RoutingDecision(False, None, f"not routed: lead is {status}")
    if requested:
        if not SEQUENCE_KEY.match(requested):
            raise LeadInvalid(f"invalid sequence name {requested!r}")
        return RoutingDecision(True, requested, "requested by the event")
    for rule in rules:
        if rule_matches(rule, lead):
            return RoutingDecision(True, rule.sequence, f"rule {rule.name!r}")
    return RoutingDecision(True, default, "default sequence")


@dataclass(frozen=True, slots=True)
class StatusChange:
    to_status: str
    reason: str


def status_after_engagement(current: str, engagement: EngagementReceived) -> StatusChange | None:
    """How engagement moves a lead's status (None: it does not)."""
    kind = engagement.engagement_type
    if kind is EngagementType.BOUNCED:
        if engagement.bounce_type in (None, BounceType.HARD) and current != "invalid":
            return StatusChange("invalid", "hard bounce")
        return None
    if kind in (EngagementType.UNSUBSCRIBED, EngagementType.COMPLAINED):
        if current in ("lost", "invalid"):
            return None
        return StatusChange(
            "lost", "unsubscribed" if kind is EngagementType.UNSUBSCRIBED else "spam complaint"
        )
    if kind is EngagementType.REPLIED and current == "new":
        return StatusChange("contacted", "replied")
    return None
