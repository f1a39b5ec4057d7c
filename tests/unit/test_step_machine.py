"""The step machine (services/nurture/domain.py): pure decisions over steps built the
way production builds them (API JSON -> parse_steps -> assign_keys -> step_config)."""

from __future__ import annotations

import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.nurture import model, windows
from services.nurture.domain import (
    Advance,
    EngagementFact,
    EnrollmentState,
    Facts,
    LeadUpdate,
    Notification,
    SentEmail,
    SequenceContext,
    Step,
    advance,
    after_email_sent,
    assign_variant,
    company_domain,
    condition_deadline,
    delivery_key,
    evaluate_condition,
    sent_while_paused,
)
from services.nurture.windows import SendWindow

ENROLLMENT = uuid.UUID("0c5f2a1e-8d3b-4c6a-9e7f-1a2b3c4d5e6f")
LEAD = uuid.UUID("7d1e9f20-3a4b-4c5d-8e6f-708192a3b4c5")
# Wednesday 10 June 2026, 10:00 UTC.
WED = datetime(2026, 6, 10, 10, 0, tzinfo=UTC)
# Saturday 13 June 2026, 12:00 UTC.
SAT = datetime(2026, 6, 13, 12, 0, tzinfo=UTC)
CONTEXT = SequenceContext("seq", 1)


def build(specs: list[dict[str, Any]], *, validate: bool = True) -> list[Step]:
    """Steps as the machine gets them from the repository."""
    parsed = model.parse_steps(specs)
    keys = model.assign_keys(parsed)
    if validate:
        model.validate_sequence(parsed, keys)
    return [
        Step(uuid.UUID(int=i + 1), i, key, step.type, model.step_config(step))
        for i, (key, step) in enumerate(zip(keys, parsed, strict=True))
    ]


def email(key: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "email",
        "key": key,
        "subject": f"Subject {key}",
        "text": f"Text {key}",
        **extra,
    }


def wait(key: str | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "wait", **(extra or {"days": 2})}
    if key is not None:
        data["key"] = key
    return data


def action(key: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"type": "action", "key": key, "action": name, **extra}


def state(
    position: int = 0,
    *,
    cursor: int = 0,
    steps_done: int = 0,
    thread: str | None = None,
    due_since: datetime | None = None,
    lead_timezone: str | None = None,
    lead_country: str | None = None,
    lead_id: uuid.UUID = LEAD,
) -> EnrollmentState:
    return EnrollmentState(
        id=ENROLLMENT,
        lead_id=lead_id,
        position=position,
        cursor=cursor,
        steps_done=steps_done,
        thread_delivery_key=thread,
        due_since=due_since,
        lead_timezone=lead_timezone,
        lead_country=lead_country,
    )


def stored(result: Advance, previous: EnrollmentState) -> EnrollmentState:
    """What the repository keeps of an Advance."""
    return EnrollmentState(
        id=previous.id,
        lead_id=previous.lead_id,
        position=result.position,
        cursor=result.cursor,
        steps_done=result.steps_done,
        thread_delivery_key=result.thread_delivery_key,
        due_since=result.due_since,
        lead_timezone=previous.lead_timezone,
        lead_country=previous.lead_country,
    )


def decisions(result: Advance) -> list[str]:
    return [entry.decision for entry in result.log]


# ------------------------------------------------------------------ linear flow


def test_email_wait_email_runs_to_completion() -> None:
    steps = build([email("a"), wait(days=2), email("b")])
    first = advance(state(), steps, WED, context=CONTEXT)
    assert first.status == "awaiting_send"
    assert first.waiting_on == "send"
    assert first.email is not None and first.email.step.key == "a"
    assert first.email.subject == "Subject a" and first.email.text == "Text a"
    assert first.email.delivery_key == delivery_key(ENROLLMENT, 0) == f"{ENROLLMENT}:0"
    assert first.email.thread_delivery_key is None
    assert first.thread_delivery_key == first.awaiting_delivery_key == first.email.delivery_key
    assert (first.position, first.cursor, first.steps_done) == (0, 1, 0)
    assert first.next_action_at is None
    assert decisions(first) == ["email_due"]

    sent_at = WED + timedelta(minutes=3)
    after = after_email_sent(stored(first, state()), steps, sent_at, context=CONTEXT)
    assert after.status == "active"
    assert after.waiting_on == "wait"
    assert after.email is None
    assert (after.position, after.cursor, after.steps_done) == (2, 1, 2)
    assert after.next_action_at == sent_at + timedelta(days=2)
    assert decisions(after) == ["wait"]

    at = after.next_action_at
    second = advance(stored(after, state()), steps, at, context=CONTEXT)
    assert second.status == "awaiting_send"
    assert second.email is not None and second.email.step.key == "b"
    assert second.email.delivery_key == f"{ENROLLMENT}:1"
    assert second.email.thread_delivery_key == first.email.delivery_key
    assert second.thread_delivery_key == first.email.delivery_key
    assert second.cursor == 2

    done = after_email_sent(stored(second, state()), steps, at + timedelta(minutes=1))
    assert done.status == "completed"
    assert done.position == 3 and done.steps_done == 3
    assert done.next_action_at is None and done.due_since is None
    assert decisions(done) == ["completed"]


