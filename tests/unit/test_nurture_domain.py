"""The nurture step machine (services/nurture/domain.py), the built-in presets
(services/nurture/presets.py) and sandboxed personalisation (services/nurture/templates.py)."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import BounceType, EngagementReceived, EngagementType
from services.nurture.domain import (
    Advance,
    EnrollmentState,
    Step,
    advance,
    after_email_sent,
    delivery_key,
    stop_reason_for,
    wait_duration,
)
from services.nurture.presets import (
    AGGRESSIVE_CLOSE,
    COLD_OUTREACH,
    LONG_TERM_NURTURE,
    PRESETS,
    REGULAR_NURTURE,
    Preset,
    PresetEmail,
)
from services.nurture.templates import (
    DEFAULT_FALLBACKS,
    RenderError,
    check_template,
    render,
    template_context,
)

START = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
ENROLLMENT = uuid.UUID("5a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d")
LEAD = uuid.UUID("6b2c3d4e-5f60-4b7c-9d8e-0f1a2b3c4d5e")


def make_steps(spec: list[tuple[str, dict[str, Any]]]) -> list[Step]:
    return [
        Step(id=uuid.uuid4(), position=i, key=f"s{i}", kind=kind, config=config)
        for i, (kind, config) in enumerate(spec)
    ]


def fresh(enrollment_id: uuid.UUID = ENROLLMENT) -> EnrollmentState:
    return EnrollmentState(
        id=enrollment_id,
        lead_id=LEAD,
        position=0,
        cursor=0,
        steps_done=0,
        thread_delivery_key=None,
    )


def state_after(enrollment_id: uuid.UUID, result: Advance) -> EnrollmentState:
    """What the repository would store from an Advance."""
    return EnrollmentState(
        id=enrollment_id,
        lead_id=LEAD,
        position=result.position,
        cursor=result.cursor,
        steps_done=result.steps_done,
        thread_delivery_key=result.thread_delivery_key,
        due_since=result.due_since,
    )


@dataclass
class Sent:
    at: datetime
    step: Step
    delivery_key: str
    thread_delivery_key: str | None


@dataclass
class Run:
    sent: list[Sent]
    final: Advance


def simulate(
    steps: list[Step],
    start: datetime = START,
    send_delay: timedelta = timedelta(0),
    enrollment_id: uuid.UUID = ENROLLMENT,
) -> Run:
    """Drive an enrollment to its end: send each due email (after ``send_delay``) and
    wake up at each ``next_action_at``, like the nurture service does."""
    now = start
    result = advance(fresh(enrollment_id), steps, now)
    sent: list[Sent] = []
    for _ in range(4 * len(steps) + 4):
        if result.status == "awaiting_send":
            assert result.email is not None
            assert result.next_action_at is None
            assert result.awaiting_delivery_key == result.email.delivery_key
            now = now + send_delay
            sent.append(
                Sent(
                    now,
                    result.email.step,
                    result.email.delivery_key,
                    result.email.thread_delivery_key,
                )
            )
            result = after_email_sent(state_after(enrollment_id, result), steps, now)
        elif result.status == "active":
            assert result.next_action_at is not None
            assert result.next_action_at > now
            now = result.next_action_at
            result = advance(state_after(enrollment_id, result), steps, now)
        else:
            return Run(sent, result)
    raise AssertionError("the enrollment never finished")


# ------------------------------------------------------------------------ presets


@pytest.mark.parametrize(
    ("preset", "days"),
    [
        (AGGRESSIVE_CLOSE, (0, 2, 5)),
        (REGULAR_NURTURE, (0, 3, 7, 10)),
        (LONG_TERM_NURTURE, (0, 5, 10, 15, 20, 25)),
        (COLD_OUTREACH, (0, 7, 14, 21, 28, 35, 42, 49)),
    ],
    ids=lambda v: v.key if isinstance(v, Preset) else None,
)
def test_preset_schedules(preset: Preset, days: tuple[int, ...]) -> None:
    assert preset.days == days
    assert len(preset.emails) == len(days)
    assert PRESETS[preset.key] is preset


def test_presets_registry() -> None:
    assert set(PRESETS) == {
        "aggressive_close",
        "regular_nurture",
        "long_term_nurture",
        "cold_outreach",
    }


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=lambda p: p.key)
def test_preset_steps_alternate_email_and_wait(preset: Preset) -> None:
    steps = preset.steps()
    kinds = [kind for kind, _ in steps]
    assert kinds[0] == "email"
    assert kinds.count("email") == len(preset.emails)
    assert kinds.count("wait") == len(preset.emails) - 1
    assert all(a != b for a, b in itertools.pairwise(kinds))  # never two in a row
    emails = [config for kind, config in steps if kind == "email"]
    assert emails == [{"subject": e.subject, "text": e.text} for e in preset.emails]


def cumulative_email_days(steps: list[tuple[str, dict[str, Any]]]) -> list[int]:
    day = 0
    out: list[int] = []
    for kind, config in steps:
        if kind == "wait":
            assert set(config) == {"days"}
            assert config["days"] > 0
            day += config["days"]
        else:
            out.append(day)
    return out


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=lambda p: p.key)
def test_preset_cumulative_waits_equal_day_offsets(preset: Preset) -> None:
    assert cumulative_email_days(preset.steps()) == list(preset.days)


@given(days=st.lists(st.integers(min_value=0, max_value=90), min_size=1, max_size=10).map(sorted))
@settings(max_examples=100)
def test_any_preset_schedule_becomes_waits_matching_offsets(days: list[int]) -> None:
    preset = Preset(
        key="p",
        name="P",
        description="",
        days=tuple(days),
        emails=tuple(PresetEmail(f"s{i}", f"t{i}") for i in range(len(days))),
    )
    assert cumulative_email_days(preset.steps()) == days


def test_preset_days_and_emails_must_have_the_same_length() -> None:
    broken = Preset("p", "P", "", (0, 1), (PresetEmail("s", "t"),))
    with pytest.raises(ValueError):
        broken.steps()


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=lambda p: p.key)
def test_preset_emails_render_for_a_lead_with_only_an_email(preset: Preset) -> None:
    context = template_context({"email": "ada@example.com"})
    for email in preset.emails:
        subject = render(email.subject, context)
        text = render(email.text, context)
        assert subject.strip()
        assert "{{" not in subject and "{{" not in text
        assert "Hi there," in text


# ---------------------------------------------------------------- step machine


def test_advance_from_the_start_emits_the_first_email() -> None:
    steps = make_steps(AGGRESSIVE_CLOSE.steps())
    result = advance(fresh(), steps, START)

    key = f"{ENROLLMENT}:0"
    assert result.status == "awaiting_send"
    assert result.email is not None
    assert result.email.step is steps[0]
    assert result.email.delivery_key == key
    assert result.email.thread_delivery_key is None  # the first email threads to nothing
    assert result.email.subject == AGGRESSIVE_CLOSE.emails[0].subject
    assert result.email.text == AGGRESSIVE_CLOSE.emails[0].text
    assert result.thread_delivery_key == key
    assert result.awaiting_delivery_key == key
    assert result.position == 0  # it stays on the email until the send is confirmed
    assert result.cursor == 1
    assert result.steps_done == 0
    assert result.next_action_at is None
    assert [entry.decision for entry in result.log] == ["email_due"]


def test_delivery_key_format() -> None:
    assert delivery_key(ENROLLMENT, 7) == f"{ENROLLMENT}:7"


def test_after_email_sent_moves_past_the_email_and_schedules_the_wait() -> None:
    steps = make_steps(REGULAR_NURTURE.steps())
    first = advance(fresh(), steps, START)
    sent_at = START + timedelta(minutes=3)

    result = after_email_sent(state_after(ENROLLMENT, first), steps, sent_at)

    assert result.status == "active"
    assert result.email is None
    assert result.position == 2  # past the email and the wait
    assert result.steps_done == 2
    assert result.cursor == 1
    assert result.next_action_at == sent_at + timedelta(days=3)
    assert result.thread_delivery_key == f"{ENROLLMENT}:0"


def test_after_the_wait_the_second_email_threads_to_the_first() -> None:
    steps = make_steps(REGULAR_NURTURE.steps())
    first = advance(fresh(), steps, START)
    waiting = after_email_sent(state_after(ENROLLMENT, first), steps, START)
    assert waiting.next_action_at is not None

    second = advance(state_after(ENROLLMENT, waiting), steps, waiting.next_action_at)

    assert second.status == "awaiting_send"
    assert second.email is not None
    assert second.email.step is steps[2]
    assert second.email.delivery_key == f"{ENROLLMENT}:1"
    assert second.email.thread_delivery_key == f"{ENROLLMENT}:0"
    assert second.thread_delivery_key == f"{ENROLLMENT}:0"


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=lambda p: p.key)
def test_a_whole_preset_run_sends_on_the_preset_days(preset: Preset) -> None:
    steps = make_steps(preset.steps())
    run = simulate(steps)

    assert [(s.at - START) for s in run.sent] == [timedelta(days=d) for d in preset.days]
    assert [s.step.config["subject"] for s in run.sent] == [e.subject for e in preset.emails]
    assert run.final.status == "completed"
    assert run.final.next_action_at is None
    assert run.final.email is None
    assert run.final.position == len(steps)
    assert run.final.steps_done == len(steps)
    assert run.final.cursor == len(preset.emails)


@pytest.mark.parametrize("preset", list(PRESETS.values()), ids=lambda p: p.key)
def test_delivery_keys_are_unique_and_all_thread_to_the_first(preset: Preset) -> None:
    run = simulate(make_steps(preset.steps()))

    keys = [s.delivery_key for s in run.sent]
    assert len(set(keys)) == len(keys)
    assert keys == [f"{ENROLLMENT}:{i}" for i in range(len(keys))]
    assert run.sent[0].thread_delivery_key is None
    assert all(s.thread_delivery_key == keys[0] for s in run.sent[1:])
    assert run.final.thread_delivery_key == keys[0]


def test_delivery_keys_differ_between_enrollments() -> None:
    steps = make_steps(AGGRESSIVE_CLOSE.steps())
    a = simulate(steps, enrollment_id=uuid.uuid4())
    b = simulate(steps, enrollment_id=uuid.uuid4())
    assert not {s.delivery_key for s in a.sent} & {s.delivery_key for s in b.sent}


@given(
    days=st.lists(st.integers(min_value=0, max_value=60), min_size=1, max_size=8).map(sorted),
    delay_minutes=st.integers(min_value=0, max_value=600),
)
@settings(max_examples=75)
def test_waits_count_from_the_actual_send(days: list[int], delay_minutes: int) -> None:
    preset = Preset(
        "p", "P", "", tuple(days), tuple(PresetEmail("s", "t") for _ in range(len(days)))
    )
    delay = timedelta(minutes=delay_minutes)
    run = simulate(make_steps(preset.steps()), send_delay=delay)

    # Each send happens ``delay`` after it is due, and every wait starts at the send.
    expected = [START + timedelta(days=d) + delay * (i + 1) for i, d in enumerate(days)]
    assert [s.at for s in run.sent] == expected
    assert run.final.status == "completed"


def test_zero_length_wait_continues_immediately() -> None:
    steps = make_steps(
        [
            ("email", {"subject": "a", "text": "a"}),
            ("wait", {"days": 0}),
            ("email", {"subject": "b", "text": "b"}),
        ]
    )
    first = advance(fresh(), steps, START)
    result = after_email_sent(state_after(ENROLLMENT, first), steps, START)

    assert result.status == "awaiting_send"
    assert result.email is not None
    assert result.email.step is steps[2]
    assert result.email.delivery_key == f"{ENROLLMENT}:1"
    assert result.steps_done == 2
    assert [e.decision for e in result.log] == ["wait", "email_due"]


def test_wait_durations_combine_units() -> None:
    assert wait_duration({"days": 1, "hours": 2, "minutes": 30}) == timedelta(
        days=1, hours=2, minutes=30
    )
    assert wait_duration({"hours": "1.5"}) == timedelta(minutes=90)
    assert wait_duration({}) == timedelta(0)


def test_wait_with_hours_sets_next_action() -> None:
    steps = make_steps([("wait", {"hours": 4}), ("email", {"subject": "s", "text": "t"})])
    result = advance(fresh(), steps, START)
    assert result.status == "active"
    assert result.email is None
    assert result.position == 1
    assert result.next_action_at == START + timedelta(hours=4)


def test_unknown_step_kinds_are_skipped_and_logged() -> None:
    steps = make_steps([("mystery", {}), ("email", {"subject": "s", "text": "t"})])
    result = advance(fresh(), steps, START)
    assert result.status == "awaiting_send"
    assert result.email is not None
    assert result.email.step is steps[1]
    assert result.log[0].decision == "skipped"
    assert result.log[0].step_index == 0


def test_running_past_the_last_step_completes() -> None:
    steps = make_steps([("email", {"subject": "s", "text": "t"})])
    first = advance(fresh(), steps, START)
    done = after_email_sent(state_after(ENROLLMENT, first), steps, START)
    assert done.status == "completed"
    assert done.next_action_at is None
    assert done.email is None
    assert done.log[-1].decision == "completed"


def test_empty_sequence_completes_at_once() -> None:
    result = advance(fresh(), [], START)
    assert result.status == "completed"
    assert result.email is None


def test_a_sequence_of_zero_waits_does_not_spin() -> None:
    steps = make_steps([("wait", {"days": 0})] * 50)
    result = advance(fresh(), steps, START)
    assert result.status == "completed"
    assert result.steps_done == 50


# --------------------------------------------------------------- stop reasons


def engagement(kind: EngagementType, bounce: BounceType | None = None) -> EngagementReceived:
    return EngagementReceived(
        engagement_type=kind,
        lead_id=uuid.uuid4(),
        email="ada@example.com",
        source="test",
        bounce_type=bounce,
    )


@pytest.mark.parametrize(
    ("kind", "bounce", "reason"),
    [
        (EngagementType.REPLIED, None, "replied"),
        (EngagementType.UNSUBSCRIBED, None, "unsubscribed"),
        (EngagementType.COMPLAINED, None, "complained"),
        (EngagementType.BOUNCED, BounceType.HARD, "bounced"),
        (EngagementType.BOUNCED, None, "bounced"),
        (EngagementType.BOUNCED, BounceType.SOFT, None),
        (EngagementType.BOUNCED, BounceType.POLICY, None),
        (EngagementType.OPENED, None, None),
        (EngagementType.CLICKED, None, None),
        (EngagementType.DELIVERED, None, None),
    ],
)
def test_stop_reason_for(
    kind: EngagementType, bounce: BounceType | None, reason: str | None
) -> None:
    assert stop_reason_for(engagement(kind, bounce)) == reason


@given(kind=st.sampled_from(EngagementType), bounce=st.none() | st.sampled_from(BounceType))
def test_stop_reason_exactly_when_the_sequence_stops(
    kind: EngagementType, bounce: BounceType | None
) -> None:
    event = engagement(kind, bounce)
    assert (stop_reason_for(event) is not None) is event.stops_sequence


# ---------------------------------------------------------------------- templates


def test_context_fallbacks_for_missing_values() -> None:
    context = template_context({"email": "ada@example.com", "first_name": None, "company": ""})
    assert context["first_name"] == "there"
    assert context["company"] == "your company"
    assert context["title"] == "professional"
    assert context["email"] == "ada@example.com"
    assert DEFAULT_FALLBACKS == {
        "first_name": "there",
        "company": "your company",
        "title": "professional",
    }


def test_context_lead_values_beat_fallbacks() -> None:
    context = template_context(
        {"email": "ada@example.com", "first_name": "Ada", "company": "Acme", "title": "CTO"}
    )
    assert (context["first_name"], context["company"], context["title"]) == ("Ada", "Acme", "CTO")


def test_context_fallbacks_can_be_overridden_and_extended() -> None:
    context = template_context(
        {"email": "ada@example.com"}, {"first_name": "friend", "last_name": "Lovelace"}
    )
    assert context["first_name"] == "friend"
    assert context["last_name"] == "Lovelace"
    assert context["company"] == "your company"  # defaults still apply


def test_context_exposes_custom_fields_but_not_unknown_lead_keys() -> None:
    context = template_context(
        {
            "email": "ada@example.com",
            "custom_fields": {"plan": "pro", "seats": 0, "empty": "", "none": None},
            "score": 99,
            "internal_notes": "secret",
        }
    )
    assert context["plan"] == "pro"
    assert context["seats"] == 0  # falsy but present
    assert "empty" not in context
    assert "none" not in context
    assert "score" not in context
    assert "internal_notes" not in context
    assert "custom_fields" not in context


def test_custom_fields_cannot_shadow_lead_fields() -> None:
    context = template_context(
        {"email": "ada@example.com", "first_name": "Ada", "custom_fields": {"first_name": "Eve"}}
    )
    assert context["first_name"] == "Ada"


def test_render_substitutes_variables() -> None:
    context = template_context({"email": "ada@example.com", "first_name": "Ada"})
    assert render("Hi {{ first_name }} at {{ company }}", context) == "Hi Ada at your company"


def test_render_unknown_variable_raises_render_error() -> None:
    with pytest.raises(RenderError):
        render("Hi {{ nickname }}", template_context({"email": "ada@example.com"}))


def test_render_unknown_attribute_raises_render_error() -> None:
    with pytest.raises(RenderError):
        render("{{ first_name.nope }}", {"first_name": "Ada"})


def test_render_syntax_error_raises_render_error() -> None:
    with pytest.raises(RenderError):
        render("Hi {{ first_name ", {"first_name": "Ada"})
    with pytest.raises(RenderError):
        check_template("{% if %}")
    check_template("Hi {{ first_name }}")  # does not raise


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ first_name.__class__ }}",
        "{{ first_name|attr('__class__') }}",
        "{{ '{0.__class__}'.format(first_name) }}",
        "{{ '{x.__class__}'.format_map({'x': first_name}) }}",
        "{{ '%s' % first_name.__class__ }}",
        "{{ self.__init__ }}",
        "{{ self._TemplateReference__context }}",
        "{% set x = first_name.__class__ %}{{ x }}",
    ],
)
def test_sandbox_blocks_python_internals(source: str) -> None:
    with pytest.raises(RenderError) as caught:
        render(source, {"first_name": "Ada"})
    message = str(caught.value)
    for leak in ("<class", "<module", "<function", "<built-in", "os.py"):
        assert leak not in message


def test_sandbox_cannot_mutate_context() -> None:
    tags = ["a"]
    with pytest.raises(RenderError):
        render("{{ tags.append('x') }}", {"tags": tags})
    assert tags == ["a"]


def test_html_rendering_autoescapes_lead_values() -> None:
    context = template_context(
        {"email": "ada@example.com", "first_name": "<script>alert(1)</script>", "company": "A&B"}
    )
    html = render("<p>Hi {{ first_name }} of {{ company }}</p>", context, html=True)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "A&amp;B" in html

    text = render("Hi {{ first_name }}", context)
    assert text == "Hi <script>alert(1)</script>"  # text bodies are not HTML


@given(
    name=st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=30,
    )
)
@settings(max_examples=100)
def test_html_rendering_never_emits_raw_markup_from_values(name: str) -> None:
    html = render("<b>{{ first_name }}</b>", {"first_name": name}, html=True)
    inner = html[len("<b>") : -len("</b>")]
    assert "<" not in inner and ">" not in inner and '"' not in inner


@pytest.mark.parametrize(
    "source",
    ["{{ seats + 1 }}", "{{ range(200000) | list | length }}", "{{ 1 // zero }}"],
)
def test_runtime_template_errors_are_render_errors(source: str) -> None:
    with pytest.raises(RenderError):
        render(source, {"seats": "10", "zero": 0})
