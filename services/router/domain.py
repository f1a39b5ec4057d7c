"""Router decisions: pure functions, no I/O."""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from email_validator import EmailNotValidError, validate_email

from schemas.events import (
    PRESET_SEQUENCE_KEYS,
    BounceType,
    EngagementReceived,
    EngagementType,
    LeadAction,
    LeadData,
    LeadUpdateRequested,
)

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
    if lead.country and not re.fullmatch(r"[A-Za-z]{2}", lead.country):
        raise LeadInvalid(f"country must be an ISO 3166 alpha-2 code, not {lead.country!r}")
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
        tags=normalise_tags(lead.tags),
        custom_fields=dict(lead.custom_fields),
    )


@dataclass(frozen=True, slots=True)
class RoutingRule:
    name: str
    sequence: str
    match: dict[str, Any]
    #: The stored rule's id (None for rules that are not stored, e.g. in tests).
    id: uuid.UUID | None = None


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    route: bool
    sequence: str | None
    reason: str
    #: The rule that fired (None: requested, default, or not routed).
    rule_id: uuid.UUID | None = None


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
        if not SEQUENCE_KEY.fullmatch(requested):
            raise LeadInvalid(f"invalid sequence name {requested!r}")
        return RoutingDecision(True, requested, "requested by the event")
    for rule in rules:
        if rule_matches(rule, lead):
            return RoutingDecision(True, rule.sequence, f"rule {rule.name!r}", rule.id)
    return RoutingDecision(True, default, "default sequence")


# ---------------------------------------------------------------- sequence catalog


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """What the router knows of one sequence of a tenant (from SequenceChanged)."""

    status: str
    current_version: int | None = None


def _unknown(key: str, tenant_id: str, chosen: str | None = None) -> str:
    how = f" ({chosen})" if chosen else ""
    return (
        f"unknown sequence {key!r}{how}: tenant {tenant_id!r} has no such sequence; one"
        " created moments ago may not have reached the router yet"
    )


def _exists(key: str, entry: CatalogEntry | None) -> bool:
    """The preset keys exist for every tenant (nurture creates them on first use) unless
    the catalog says otherwise for that tenant."""
    if entry is None or entry.status == "deleted":
        return key in PRESET_SEQUENCE_KEYS
    return True


def routing_refusal(
    decision: RoutingDecision, entry: CatalogEntry | None, tenant_id: str
) -> str | None:
    """Why a lead cannot go where ``decision`` routes it (None: it can). ``entry`` is
    the catalog's entry for the decision's sequence."""
    key = decision.sequence
    if not decision.route or key is None:
        return None
    if not _exists(key, entry):
        return _unknown(key, tenant_id, decision.reason)
    if entry is not None and entry.status not in ("active", "deleted"):
        return f"sequence {key!r} ({decision.reason}) is {entry.status}: it takes no new leads"
    return None


def rule_refusal(key: str, entry: CatalogEntry | None, tenant_id: str) -> str | None:
    """Why a routing rule cannot name sequence ``key`` (None: it can). A rule may name a
    sequence that is not active now (a draft to be activated, a paused one): leads it
    routes there are refused until it is."""
    return None if _exists(key, entry) else _unknown(key, tenant_id)


# ------------------------------------------------------------- routing rules as data


class RuleInvalid(ValueError):
    """A routing rule breaks a validation rule; the message says which."""


#: The conditions a rule may state (see ``rule_matches``).
RULE_MATCH_KEYS = ("grade", "source", "min_score", "max_score", "tags_any", "tags_all")
MAX_RULE_NAME = 200


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """A validated routing rule, as it is stored (its position is its list index)."""

    name: str
    match: dict[str, Any]
    sequence: str
    enabled: bool = True


#: Seeded for the ``default`` tenant when it has never had rules; grade D and
#: unknown grades fall through to the default sequence.
DEFAULT_RULES: tuple[RuleSpec, ...] = (
    RuleSpec("grade A", {"grade": "A"}, "aggressive_close"),
    RuleSpec("grade B", {"grade": "B"}, "regular_nurture"),
    RuleSpec("grade C", {"grade": "C"}, "long_term_nurture"),
)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _match_strings(key: str, value: Any, *, single_allowed: bool) -> str | list[str]:
    wanted = "a string or a list of strings" if single_allowed else "a list of strings"
    if isinstance(value, str) and single_allowed:
        if not value.strip():
            raise RuleInvalid(f"match.{key} must not be blank")
        return value.strip()
    if not isinstance(value, list):
        raise RuleInvalid(f"match.{key} must be {wanted}, not {_json_type(value)}")
    if not value:
        raise RuleInvalid(f"match.{key} must not be an empty list")
    items: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise RuleInvalid(f"match.{key} must hold non-blank strings only, not {item!r}")
        items.append(item.strip())
    return items


def _match_score(key: str, value: Any) -> float | int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RuleInvalid(f"match.{key} must be a number, not {_json_type(value)}")
    if not math.isfinite(value):
        raise RuleInvalid(f"match.{key} must be a finite number")
    return value