def test_next_jumps_over_steps() -> None:
    steps = build([email("a", next="c"), email("b"), email("c")])
    result = after_email_sent(state(cursor=1), steps, WED)
    assert result.email is not None and result.email.step.key == "c"
    assert result.position == 2


def test_next_end_completes() -> None:
    steps = build([email("a", next="end"), email("b")])
    result = after_email_sent(state(cursor=1), steps, WED)
    assert result.status == "completed"
    assert result.email is None
    assert result.position == len(steps)


def test_a_wait_jumping_to_end_completes_when_it_expires() -> None:
    steps = build([email("a"), wait("w", hours=4, next="end"), email("b")])
    waiting = after_email_sent(state(cursor=1), steps, WED)
    assert waiting.next_action_at == WED + timedelta(hours=4)
    assert waiting.position == len(steps)
    done = advance(stored(waiting, state()), steps, WED + timedelta(hours=4))
    assert done.status == "completed"


def test_an_empty_sequence_completes() -> None:
    result = advance(state(), [], WED)
    assert result.status == "completed" and result.next_action_at is None


# ------------------------------------------------------------------- conditions

POSITIVE = {
    "if_opened": "opened",
    "if_clicked": "clicked",
    "if_replied": "replied",
    "if_bounced": "bounced",
    "if_unsubscribed": "unsubscribed",
}
NEGATIVE = {"if_not_opened": "opened", "if_not_replied": "replied"}
ALL_EVENTS = {**POSITIVE, **NEGATIVE}


def cond(condition: str, **extra: Any) -> dict[str, Any]:
    return {"condition": condition, **extra}


def sent_a(at: datetime = WED) -> Facts:
    return Facts(sent=(SentEmail("a", at),))


def with_event(
    facts: Facts, kind: str, at: datetime, step_key: str | None = "a", *, machine: bool = False
) -> Facts:
    return Facts(
        sent=facts.sent,
        engagements=(*facts.engagements, EngagementFact(kind, step_key, at, machine)),
    )


@pytest.mark.parametrize("scope", [None, "a"])
@pytest.mark.parametrize("within", [None, 3])
@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_an_event_decides_the_condition(
    condition: str, within: int | None, scope: str | None
) -> None:
    config = cond(
        condition,
        **({"within_days": within} if within else {}),
        **({"step": scope} if scope else {}),
    )
    positive = condition in POSITIVE
    facts = with_event(sent_a(), ALL_EVENTS[condition], WED + timedelta(hours=5))
    # Known as soon as it happens, even before the deadline.
    assert evaluate_condition(config, facts, WED + timedelta(hours=6)) is positive
    assert evaluate_condition(config, facts, WED + timedelta(days=10)) is positive


@pytest.mark.parametrize("scope", [None, "a"])
@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_without_an_event_the_condition_waits_until_the_deadline(
    condition: str, scope: str | None
) -> None:
    config = cond(condition, within_days=3, **({"step": scope} if scope else {}))
    positive = condition in POSITIVE
    facts = sent_a()
    deadline = WED + timedelta(days=3)
    assert condition_deadline(config, facts) == deadline
    assert evaluate_condition(config, facts, WED + timedelta(hours=1)) is None
    assert evaluate_condition(config, facts, deadline - timedelta(seconds=1)) is None
    assert evaluate_condition(config, facts, deadline) is (not positive)
    assert evaluate_condition(config, facts, deadline + timedelta(days=30)) is (not positive)


@pytest.mark.parametrize("scope", [None, "a"])
@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_without_within_days_the_condition_is_decided_at_once(
    condition: str, scope: str | None
) -> None:
    config = cond(condition, **({"step": scope} if scope else {}))
    assert condition_deadline(config, sent_a()) is None
    assert evaluate_condition(config, sent_a(), WED + timedelta(seconds=1)) is (
        condition in NEGATIVE
    )


