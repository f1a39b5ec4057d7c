"""Router decisions (services/router/domain.py): normalisation, routing, status moves."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import (
    PRESET_SEQUENCE_KEYS,
    BounceType,
    EngagementReceived,
    EngagementType,
    LeadData,
)
from services.router.domain import (
    LEAD_STATUSES,
    SUPPRESSED_STATUSES,
    CatalogEntry,
    LeadInvalid,
    NormalisedLead,
    RoutingDecision,
    RoutingRule,
    StatusChange,
    choose_sequence,
    normalise_email,
    normalise_lead,
    routing_refusal,
    rule_matches,
    rule_refusal,
    status_after_engagement,
    validate_timezone,
)

DEFAULT = "cold_outreach"


def lead(**fields: Any) -> NormalisedLead:
    base: dict[str, Any] = {"email": "ada@example.com"}
    base.update(fields)
    return normalise_lead(LeadData(**base))


def engagement(kind: EngagementType, bounce: BounceType | None = None) -> EngagementReceived:
    return EngagementReceived(
        engagement_type=kind,
        lead_id=uuid.uuid4(),
        email="ada@example.com",
        source="test",
        bounce_type=bounce,
    )


def rule(name: str, sequence: str, **match: Any) -> RoutingRule:
    return RoutingRule(name=name, sequence=sequence, match=match)


# -------------------------------------------------------------------------- email


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("ada@example.com", "ada@example.com"),
        ("Ada.Lovelace@Example.COM", "ada.lovelace@example.com"),
        ("  ADA@EXAMPLE.COM  ", "ada@example.com"),
        ("ada+crm@sub.example.co.uk", "ada+crm@sub.example.co.uk"),
    ],
)
def test_normalise_email_lower_cases_and_trims(raw: str, expected: str) -> None:
    assert normalise_email(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "ada",
        "ada@",
        "@example.com",
        "ada@@example.com",
        "ada example@example.com",
        "ada@example..com",
        "ada@-example.com",
        "ada@example.com>",
        "<ada@example.com>",
        "Ada <ada@example.com>",
    ],
)
def test_normalise_email_rejects_bad_syntax(raw: str) -> None:
    with pytest.raises(LeadInvalid):
        normalise_email(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "ada@example.com\r\nBcc: eve@example.com",
        "ada\r\n@example.com",
        "ada@exa\nmple.com",
        "ada@exam\rple.com",
        "ada\t@example.com",
        "ada\x00@example.com",
    ],
)
def test_normalise_email_rejects_control_characters(raw: str) -> None:
    with pytest.raises(LeadInvalid):
        normalise_email(raw)


@given(
    local=st.text(
        alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
        min_size=1,
        max_size=20,
    ),
    domain=st.sampled_from(["example.com", "Example.ORG", "mail.example.co.uk"]),
)
@settings(max_examples=50)
def test_normalise_email_is_idempotent_and_lower_case(local: str, domain: str) -> None:
    once = normalise_email(f"{local}@{domain}")
    assert once == once.lower()
    assert once == f"{local}@{domain}".lower()
    assert normalise_email(once) == once


# --------------------------------------------------------------------------- lead


def test_normalise_lead_trims_and_collapses_names() -> None:
    result = lead(
        email=" Ada@Example.com ",
        first_name="  Ada   Augusta ",
        last_name="King \t Lovelace",
        company=" Analytical   Engines  Ltd ",
        title=" Chief   Technology Officer",
        external_id=" crm-123 ",
        source=" Web  form ",
    )
    assert result.email == "ada@example.com"
    assert result.first_name == "Ada Augusta"
    assert result.last_name == "King Lovelace"
    assert result.company == "Analytical Engines Ltd"
    assert result.title == "Chief Technology Officer"
    assert result.external_id == "crm-123"
    assert result.source == "Web form"


def test_normalise_lead_turns_line_breaks_in_names_into_spaces() -> None:
    result = lead(first_name="Ada\r\nBcc: x", company="Acme\nInc")
    assert result.first_name == "Ada Bcc: x"
    assert result.company == "Acme Inc"
    for value in (result.first_name, result.company):
        assert "\r" not in value and "\n" not in value


def test_normalise_lead_blank_optional_fields_become_none() -> None:
    result = lead(first_name="   ", company="", title=None, timezone="  ")
    assert result.first_name is None
    assert result.company is None
    assert result.title is None
    assert result.timezone is None


@pytest.mark.parametrize("tz", ["Europe/London", "America/New_York", "UTC", "Asia/Kolkata"])
def test_known_timezones_are_kept(tz: str) -> None:
    assert lead(timezone=tz).timezone == tz
    assert validate_timezone(f" {tz} ") == tz


@pytest.mark.parametrize("tz", ["Mars/Olympus_Mons", "Europe/Londn", "GMT+25", "../etc/passwd"])
def test_unknown_timezone_is_invalid(tz: str) -> None:
    with pytest.raises(LeadInvalid, match="timezone"):
        lead(timezone=tz)


def test_grade_and_country_are_upper_cased() -> None:
    result = lead(grade=" a ", country="gb")
    assert result.grade == "A"
    assert result.country == "GB"


@pytest.mark.parametrize("country", ["G", "1A", "g1", "--"])
def test_bad_country_is_invalid(country: str) -> None:
    with pytest.raises(LeadInvalid, match="country"):
        lead(country=country)


def test_non_ascii_country_is_invalid() -> None:
    with pytest.raises(LeadInvalid):
        lead(country="ß")


def test_tags_are_lower_cased_deduplicated_and_sorted() -> None:
    result = lead(tags=["VIP", " vip ", "Enterprise", "", "  "])
    assert result.tags == ["enterprise", "vip"]


def test_bad_email_makes_the_lead_invalid() -> None:
    with pytest.raises(LeadInvalid):
        lead(email="not-an-email")


def test_other_fields_pass_through() -> None:
    result = lead(score=42.5, custom_fields={"plan": "pro", "seats": 10})
    assert result.score == 42.5
    assert result.custom_fields == {"plan": "pro", "seats": 10}


@given(
    words=st.lists(
        st.text(alphabet="abcXYZ\u00e9", min_size=1, max_size=6), min_size=1, max_size=5
    ),
    gaps=st.lists(st.sampled_from([" ", "  ", "\t", "\n", "\r\n", " \u00a0"]), min_size=6),
)
@settings(max_examples=100)
def test_name_whitespace_is_collapsed(words: list[str], gaps: list[str]) -> None:
    raw = gaps[0] + "".join(w + g for w, g in zip(words, gaps[1:], strict=False))
    result = lead(first_name=raw)
    assert result.first_name == " ".join(words)


# ------------------------------------------------------------------------ routing

RULES = [
    rule("hot", "aggressive_close", grade="A"),
    rule("warm by score", "regular_nurture", min_score=50, max_score=80),
    rule("events", "long_term_nurture", source=["Webinar", "conference"]),
    rule("any enterprise", "enterprise_seq", tags_any=["enterprise", "strategic"]),
    rule("both", "both_seq", tags_all=["partner", "emea"]),
]


def test_requested_sequence_wins_over_rules() -> None:
    decision = choose_sequence(lead(grade="A"), "new", "regular_nurture", RULES, DEFAULT)
    assert decision.route is True
    assert decision.sequence == "regular_nurture"
    assert "requested" in decision.reason


@pytest.mark.parametrize("status", sorted(SUPPRESSED_STATUSES))
def test_suppressed_statuses_are_not_routed(status: str) -> None:
    for requested in (None, "aggressive_close"):
        decision = choose_sequence(lead(grade="A"), status, requested, RULES, DEFAULT)
        assert decision.route is False
        assert decision.sequence is None
        assert status in decision.reason


def test_suppressed_statuses_are_lost_and_invalid() -> None:
    assert {"lost", "invalid"} == SUPPRESSED_STATUSES
    assert set(LEAD_STATUSES) > SUPPRESSED_STATUSES


@pytest.mark.parametrize("status", ["new", "contacted", "qualified"])
def test_other_statuses_are_routed(status: str) -> None:
    decision = choose_sequence(lead(), status, None, RULES, DEFAULT)
    assert decision.route is True
    assert decision.sequence == DEFAULT


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"grade": "a"}, "aggressive_close"),
        ({"grade": "B", "score": 50}, "regular_nurture"),
        ({"score": 80}, "regular_nurture"),
        ({"score": 80.01}, DEFAULT),
        ({"score": 49.99}, DEFAULT),
        ({"source": "webinar"}, "long_term_nurture"),
        ({"source": "CONFERENCE"}, "long_term_nurture"),
        ({"source": "cold call"}, DEFAULT),
        ({"tags": ["Strategic"]}, "enterprise_seq"),
        ({"tags": ["partner"]}, DEFAULT),
        ({"tags": ["partner", "emea", "other"]}, "both_seq"),
        ({}, DEFAULT),
    ],
)
def test_rules_route_by_condition(fields: dict[str, Any], expected: str) -> None:
    decision = choose_sequence(lead(**fields), "new", None, RULES, DEFAULT)
    assert decision.route is True
    assert decision.sequence == expected


def test_first_matching_rule_wins() -> None:
    subject = lead(grade="A", score=60, source="webinar", tags=["enterprise"])
    decision = choose_sequence(subject, "new", None, RULES, DEFAULT)
    assert decision.sequence == "aggressive_close"
    assert decision.reason == "rule 'hot'"

    decision = choose_sequence(subject, "new", None, list(reversed(RULES)), DEFAULT)
    assert decision.sequence == "enterprise_seq"
    assert decision.reason == "rule 'any enterprise'"


def test_default_fallback() -> None:
    decision = choose_sequence(lead(grade="Z"), "new", None, RULES, DEFAULT)
    assert decision == dataclasses.replace(decision, route=True, sequence=DEFAULT)
    assert decision.reason == "default sequence"
    assert choose_sequence(lead(), "new", None, [], "x").sequence == "x"


def test_empty_rule_matches_everything() -> None:
    assert rule_matches(rule("all", "s"), lead())
    decision = choose_sequence(lead(), "new", None, [rule("all", "catch_all")], DEFAULT)
    assert decision.sequence == "catch_all"


def test_grade_rule_accepts_a_list() -> None:
    hot_or_warm = rule("g", "s", grade=["A", "b"])
    assert rule_matches(hot_or_warm, lead(grade="B"))
    assert not rule_matches(hot_or_warm, lead(grade="C"))
    assert not rule_matches(hot_or_warm, lead())


def test_score_rules_need_a_score() -> None:
    assert not rule_matches(rule("min", "s", min_score=0), lead())
    assert not rule_matches(rule("max", "s", max_score=100), lead())
    assert rule_matches(rule("min", "s", min_score="10"), lead(score=10))


def test_all_conditions_of_a_rule_must_hold() -> None:
    strict = rule("strict", "s", grade="A", min_score=90, tags_any=["vip"])
    assert rule_matches(strict, lead(grade="A", score=95, tags=["VIP"]))
    assert not rule_matches(strict, lead(grade="A", score=95))
    assert not rule_matches(strict, lead(grade="A", score=89, tags=["vip"]))
    assert not rule_matches(strict, lead(grade="B", score=95, tags=["vip"]))


@pytest.mark.parametrize(
    "requested",
    ["Aggressive_Close", "has space", "-leading-dash", "x" * 101, "../etc", "seq;drop", "é"],
)
def test_invalid_requested_sequence_name_raises(requested: str) -> None:
    with pytest.raises(LeadInvalid, match="sequence"):
        choose_sequence(lead(), "new", requested, RULES, DEFAULT)


def test_requested_sequence_with_trailing_newline_raises() -> None:
    with pytest.raises(LeadInvalid):
        choose_sequence(lead(), "new", "aggressive_close\n", RULES, DEFAULT)


def test_empty_requested_sequence_means_not_requested() -> None:
    decision = choose_sequence(lead(grade="A"), "new", "", RULES, DEFAULT)
    assert decision.sequence == "aggressive_close"


@given(score=st.floats(min_value=-1e6, max_value=1e6, allow_nan=False))
@settings(max_examples=100)
def test_score_window_is_inclusive(score: float) -> None:
    window = rule("w", "s", min_score=50, max_score=80)
    assert rule_matches(window, lead(score=score)) is (50 <= score <= 80)


# ---------------------------------------------------------------- status changes


@pytest.mark.parametrize(
    ("current", "expected"),
    [("new", "contacted"), ("contacted", None), ("qualified", None), ("lost", None)],
)
def test_reply_moves_new_to_contacted_only(current: str, expected: str | None) -> None:
    change = status_after_engagement(current, engagement(EngagementType.REPLIED))
    if expected is None:
        assert change is None
    else:
        assert change == StatusChange(expected, "replied")


@pytest.mark.parametrize("kind", [EngagementType.UNSUBSCRIBED, EngagementType.COMPLAINED])
@pytest.mark.parametrize("current", ["new", "contacted", "qualified"])
def test_unsubscribe_and_complaint_make_the_lead_lost(kind: EngagementType, current: str) -> None:
    change = status_after_engagement(current, engagement(kind))
    assert change is not None
    assert change.to_status == "lost"
    expected_reason = "unsubscribed" if kind is EngagementType.UNSUBSCRIBED else "spam complaint"
    assert change.reason == expected_reason


@pytest.mark.parametrize("kind", [EngagementType.UNSUBSCRIBED, EngagementType.COMPLAINED])
@pytest.mark.parametrize("current", ["lost", "invalid"])
def test_unsubscribe_does_not_change_lost_or_invalid(kind: EngagementType, current: str) -> None:
    assert status_after_engagement(current, engagement(kind)) is None


@pytest.mark.parametrize("bounce", [BounceType.HARD, None])
@pytest.mark.parametrize("current", ["new", "contacted", "qualified", "lost"])
def test_hard_bounce_makes_the_lead_invalid(bounce: BounceType | None, current: str) -> None:
    change = status_after_engagement(current, engagement(EngagementType.BOUNCED, bounce))
    assert change == StatusChange("invalid", "hard bounce")


def test_hard_bounce_of_an_invalid_lead_changes_nothing() -> None:
    bounced = engagement(EngagementType.BOUNCED, BounceType.HARD)
    assert status_after_engagement("invalid", bounced) is None


@pytest.mark.parametrize("bounce", [BounceType.SOFT, BounceType.POLICY])
@pytest.mark.parametrize("current", LEAD_STATUSES)
def test_soft_bounce_changes_nothing(bounce: BounceType, current: str) -> None:
    assert status_after_engagement(current, engagement(EngagementType.BOUNCED, bounce)) is None


@pytest.mark.parametrize(
    "kind", [EngagementType.OPENED, EngagementType.CLICKED, EngagementType.DELIVERED]
)
@pytest.mark.parametrize("current", LEAD_STATUSES)
def test_opens_and_clicks_change_nothing(kind: EngagementType, current: str) -> None:
    assert status_after_engagement(current, engagement(kind)) is None


@given(
    current=st.sampled_from(LEAD_STATUSES),
    kind=st.sampled_from(EngagementType),
    bounce=st.none() | st.sampled_from(BounceType),
)
def test_status_changes_are_real_changes_to_known_statuses(
    current: str, kind: EngagementType, bounce: BounceType | None
) -> None:
    change = status_after_engagement(current, engagement(kind, bounce))
    if change is not None:
        assert change.to_status in LEAD_STATUSES
        assert change.to_status != current
        assert change.reason


# ---------------------------------------------------------------- sequence catalog


def _routed(sequence: str, reason: str = "requested by the event") -> RoutingDecision:
    return RoutingDecision(True, sequence, reason)


@pytest.mark.parametrize("status", ["draft", "paused", "archived"])
def test_a_lead_is_not_routed_to_a_sequence_that_takes_no_leads(status: str) -> None:
    refusal = routing_refusal(_routed("flow"), CatalogEntry(status, 1), "acme")
    assert refusal == f"sequence 'flow' (requested by the event) is {status}: it takes no new leads"


def test_a_lead_is_routed_to_an_active_sequence_of_its_tenant() -> None:
    assert routing_refusal(_routed("flow"), CatalogEntry("active", 3), "acme") is None


@pytest.mark.parametrize("entry", [None, CatalogEntry("deleted")])
def test_an_unknown_sequence_is_refused_naming_the_tenant(entry: CatalogEntry | None) -> None:
    refusal = routing_refusal(_routed("flow", "rule 'webinars'"), entry, "acme")
    assert refusal is not None
    assert refusal.startswith("unknown sequence 'flow' (rule 'webinars'): tenant 'acme'")
    assert "may not have reached the router yet" in refusal
    assert rule_refusal("flow", entry, "acme") is not None


@pytest.mark.parametrize("key", sorted(PRESET_SEQUENCE_KEYS))
def test_presets_exist_for_every_tenant_unless_the_catalog_says_otherwise(key: str) -> None:
    for entry in (None, CatalogEntry("deleted")):  # never announced, or the tenant's own gone
        assert routing_refusal(_routed(key, "default sequence"), entry, "new-tenant") is None
        assert rule_refusal(key, entry, "new-tenant") is None
    # The tenant's own sequence of that key, as a draft, wins over the preset.
    assert routing_refusal(_routed(key), CatalogEntry("draft", 1), "t") is not None


def test_rules_may_name_a_sequence_that_is_not_active_yet() -> None:
    for status in ("draft", "paused", "archived", "active"):
        assert rule_refusal("flow", CatalogEntry(status, 1), "acme") is None


def test_a_lead_that_is_not_routed_needs_no_sequence() -> None:
    assert routing_refusal(RoutingDecision(False, None, "lead is lost"), None, "acme") is None
