"""Router decisions on routing rules as data and on sequence actions (lead updates):
services/router/domain.py, pure."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from schemas.events import LeadAction, LeadData, LeadUpdateRequested
from services.router.domain import (
    DEFAULT_RULES,
    LEAD_STATUSES,
    SUPPRESSED_STATUSES,
    LeadState,
    LeadUpdate,
    NormalisedLead,
    RoutingRule,
    RuleInvalid,
    RuleSpec,
    StatusChange,
    UpdateInvalid,
    choose_sequence,
    decide_lead_update,
    normalise_lead,
    normalise_tags,
    validate_match,
    validate_rule,
)

BY = "sequence:aggressive_close v2 step s5"


def lead(**fields: Any) -> NormalisedLead:
    return normalise_lead(LeadData(**{"email": "ada@example.com", **fields}))


def request(action: LeadAction, **fields: Any) -> LeadUpdateRequested:
    return LeadUpdateRequested(lead_id=uuid.uuid4(), action=action, requested_by=BY, **fields)


# -------------------------------------------------------------------- rule validation


@pytest.mark.parametrize(
    "match",
    [
        {},
        {"grade": "A"},
        {"grade": ["A", "B"]},
        {"source": "webinar"},
        {"source": ["webinar", "conference"]},
        {"min_score": 10},
        {"max_score": 99.5},
        {"min_score": 10, "max_score": 10},
        {"min_score": -5.5, "max_score": 0},
        {"tags_any": ["vip"]},
        {"tags_all": ["partner", "emea"]},
        {"grade": "A", "source": "x", "min_score": 1, "max_score": 2, "tags_any": ["a"]},
    ],
)
def test_valid_matches_are_kept(match: dict[str, Any]) -> None:
    assert validate_match(match) == match


def test_match_strings_are_trimmed() -> None:
    assert validate_match({"grade": " A ", "tags_any": [" vip "]}) == {
        "grade": "A",
        "tags_any": ["vip"],
    }


@pytest.mark.parametrize(
    ("match", "message"),
    [
        ([], "match must be an object, not array"),
        ("grade=A", "match must be an object, not string"),
        ({"colour": "red"}, "unknown match key(s) colour; allowed: grade, source"),
        ({"Grade": "A"}, "unknown match key(s) Grade"),
        ({"grade": 1}, "match.grade must be a string or a list of strings, not number"),
        ({"grade": None}, "match.grade must be a string or a list of strings, not null"),
        ({"grade": ""}, "match.grade must not be blank"),
        ({"grade": []}, "match.grade must not be an empty list"),
        ({"grade": ["A", 2]}, "match.grade must hold non-blank strings only, not 2"),
        ({"source": {"is": "webinar"}}, "match.source must be a string or a list of strings"),
        ({"source": ["webinar", " "]}, "match.source must hold non-blank strings only"),
        ({"min_score": "10"}, "match.min_score must be a number, not string"),
        ({"max_score": True}, "match.max_score must be a number, not boolean"),
        ({"min_score": float("nan")}, "match.min_score must be a finite number"),
        ({"max_score": float("inf")}, "match.max_score must be a finite number"),
        ({"min_score": 80, "max_score": 50}, "could never match"),
        ({"tags_any": "vip"}, "match.tags_any must be a list of strings, not string"),
        ({"tags_all": ["vip", None]}, "match.tags_all must hold non-blank strings only"),
        ({"tags_all": []}, "match.tags_all must not be an empty list"),
    ],
)
def test_invalid_matches_are_refused_with_a_message(match: Any, message: str) -> None:
    with pytest.raises(RuleInvalid) as info:
        validate_match(match)
    assert message in str(info.value)


def test_validate_rule_returns_a_spec() -> None:
    spec = validate_rule("  hot   leads ", {"grade": "A"}, "aggressive_close", False)
    assert spec == RuleSpec("hot leads", {"grade": "A"}, "aggressive_close", enabled=False)


@pytest.mark.parametrize(
    ("name", "sequence", "enabled", "message"),
    [
        ("", "s", True, "name must be a non-blank string"),
        ("   ", "s", True, "name must be a non-blank string"),
        (None, "s", True, "name must be a non-blank string"),
        ("x" * 201, "s", True, "at most 200 characters"),
        ("nul\0byte", "s", True, "control characters"),
        ("ok", "Aggressive_Close", True, "sequence must be a sequence key"),
        ("ok", "has space", True, "sequence must be a sequence key"),
        ("ok", "aggressive_close\n", True, "sequence must be a sequence key"),
        ("ok", "x" * 101, True, "sequence must be a sequence key"),
        ("ok", "", True, "sequence must be a sequence key"),
        ("ok", 7, True, "sequence must be a sequence key"),
        ("ok", "s", "yes", "enabled must be true or false"),
    ],
)
def test_invalid_rules_are_refused(name: Any, sequence: Any, enabled: Any, message: str) -> None:
    with pytest.raises(RuleInvalid, match=message):
        validate_rule(name, {}, sequence, enabled)


def test_the_match_is_checked_by_validate_rule_too() -> None:
    with pytest.raises(RuleInvalid, match="unknown match key"):
        validate_rule("ok", {"country": "GB"}, "s")


# ------------------------------------------------------------------ default rules


def _stored(specs: tuple[RuleSpec, ...]) -> list[RoutingRule]:
    return [RoutingRule(s.name, s.sequence, s.match, uuid.uuid4()) for s in specs]


def test_default_rules_are_valid() -> None:
    for spec in DEFAULT_RULES:
        assert validate_rule(spec.name, spec.match, spec.sequence, spec.enabled) == spec


@pytest.mark.parametrize(
    ("grade", "sequence"),
    [
        ("A", "aggressive_close"),
        ("a", "aggressive_close"),
        ("B", "regular_nurture"),
        ("C", "long_term_nurture"),
        ("D", "cold_outreach"),
        (None, "cold_outreach"),
    ],
)
def test_default_rules_route_by_grade(grade: str | None, sequence: str) -> None:
    rules = _stored(DEFAULT_RULES)
    decision = choose_sequence(lead(grade=grade), "new", None, rules, "cold_outreach")
    assert decision.sequence == sequence
    fired = [r for r in rules if r.sequence == sequence]
    assert decision.rule_id == (fired[0].id if fired else None)
    if fired:
        assert decision.reason == f"rule {fired[0].name!r}"


def test_rule_id_is_only_set_when_a_rule_fires() -> None:
    rules = _stored(DEFAULT_RULES)
    assert choose_sequence(lead(grade="A"), "new", "x", rules, "d").rule_id is None
    assert choose_sequence(lead(grade="A"), "lost", None, rules, "d").rule_id is None


# -------------------------------------------------------------------- lead updates


@pytest.mark.parametrize("status", LEAD_STATUSES)
def test_update_status_to_each_known_status(status: str) -> None:
    current = "contacted" if status == "new" else "new"
    update = decide_lead_update(
        LeadState(current), request(LeadAction.UPDATE_STATUS, status=status)
    )
    assert update == LeadUpdate(BY, status=StatusChange(status, "update_status"))
    assert update.changes_anything


@pytest.mark.parametrize("status", ["won", "Qualified", " new", "", "lost\n"])
def test_update_status_to_an_unknown_status_is_invalid(status: str) -> None:
    with pytest.raises(UpdateInvalid, match="status must be one of new, contacted"):
        decide_lead_update(LeadState("new"), request(LeadAction.UPDATE_STATUS, status=status))


def test_update_status_needs_a_status() -> None:
    with pytest.raises(UpdateInvalid, match="needs a status"):
        decide_lead_update(LeadState("new"), request(LeadAction.UPDATE_STATUS))


def test_the_same_status_is_no_change() -> None:
    update = decide_lead_update(
        LeadState("contacted"), request(LeadAction.UPDATE_STATUS, status="contacted")
    )
    assert update == LeadUpdate(BY)
    assert not update.changes_anything
    assert not decide_lead_update(
        LeadState("qualified"), request(LeadAction.MARK_QUALIFIED)
    ).changes_anything


def test_mark_qualified_uses_the_reason_given() -> None:
    update = decide_lead_update(
        LeadState("contacted"),
        request(LeadAction.MARK_QUALIFIED, reason=" booked a demo ", status="lost"),
    )
    assert update.status == StatusChange("qualified", "booked a demo")


def test_without_a_reason_the_action_is_the_reason() -> None:
    update = decide_lead_update(LeadState("new"), request(LeadAction.MARK_QUALIFIED))
    assert update.status == StatusChange("qualified", "mark_qualified")


def test_changed_by_falls_back_when_requested_by_is_blank() -> None:
    event = LeadUpdateRequested(
        lead_id=uuid.uuid4(), action=LeadAction.MARK_QUALIFIED, requested_by="  "
    )
    assert decide_lead_update(LeadState("new"), event).changed_by == "lead-updates"


@pytest.mark.parametrize("suppressed", sorted(SUPPRESSED_STATUSES))
def test_a_suppressed_lead_is_not_revived_by_a_sequence_action(suppressed: str) -> None:
    state = LeadState(suppressed)
    assert not decide_lead_update(state, request(LeadAction.MARK_QUALIFIED)).changes_anything
    for status in ("new", "contacted", "qualified"):
        event = request(LeadAction.UPDATE_STATUS, status=status)
        assert not decide_lead_update(state, event).changes_anything
    other = next(iter(SUPPRESSED_STATUSES - {suppressed}))
    moved = decide_lead_update(state, request(LeadAction.UPDATE_STATUS, status=other))
    assert moved.status == StatusChange(other, "update_status")


def test_tags_merge_lower_cased_sorted_unique() -> None:
    state = LeadState("new", tags=("cto", "navy"))
    update = decide_lead_update(
        state, request(LeadAction.TAG, tags=["VIP", " Enterprise ", "vip", "CTO", " "])
    )
    assert update == LeadUpdate(BY, tags=["cto", "enterprise", "navy", "vip"])
    assert update.status is None and update.assigned_to is None


def test_tags_already_there_are_no_change() -> None:
    state = LeadState("new", tags=("cto", "vip"))
    assert not decide_lead_update(state, request(LeadAction.TAG, tags=["VIP"])).changes_anything


@pytest.mark.parametrize("tags", [[], ["", "  "]])
def test_tag_lead_needs_a_tag(tags: list[str]) -> None:
    with pytest.raises(UpdateInvalid, match="at least one non-blank tag"):
        decide_lead_update(LeadState("new"), request(LeadAction.TAG, tags=tags))


def test_tagging_does_not_touch_the_status_of_a_suppressed_lead() -> None:
    update = decide_lead_update(LeadState("lost"), request(LeadAction.TAG, tags=["x"]))
    assert update == LeadUpdate(BY, tags=["x"])


def test_assign_to_user() -> None:
    update = decide_lead_update(
        LeadState("new"), request(LeadAction.ASSIGN, assignee="  alice@example.com ")
    )
    assert update == LeadUpdate(BY, assigned_to="alice@example.com")
    reassigned = decide_lead_update(
        LeadState("new", assigned_to="alice@example.com"),
        request(LeadAction.ASSIGN, assignee="bob@example.com"),
    )
    assert reassigned.assigned_to == "bob@example.com"
    same = decide_lead_update(
        LeadState("new", assigned_to="alice@example.com"),
        request(LeadAction.ASSIGN, assignee="alice@example.com"),
    )
    assert not same.changes_anything


@pytest.mark.parametrize("assignee", [None, "", "   "])
def test_assign_needs_an_assignee(assignee: str | None) -> None:
    with pytest.raises(UpdateInvalid, match="needs an assignee"):
        decide_lead_update(LeadState("new"), request(LeadAction.ASSIGN, assignee=assignee))


def test_normalise_tags() -> None:
    assert normalise_tags([" B", "a", "b ", "", "A"]) == ["a", "b"]
    assert lead(tags=[" B", "a", "b "]).tags == ["a", "b"]