@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_events_after_the_deadline_do_not_count(condition: str) -> None:
    config = cond(condition, within_days=3, step="a")
    facts = with_event(sent_a(), ALL_EVENTS[condition], WED + timedelta(days=3, minutes=1))
    assert evaluate_condition(config, facts, WED + timedelta(days=5)) is (condition in NEGATIVE)
    on_time = with_event(sent_a(), ALL_EVENTS[condition], WED + timedelta(days=3))
    assert evaluate_condition(config, on_time, WED + timedelta(days=5)) is (condition in POSITIVE)


@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_events_before_the_email_do_not_count(condition: str) -> None:
    config = cond(condition)
    earlier = with_event(sent_a(), ALL_EVENTS[condition], WED - timedelta(hours=2), None)
    assert evaluate_condition(config, earlier, WED + timedelta(days=1)) is (condition in NEGATIVE)
    # A minute of clock skew is tolerated.
    skewed = with_event(sent_a(), ALL_EVENTS[condition], WED - timedelta(seconds=30), None)
    assert evaluate_condition(config, skewed, WED + timedelta(days=1)) is (condition in POSITIVE)


@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_with_a_scope_only_that_emails_events_count(condition: str) -> None:
    facts = Facts(sent=(SentEmail("a", WED), SentEmail("b", WED + timedelta(days=1))))
    facts = with_event(facts, ALL_EVENTS[condition], WED + timedelta(days=1, hours=1), "b")
    now = WED + timedelta(days=2)
    assert evaluate_condition(cond(condition, step="a"), facts, now) is (condition in NEGATIVE)
    assert evaluate_condition(cond(condition, step="b"), facts, now) is (condition in POSITIVE)
    assert evaluate_condition(cond(condition), facts, now) is (condition in POSITIVE)


@pytest.mark.parametrize(
    ("condition", "kind"), [("if_opened", "opened"), ("if_clicked", "clicked")]
)
def test_machine_opens_and_clicks_do_not_count(condition: str, kind: str) -> None:
    facts = with_event(sent_a(), kind, WED + timedelta(minutes=1), machine=True)
    assert evaluate_condition(cond(condition), facts, WED + timedelta(hours=1)) is False
    assert (
        evaluate_condition(cond(condition, within_days=2), facts, WED + timedelta(hours=1)) is None
    )
    assert (
        evaluate_condition(cond(condition, within_days=2), facts, WED + timedelta(days=2)) is False
    )
    human = with_event(facts, kind, WED + timedelta(minutes=2))
    assert evaluate_condition(cond(condition), human, WED + timedelta(hours=1)) is True


def test_a_machine_open_does_not_make_if_not_opened_false() -> None:
    facts = with_event(sent_a(), "opened", WED + timedelta(minutes=1), machine=True)
    assert evaluate_condition(cond("if_not_opened"), facts, WED + timedelta(hours=1)) is True


def test_other_event_types_do_not_count() -> None:
    facts = with_event(sent_a(), "clicked", WED + timedelta(minutes=1))
    assert evaluate_condition(cond("if_replied"), facts, WED + timedelta(hours=1)) is False
    assert evaluate_condition(cond("if_opened"), facts, WED + timedelta(hours=1)) is False


@pytest.mark.parametrize("within", [None, 3])
@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_a_condition_about_an_email_never_sent(condition: str, within: int | None) -> None:
    extra = {"within_days": within} if within else {}
    # Scope on an email of another branch: nothing happened, so no waiting either.
    facts = with_event(sent_a(), ALL_EVENTS[condition], WED + timedelta(minutes=5), "a")
    config = cond(condition, step="b", **extra)
    assert evaluate_condition(config, facts, WED + timedelta(hours=1)) is (condition in NEGATIVE)
    assert condition_deadline(config, facts) is None
    # No email at all yet.
    assert evaluate_condition(cond(condition, **extra), Facts(), WED) is (condition in NEGATIVE)


def test_always_is_true() -> None:
    assert evaluate_condition(cond("always"), Facts(), WED) is True
    assert evaluate_condition(cond("always", within_days=3), sent_a(), WED) is True


def branching(condition: str, **extra: Any) -> list[Step]:
    return build(
        [
            email("a"),
            {
                "type": "condition",
                "key": "c",
                "condition": condition,
                "then": "yes",
                "else": "no",
                **extra,
            },
            email("yes", next="end"),
            email("no"),
        ]
    )