def validate_match(match: Any) -> dict[str, Any]:
    """The conditions of a rule, type-checked; raises RuleInvalid."""
    if not isinstance(match, dict):
        raise RuleInvalid(f"match must be an object, not {_json_type(match)}")
    unknown = sorted(str(k) for k in match if k not in RULE_MATCH_KEYS)
    if unknown:
        raise RuleInvalid(
            f"unknown match key(s) {', '.join(unknown)}; allowed: {', '.join(RULE_MATCH_KEYS)}"
        )
    clean: dict[str, Any] = {}
    for key in RULE_MATCH_KEYS:
        if key not in match:
            continue
        value = match[key]
        if key in ("grade", "source"):
            clean[key] = _match_strings(key, value, single_allowed=True)
        elif key in ("tags_any", "tags_all"):
            clean[key] = _match_strings(key, value, single_allowed=False)
        else:
            clean[key] = _match_score(key, value)
    if "min_score" in clean and "max_score" in clean and clean["min_score"] > clean["max_score"]:
        raise RuleInvalid(
            f"match.min_score ({clean['min_score']}) is greater than"
            f" match.max_score ({clean['max_score']}): the rule could never match"
        )
    return clean


def validate_rule(name: Any, match: Any, sequence: Any, enabled: Any = True) -> RuleSpec:
    """A routing rule as an API caller states it, validated; raises RuleInvalid."""
    if not isinstance(name, str) or not name.strip():
        raise RuleInvalid("name must be a non-blank string")
    name = " ".join(name.split())
    if len(name) > MAX_RULE_NAME:
        raise RuleInvalid(f"name must be at most {MAX_RULE_NAME} characters")
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise RuleInvalid("name must not contain control characters")
    if not isinstance(sequence, str) or not SEQUENCE_KEY.fullmatch(sequence):
        raise RuleInvalid(
            f"sequence must be a sequence key (lower-case letters, digits, '_' and '-',"
            f" at most 100 characters), not {sequence!r}"
        )
    if not isinstance(enabled, bool):
        raise RuleInvalid(f"enabled must be true or false, not {_json_type(enabled)}")
    return RuleSpec(name=name, match=validate_match(match), sequence=sequence, enabled=enabled)


# ---------------------------------------------------------------------- lead status


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


# --------------------------------------------------------------------- lead updates


class UpdateInvalid(ValueError):
    """A lead update request cannot be applied as stated; the message says why."""


@dataclass(frozen=True, slots=True)
class LeadState:
    """What a lead update decision needs to know about the lead."""

    status: str
    tags: tuple[str, ...] = ()
    assigned_to: str | None = None


@dataclass(frozen=True, slots=True)
class LeadUpdate:
    """What to change on a lead; ``None`` fields stay as they are."""

    changed_by: str
    status: StatusChange | None = None
    #: The lead's whole new tag list.
    tags: list[str] | None = None
    assigned_to: str | None = None

    @property
    def changes_anything(self) -> bool:
        return self.status is not None or self.tags is not None or self.assigned_to is not None


def normalise_tags(tags: Sequence[str]) -> list[str]:
    """Trimmed, lower-cased, unique, sorted; blank tags dropped."""
    return sorted({t.strip().lower() for t in tags if t.strip()})


def decide_lead_update(state: LeadState, event: LeadUpdateRequested) -> LeadUpdate:
    """How a sequence action changes a lead; raises UpdateInvalid for a bad request.

    A status that does not change is no change (nothing is recorded). A lead that is
    ``lost`` or ``invalid`` (unsubscribed, complained, hard-bounced) is not moved back
    to a routable status by a sequence action: such a request usually raced the
    unsubscribe or bounce, and it is ignored rather than dead-lettered.
    """
    changed_by = event.requested_by.strip() or "lead-updates"
    reason = event.reason.strip() or event.action.value
    nothing = LeadUpdate(changed_by)
    action = event.action
    if action in (LeadAction.UPDATE_STATUS, LeadAction.MARK_QUALIFIED):
        if action is LeadAction.MARK_QUALIFIED:
            target = "qualified"
        elif event.status is None:
            raise UpdateInvalid("update_status needs a status")
        elif event.status not in LEAD_STATUSES:
            raise UpdateInvalid(
                f"status must be one of {', '.join(LEAD_STATUSES)}, not {event.status!r}"
            )
        else:
            target = event.status
        if target == state.status:
            return nothing
        if state.status in SUPPRESSED_STATUSES and target not in SUPPRESSED_STATUSES:
            return nothing
        return LeadUpdate(changed_by, status=StatusChange(target, reason))
    if action is LeadAction.TAG:
        wanted = normalise_tags(event.tags)
        if not wanted:
            raise UpdateInvalid("tag_lead needs at least one non-blank tag")
        merged = normalise_tags([*state.tags, *wanted])
        return nothing if merged == list(state.tags) else LeadUpdate(changed_by, tags=merged)
    if action is LeadAction.ASSIGN:
        assignee = " ".join((event.assignee or "").split())
        if not assignee:
            raise UpdateInvalid("assign_to_user needs an assignee")
        if assignee == state.assigned_to:
            return nothing
        return LeadUpdate(changed_by, assigned_to=assignee)
    raise UpdateInvalid(f"unknown action {action!r}")  # pragma: no cover - the enum is closed