@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_the_machine_waits_on_an_undecided_condition(condition: str) -> None:
    steps = branching(condition, within_days=3)
    now = WED + timedelta(hours=1)
    result = after_email_sent(state(cursor=1), steps, now, sent_a(), CONTEXT)
    assert result.status == "active"
    assert result.position == 1
    assert result.waiting_on == "condition"
    assert result.next_action_at == WED + timedelta(days=3)
    assert result.due_since == now
    assert result.email is None
    assert decisions(result) == ["waiting"]

    # Evaluated again before the deadline: still waiting, logged only once.
    later = now + timedelta(days=1)
    again = advance(stored(result, state()), steps, later, sent_a(), CONTEXT)
    assert again.position == 1 and again.waiting_on == "condition"
    assert again.next_action_at == WED + timedelta(days=3)
    assert again.due_since == now
    assert decisions(again) == []

    # At the deadline it resolves, to the negative answer.
    deadline = WED + timedelta(days=3)
    decided = advance(stored(again, state()), steps, deadline, sent_a(), CONTEXT)
    expected = "yes" if condition in NEGATIVE else "no"
    assert decided.email is not None and decided.email.step.key == expected
    assert decided.due_since is None
    assert decisions(decided) == ["branch", "email_due"]
    assert decided.log[0].step_index == 1
    assert (
        f"{condition} is {str(condition in NEGATIVE).lower()}: going to {expected}"
        in decided.log[0].reason
    )


@pytest.mark.parametrize("condition", sorted(ALL_EVENTS))
def test_the_machine_takes_the_branch_an_event_decides(condition: str) -> None:
    steps = branching(condition, within_days=3)
    facts = with_event(sent_a(), ALL_EVENTS[condition], WED + timedelta(hours=2))
    result = advance(state(1, cursor=1), steps, WED + timedelta(hours=3), facts, CONTEXT)
    expected = "yes" if condition in POSITIVE else "no"
    assert result.email is not None and result.email.step.key == expected
    assert result.steps_done == 1
    assert "branch" in decisions(result)


def test_always_takes_the_then_branch() -> None:
    steps = branching("always")
    result = advance(state(1), steps, WED)
    assert result.email is not None and result.email.step.key == "yes"


def test_a_branch_without_target_follows_next_or_the_following_step() -> None:
    steps = build(
        [
            email("a"),
            {"type": "condition", "key": "c", "condition": "if_opened", "then": "z", "next": "y"},
            email("x"),
            email("y"),
            email("z"),
        ]
    )
    result = advance(state(1), steps, WED + timedelta(hours=1), sent_a())
    assert result.email is not None and result.email.step.key == "y"  # else -> next
    steps = build(
        [email("a"), {"type": "condition", "key": "c", "condition": "if_opened"}, email("x")]
    )
    result = advance(state(1), steps, WED + timedelta(hours=1), sent_a())
    assert result.email is not None and result.email.step.key == "x"


def test_a_branch_to_end_completes() -> None:
    steps = build(
        [
            email("a"),
            {
                "type": "condition",
                "key": "c",
                "condition": "if_replied",
                "then": "b",
                "else": "end",
            },
            email("b"),
        ]
    )
    result = advance(state(1), steps, WED + timedelta(hours=1), sent_a())
    assert result.status == "completed"
    assert decisions(result) == ["branch", "completed"]
    assert "going to end" in result.log[0].reason


# ---------------------------------------------------------------------- actions


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"action": "update_status", "status": "lost"},
            LeadUpdate("update_status", status="lost", reason="sequence seq step act"),
        ),
        (
            {"action": "tag_lead", "tags": ["hot", "vip"]},
            LeadUpdate("tag_lead", tags=("hot", "vip"), reason="sequence seq step act"),
        ),
        (
            {"action": "mark_qualified"},
            LeadUpdate("mark_qualified", status="qualified", reason="sequence seq step act"),
        ),
        (
            {"action": "assign_to_user", "user": "alice", "reason": "warm lead"},
            LeadUpdate("assign_to_user", user="alice", reason="warm lead"),
        ),
    ],
)
def test_lead_actions_update_the_lead_and_continue(
    spec: dict[str, Any], expected: LeadUpdate
) -> None:
    steps = build([{"type": "action", "key": "act", **spec}, email("a")])
    result = advance(state(), steps, WED, context=CONTEXT)
    assert result.lead_updates == [expected]
    assert result.notifications == []
    assert result.email is not None and result.email.step.key == "a"
    assert result.status == "awaiting_send"
    assert result.steps_done == 1
    assert decisions(result) == ["action", "email_due"]


def test_notify_sends_a_notification_and_continues() -> None:
    steps = build([action("ping", "notify", url="https://hooks.example.com/n"), email("a")])
    result = advance(state(), steps, WED, context=CONTEXT)
    assert result.notifications == [
        Notification(
            "https://hooks.example.com/n", {"step": "ping", "reason": "sequence seq step ping"}
        )
    ]
    assert result.lead_updates == []
    assert result.email is not None


def test_an_action_at_the_end_completes() -> None:
    steps = build([email("a"), action("q", "mark_qualified")])
    result = after_email_sent(state(cursor=1), steps, WED)
    assert result.status == "completed"
    assert [u.status for u in result.lead_updates] == ["qualified"]


def test_stop_stops_with_the_configured_reason() -> None:
    steps = build([action("halt", "stop", reason="not a fit"), email("a")])
    result = advance(state(), steps, WED)
    assert result.status == "stopped"
    assert result.stop_reason == "not a fit"
    assert result.next_action_at is None
    assert result.email is None
    assert decisions(result) == ["stopped"]


def test_stop_without_reason() -> None:
    result = advance(state(), build([action("halt", "stop"), email("a")]), WED)
    assert result.status == "stopped"
    assert result.stop_reason == "stopped by the sequence"


def test_move_to_sequence_stops_and_names_the_target() -> None:
    steps = build([email("a"), action("mv", "move_to_sequence", sequence="warm"), email("b")])
    result = after_email_sent(state(cursor=1), steps, WED)
    assert result.status == "stopped"
    assert result.move_to == "warm"
    assert result.stop_reason == "moved to sequence warm"
    assert result.next_action_at is None
    assert result.email is None


# ------------------------------------------------------------------ send window

BERLIN_WINDOW = SendWindow.from_config(
    {"timezone": "Europe/Berlin", "start": "09:00", "end": "17:00", "jitter_minutes": 30}
)


@pytest.mark.parametrize("lead_timezone", [None, "America/New_York"])
def test_an_email_outside_the_window_is_deferred_then_sent(lead_timezone: str | None) -> None:
    context = SequenceContext("seq", 1, window=BERLIN_WINDOW)
    steps = build([email("a"), wait(days=1), email("b")])
    start = state(lead_timezone=lead_timezone)
    expected = windows.schedule_send(BERLIN_WINDOW, SAT, lead_timezone, delivery_key(ENROLLMENT, 0))
    local = expected.astimezone(ZoneInfo(lead_timezone or "Europe/Berlin"))
    assert local.weekday() == 0 and 9 <= local.hour < 10  # Monday morning, plus jitter

    first = advance(start, steps, SAT, context=context)
    assert first.status == "active"
    assert first.waiting_on == "window"
    assert first.email is None
    assert first.next_action_at == expected
    assert first.due_since == SAT
    assert first.position == 0 and first.cursor == 0
    assert decisions(first) == ["deferred"]
    assert expected.isoformat() in first.log[0].reason

    # Woken early: still deferred to the same instant, without a second log entry.
    early = advance(stored(first, start), steps, SAT + timedelta(hours=20), context=context)
    assert early.email is None and early.waiting_on == "window"
    assert early.next_action_at == expected
    assert early.due_since == SAT
    assert decisions(early) == []

    # At the scheduled instant the email goes out.
    sent = advance(stored(early, start), steps, expected, context=context)
    assert sent.status == "awaiting_send"
    assert sent.email is not None and sent.email.step.key == "a"
    assert sent.due_since is None
    assert decisions(sent) == ["email_due"]


def test_without_a_window_the_email_goes_at_once() -> None:
    result = advance(state(), build([email("a")]), SAT, context=CONTEXT)
    assert result.email is not None and result.status == "awaiting_send"


def test_inside_the_window_without_jitter_the_email_goes_at_once() -> None:
    window = SendWindow.from_config({"timezone": "Europe/Berlin"})
    context = SequenceContext("seq", 1, window=window)
    result = advance(state(), build([email("a")]), WED, context=context)  # 12:00 in Berlin
    assert result.email is not None


def test_a_late_evaluation_does_not_send_outside_the_window() -> None:
    window = SendWindow.from_config({"timezone": "UTC", "start": "09:00", "end": "17:00"})
    context = SequenceContext("seq", 1, window=window)
    steps = build([email("a")])
    deferred = advance(state(), steps, SAT, context=context)
    assert deferred.next_action_at == datetime(2026, 6, 15, 9, 0, tzinfo=UTC)
    # The worker only gets to it on Monday at 22:00, when the window is closed.
    late = datetime(2026, 6, 15, 22, 0, tzinfo=UTC)
    result = advance(stored(deferred, state()), steps, late, context=context)
    assert result.email is None
    assert result.waiting_on == "window"
    assert result.next_action_at == datetime(2026, 6, 16, 9, 0, tzinfo=UTC)


# ----------------------------------------------------------- business-day waits

NEW_YORK = ZoneInfo("America/New_York")


@pytest.mark.parametrize(
    "window",
    [
        None,
        BERLIN_WINDOW,
        SendWindow.from_config({"timezone": "Asia/Tokyo", "holidays": "US"}),
    ],
)
def test_three_business_days_from_wednesday_is_monday(window: SendWindow | None) -> None:
    steps = build([wait("w", business_days=3), email("a")])
    now = datetime(2026, 6, 10, 10, 0, tzinfo=NEW_YORK)  # Wednesday
    result = advance(
        state(lead_timezone="America/New_York"),
        steps,
        now,
        context=SequenceContext("seq", 1, window=window),
    )
    assert result.status == "active"
    assert result.waiting_on == "wait"
    assert result.position == 1
    assert result.next_action_at == datetime(2026, 6, 15, 10, 0, tzinfo=NEW_YORK)
    assert result.next_action_at.astimezone(NEW_YORK).weekday() == 0


def test_business_days_use_the_window_zone_without_a_lead_zone() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    steps = build([wait("w", business_days=3), email("a")])
    now = datetime(2026, 6, 10, 10, 0, tzinfo=berlin)
    result = advance(state(), steps, now, context=SequenceContext("seq", 1, window=BERLIN_WINDOW))
    assert result.next_action_at == datetime(2026, 6, 15, 10, 0, tzinfo=berlin)


def test_business_days_skip_the_windows_holidays() -> None:
    # Friday 3 July 2026 is the observed US Independence Day.
    steps = build([wait("w", business_days=3), email("a")])
    now = datetime(2026, 7, 1, 10, 0, tzinfo=NEW_YORK)
    us = SendWindow.from_config({"timezone": "America/New_York", "holidays": "US"})
    with_holidays = advance(state(), steps, now, context=SequenceContext("s", 1, window=us))
    assert with_holidays.next_action_at == datetime(2026, 7, 7, 10, 0, tzinfo=NEW_YORK)
    plain = SendWindow.from_config({"timezone": "America/New_York"})
    without = advance(state(), steps, now, context=SequenceContext("s", 1, window=plain))
    assert without.next_action_at == datetime(2026, 7, 6, 10, 0, tzinfo=NEW_YORK)


# ------------------------------------------------- public holidays of the lead

#: Friday 3 July 2026, 10:00 in New York: the observed US Independence Day, a working
#: day in Great Britain.
US_HOLIDAY = datetime(2026, 7, 3, 10, 0, tzinfo=NEW_YORK)
GB_WINDOW = SendWindow.from_config(
    {"timezone": "America/New_York", "start": "09:00", "end": "17:00", "holidays": "GB"}
)


@pytest.mark.parametrize(
    ("lead_country", "sends_now"),
    [
        ("US", False),  # the lead's country wins over the window's
        ("us", False),
        (None, True),  # no country: the window's (GB) holidays
        ("GB", True),
        ("ZZ", True),  # no holiday calendar for it: the window's
    ],
)
def test_an_email_waits_out_the_public_holidays_of_the_leads_country(
    lead_country: str | None, sends_now: bool
) -> None:
    context = SequenceContext("seq", 1, window=GB_WINDOW)
    lead = state(lead_country=lead_country)
    result = advance(lead, build([email("a")]), US_HOLIDAY, context=context)
    if sends_now:
        assert result.email is not None and result.status == "awaiting_send"
    else:
        assert result.email is None and result.waiting_on == "window"
        # The next opening in New York after the holiday weekend: Monday 09:00.
        assert result.next_action_at == datetime(2026, 7, 6, 9, 0, tzinfo=NEW_YORK)


@pytest.mark.parametrize(
    ("window", "lead_country", "expected_day"),
    [
        (GB_WINDOW, "US", 7),  # Wed + 3 business days, skipping the US holiday: Tuesday
        (GB_WINDOW, None, 6),  # the window's GB holidays: Monday
        (GB_WINDOW, "GB", 6),
        (None, "US", 7),  # no window (no holidays of its own): the lead's country
        (None, None, 6),
        (SendWindow.from_config({"timezone": "UTC", "holidays": "US"}), "GB", 6),
    ],
)
def test_business_days_skip_the_public_holidays_of_the_leads_country(
    window: SendWindow | None, lead_country: str | None, expected_day: int
) -> None:
    steps = build([wait("w", business_days=3), email("a")])
    wednesday = datetime(2026, 7, 1, 10, 0, tzinfo=NEW_YORK)
    lead = state(lead_timezone="America/New_York", lead_country=lead_country)
    result = advance(lead, steps, wednesday, context=SequenceContext("seq", 1, window=window))
    assert result.next_action_at == datetime(2026, 7, expected_day, 10, 0, tzinfo=NEW_YORK)


def test_the_leads_country_follows_the_enrollment_past_a_sent_email() -> None:
    steps = build([email("a"), wait("w", business_days=3), email("b")])
    lead = state(lead_timezone="America/New_York", lead_country="US")
    wednesday = datetime(2026, 7, 1, 10, 0, tzinfo=NEW_YORK)
    result = after_email_sent(lead, steps, wednesday, Facts(), CONTEXT)
    assert result.next_action_at == datetime(2026, 7, 7, 10, 0, tzinfo=NEW_YORK)


# --------------------------------------------------------------------- variants

VARIANTS = [
    {"key": "a", "weight": 1, "subject": "Subject A", "text": "Text A"},
    {
        "key": "b",
        "weight": 3,
        "subject": "Subject B {{ first_name }}",
        "text": "Text B",
        "html": "<b>B</b>",
    },
    {"key": "z", "weight": 0, "subject": "Subject Z", "text": "Text Z"},
]


def stored_variants() -> list[dict[str, Any]]:
    return build([email("s", variants=VARIANTS)])[0].config["variants"]


def test_assign_variant_is_stable_per_lead_and_step() -> None:
    variants = stored_variants()
    first = assign_variant(LEAD, "s", variants)
    assert first is not None
    for _ in range(5):
        assert assign_variant(LEAD, "s", [dict(v) for v in variants]) == first


@given(lead=st.uuids())
@settings(max_examples=200, deadline=None)
def test_assign_variant_is_deterministic_and_never_picks_weight_zero(lead: uuid.UUID) -> None:
    variants = stored_variants()
    chosen = assign_variant(lead, "s", variants)
    assert chosen is not None and chosen["key"] in ("a", "b")
    assert assign_variant(lead, "s", variants) == chosen


def test_different_leads_and_steps_spread_across_variants() -> None:
    variants = stored_variants()
    rng = random.Random(7)
    leads = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(200)]
    assert {assign_variant(lead, "s", variants)["key"] for lead in leads} == {"a", "b"}
    per_step = {assign_variant(LEAD, f"step{i}", variants)["key"] for i in range(200)}
    assert per_step == {"a", "b"}


def test_variant_shares_follow_the_weights() -> None:
    variants = [
        {"key": "a", "weight": 1},
        {"key": "b", "weight": 3},
        {"key": "c", "weight": 6},
        {"key": "z", "weight": 0},
    ]
    rng = random.Random(20260610)
    n = 20_000
    counts = Counter(
        assign_variant(uuid.UUID(int=rng.getrandbits(128)), "s1", variants)["key"] for _ in range(n)
    )
    assert counts["z"] == 0
    for key, weight in (("a", 1), ("b", 3), ("c", 6)):
        assert abs(counts[key] / n - weight / 10) < 0.02, counts


def test_assign_variant_without_variants_or_weight() -> None:
    assert assign_variant(LEAD, "s", []) is None
    assert assign_variant(LEAD, "s", [{"key": "a", "weight": 0}]) is None


def test_advance_uses_the_assigned_variant() -> None:
    steps = build([email("s", variants=VARIANTS)])
    rng = random.Random(3)
    seen: set[str] = set()
    for _ in range(50):
        lead = uuid.UUID(int=rng.getrandbits(128))
        expected = assign_variant(lead, "s", steps[0].config["variants"])
        result = advance(state(lead_id=lead), steps, WED)
        assert result.email is not None
        assert result.email.variant == expected["key"]
        assert result.email.subject == expected["subject"]
        assert result.email.text == expected["text"]
        assert result.email.html == expected.get("html")
        assert f"variant {expected['key']}" in result.log[-1].reason
        seen.add(expected["key"])
    assert seen == {"a", "b"}


def test_without_variants_the_step_itself_is_sent() -> None:
    result = advance(state(), build([email("s", html="<p>x</p>")]), WED)
    assert result.email is not None
    assert result.email.variant is None
    assert (result.email.subject, result.email.text, result.email.html) == (
        "Subject s",
        "Text s",
        "<p>x</p>",
    )


# ------------------------------------------------------------ threads, tracking


def test_reply_to_thread_is_passed_on() -> None:
    steps = build([email("a"), email("b", reply_to_thread=True)])
    first = advance(state(), steps, WED)
    assert first.email is not None and first.email.reply_to_thread is False
    second = after_email_sent(stored(first, state()), steps, WED)
    assert second.email is not None and second.email.reply_to_thread is True
    assert second.email.thread_delivery_key == first.email.delivery_key


@pytest.mark.parametrize(
    ("context_tracking", "step_tracking", "expected"),
    [
        (True, None, True),
        (False, None, False),
        (True, False, False),
        (False, True, True),
        (True, True, True),
        (False, False, False),
    ],
)
def test_tracking_defaults_to_the_sequence_and_the_step_wins(
    context_tracking: bool, step_tracking: bool | None, expected: bool
) -> None:
    extra = {} if step_tracking is None else {"tracking": step_tracking}
    steps = build([email("a", **extra)])
    result = advance(
        state(), steps, WED, context=SequenceContext("seq", 1, tracking=context_tracking)
    )
    assert result.email is not None and result.email.tracking is expected


def test_tracking_is_on_without_a_context() -> None:
    result = advance(state(), build([email("a")]), WED)
    assert result.email is not None and result.email.tracking is True


# ------------------------------------------------------------ sent, paused, misc


def test_after_email_sent_follows_the_email_next() -> None:
    steps = build([email("a", next="w2"), wait("w1", days=1), wait("w2", hours=5), email("b")])
    result = after_email_sent(state(cursor=1, thread="t"), steps, WED)
    assert result.position == 3
    assert result.next_action_at == WED + timedelta(hours=5)
    assert result.steps_done == 2
    assert result.thread_delivery_key == "t"


def test_sent_while_paused_moves_past_the_email_and_stays_paused() -> None:
    steps = build([email("a", next="c"), email("b"), email("c")])
    result = sent_while_paused(state(cursor=1, steps_done=4, thread="t"), steps, WED)
    assert result.status == "paused"
    assert result.position == 2
    assert result.cursor == 1
    assert result.steps_done == 5
    assert result.thread_delivery_key == "t"
    assert result.email is None
    default = sent_while_paused(state(cursor=1), build([email("a"), email("b")]), WED)
    assert (default.status, default.position) == ("paused", 1)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("ann@gmail.com", None),
        ("Ann@GMail.COM", None),
        ("bob@protonmail.com", None),
        ("x@qq.com", None),
        ("carol@Acme.Example", "acme.example"),
        ("dave@sub.acme.com", "sub.acme.com"),
        ("eve@acme.co.uk", "acme.co.uk"),
    ],
)
def test_company_domain(address: str, expected: str | None) -> None:
    assert company_domain(address) == expected


def test_delivery_keys_are_per_enrollment_and_cursor() -> None:
    other = uuid.UUID(int=5)
    keys = {delivery_key(e, c) for e in (ENROLLMENT, other) for c in range(3)}
    assert len(keys) == 6


# --------------------------------------------------------------- cyclic safety


def raw(*specs: tuple[str, str, dict[str, Any]]) -> list[Step]:
    """Steps that never went through validation."""
    return [
        Step(uuid.UUID(int=i + 1), i, key, kind, config)
        for i, (key, kind, config) in enumerate(specs)
    ]


@pytest.mark.parametrize(
    "steps",
    [
        raw(("t", "action", {"action": "tag_lead", "tags": ["x"], "next": "t"})),
        raw(("c", "condition", {"condition": "always", "then": "c"})),
        raw(
            ("t", "action", {"action": "mark_qualified"}),
            ("c", "condition", {"condition": "if_opened", "then": "t", "else": "t"}),
        ),
        raw(("w", "wait", {"minutes": 0, "next": "w"})),
        raw(
            ("n", "action", {"action": "notify", "url": "https://h.example/x"}),
            ("w", "wait", {"days": 0}),
            ("q", "action", {"action": "tag_lead", "tags": ["y"], "next": "n"}),
        ),
    ],
)
def test_a_cyclic_sequence_without_waits_stops_instead_of_spinning(steps: list[Step]) -> None:
    result = advance(state(), steps, WED, Facts(), CONTEXT)
    assert result.status == "stopped"
    assert result.stop_reason == "sequence does not progress"
    assert result.next_action_at is None
    assert result.email is None
    assert len(result.log) <= 2 * len(steps) + 2


def test_a_raw_loop_through_an_email_waits_for_the_send() -> None:
    steps = raw(("a", "email", {"subject": "S", "text": "T", "next": "a"}))
    result = advance(state(), steps, WED)
    assert result.status == "awaiting_send"
    again = after_email_sent(stored(result, state()), steps, WED)
    assert again.status == "awaiting_send" and again.cursor == 2
