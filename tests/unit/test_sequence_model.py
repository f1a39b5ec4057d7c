"""The sequence model (services/nurture/model.py) and the pure step-change functions
of services/nurture/sequences.py: parsing, keys, validation, templates, settings."""

from __future__ import annotations

import re
from datetime import time
from typing import Any

import pytest

from services.nurture import sequences
from services.nurture.model import (
    ActionStep,
    ConditionStep,
    EmailStep,
    SequenceInvalid,
    WaitStep,
    assign_keys,
    parse_settings,
    parse_step,
    parse_steps,
    settings_after_patch,
    step_config,
    validate_sequence,
    variables_without_fallback,
    version_for_edit,
)
from services.nurture.windows import SendWindow


def email(key: str | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "email", "subject": "Hello {{ first_name }}", "text": "Hi."}
    if key is not None:
        data["key"] = key
    return {**data, **extra}


def wait(key: str | None = None, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"type": "wait", "days": 2}
    if key is not None:
        data["key"] = key
    return {**data, **extra}


def check(specs: list[dict[str, Any]], *, activating: bool = False) -> None:
    """Parse, key and validate, the way the API does."""
    steps = parse_steps(specs)
    validate_sequence(steps, assign_keys(steps), activating=activating)


# --------------------------------------------------------------------- parsing


def test_email_step_parses_from_api_json() -> None:
    step = parse_step(
        {
            "type": "email",
            "key": "intro",
            "subject": "  Hi {{ first_name }}  ",
            "text": "Body",
            "html": "<p>Body</p>",
            "variants": [
                {"key": "a", "weight": 2, "subject": "A", "text": "a"},
                {"key": "b", "subject": "B", "html": "<b>b</b>"},
            ],
            "reply_to_thread": True,
            "fallbacks": {"nickname": "friend"},
            "tracking": False,
            "next": "end",
        }
    )
    assert isinstance(step, EmailStep)
    assert step.key == "intro"
    assert step.subject == "Hi {{ first_name }}"  # whitespace stripped
    assert [(v.key, v.weight) for v in step.variants] == [("a", 2), ("b", 1)]
    assert step.reply_to_thread is True
    assert step.tracking is False
    assert step.next == "end"
    config = step_config(step)
    assert "key" not in config and "type" not in config
    assert config["subject"] == "Hi {{ first_name }}"
    assert config["variants"][1] == {
        "key": "b",
        "weight": 1,
        "subject": "B",
        "text": "",
        "html": "<b>b</b>",
    }
    assert config["fallbacks"] == {"nickname": "friend"}


def test_email_step_with_only_an_html_body_is_fine() -> None:
    step = parse_step({"type": "email", "subject": "S", "html": "<p>x</p>"})
    assert isinstance(step, EmailStep)
    assert step.text == ""
    assert step_config(step).get("tracking") is None  # None is not stored


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"type": "wait", "days": 3}, {"days": 3, "hours": 0, "minutes": 0, "business_days": 0}),
        (
            {"type": "wait", "hours": 1.5},
            {"days": 0, "hours": 1.5, "minutes": 0, "business_days": 0},
        ),
        (
            {"type": "wait", "minutes": 10},
            {"days": 0, "hours": 0, "minutes": 10, "business_days": 0},
        ),
        (
            {"type": "wait", "business_days": 2},
            {"days": 0, "hours": 0, "minutes": 0, "business_days": 2},
        ),
    ],
)
def test_wait_step_parses(data: dict[str, Any], expected: dict[str, Any]) -> None:
    step = parse_step(data)
    assert isinstance(step, WaitStep)
    assert step_config(step) == expected


def test_condition_step_parses_and_stores_else_under_its_api_name() -> None:
    step = parse_step(
        {
            "type": "condition",
            "key": "c",
            "condition": "if_opened",
            "step": "intro",
            "within_days": 3,
            "then": "yes",
            "else": "end",
        }
    )
    assert isinstance(step, ConditionStep)
    assert step.else_ == "end"
    assert step_config(step) == {
        "condition": "if_opened",
        "step": "intro",
        "within_days": 3,
        "then": "yes",
        "else": "end",
    }
    # What is stored parses back to the same step.
    assert parse_step({"type": "condition", "key": "c", **step_config(step)}) == step


@pytest.mark.parametrize(
    "condition",
    [
        "if_opened",
        "if_not_opened",
        "if_clicked",
        "if_replied",
        "if_not_replied",
        "if_bounced",
        "if_unsubscribed",
        "always",
    ],
)
def test_every_condition_parses(condition: str) -> None:
    step = parse_step({"type": "condition", "condition": condition})
    assert isinstance(step, ConditionStep)
    assert step_config(step) == {"condition": condition}


@pytest.mark.parametrize(
    ("data", "field", "value"),
    [
        ({"action": "update_status", "status": "lost"}, "status", "lost"),
        ({"action": "tag_lead", "tags": ["hot", "vip"]}, "tags", ["hot", "vip"]),
        ({"action": "mark_qualified"}, "action", "mark_qualified"),
        (
            {"action": "notify", "url": "https://hooks.example.com/x?y=1"},
            "url",
            "https://hooks.example.com/x?y=1",
        ),
        ({"action": "assign_to_user", "user": "alice"}, "user", "alice"),
        ({"action": "move_to_sequence", "sequence": "warm-leads"}, "sequence", "warm-leads"),
        ({"action": "stop", "reason": "done"}, "reason", "done"),
        ({"action": "stop"}, "action", "stop"),
    ],
)
def test_every_action_parses(data: dict[str, Any], field: str, value: Any) -> None:
    step = parse_step({"type": "action", **data})
    assert isinstance(step, ActionStep)
    assert step_config(step)[field] == value


def test_parse_steps_returns_the_typed_steps_in_order() -> None:
    steps = parse_steps(
        [
            email(),
            wait(),
            {"type": "condition", "condition": "always"},
            {"type": "action", "action": "stop"},
        ]
    )
    assert [type(s) for s in steps] == [EmailStep, WaitStep, ConditionStep, ActionStep]
    assert [s.type for s in steps] == ["email", "wait", "condition", "action"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "sms", "text": "x"}, "Input tag 'sms'"),
        ({"text": "x"}, "type"),
        ({**email(), "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"type": "wait", "days": 1, "weeks": 1}, "weeks: Extra inputs are not permitted"),
        (
            {"type": "condition", "condition": "always", "otherwise": "x"},
            "otherwise: Extra inputs are not permitted",
        ),
        ({"type": "wait", "days": -1}, "days: Input should be greater than or equal to 0"),
        ({"type": "wait", "hours": -2}, "hours: Input should be greater than or equal to 0"),
        ({"type": "wait", "minutes": -5}, "minutes: Input should be greater than or equal to 0"),
        ({"type": "wait", "business_days": -1}, "business_days: Input should be greater than"),
        ({"type": "wait"}, "a wait must last longer than zero"),
        (
            {"type": "wait", "days": 0, "hours": 0, "minutes": 0},
            "a wait must last longer than zero",
        ),
        ({"type": "wait", "business_days": 0}, "a wait must last longer than zero"),
        (
            {"type": "wait", "days": 1, "business_days": 2},
            "a wait is either business days or days/hours/minutes, not both",
        ),
        (
            {"type": "wait", "minutes": 30, "business_days": 1},
            "a wait is either business days or days/hours/minutes, not both",
        ),
        ({"type": "email", "subject": "S"}, "an email step needs a text or an html body"),
        (
            {"type": "email", "subject": "S", "text": "   ", "html": " "},
            "needs a text or an html body",
        ),
        ({"type": "email", "text": "x"}, "subject: Field required"),
        ({"type": "email", "subject": "", "text": "x"}, "subject: String should have at least 1"),
        (
            {**email(), "variants": [{"key": "a", "subject": "A"}]},
            "variant 'a' needs a text or an html body",
        ),
        (
            {
                **email(),
                "variants": [
                    {"key": "a", "subject": "A", "text": "a"},
                    {"key": "a", "subject": "B", "text": "b"},
                ],
            },
            "variant keys must be unique",
        ),
        (
            {
                **email(),
                "variants": [
                    {"key": "a", "weight": 0, "subject": "A", "text": "a"},
                    {"key": "b", "weight": 0, "subject": "B", "text": "b"},
                ],
            },
            "variant weights must add up to more than 0",
        ),
        ({**email(), "key": "Not A Key"}, "key: String should match pattern"),
        ({**email(), "next": "Bad Target!"}, "next: String should match pattern"),
        ({"type": "condition", "condition": "if_maybe"}, "Input should be 'if_opened'"),
        ({"type": "condition", "condition": "if_opened", "within_days": 0}, "within_days"),
        ({"type": "action", "action": "explode"}, "Input should be 'update_status'"),
        ({"type": "action", "action": "update_status"}, "action update_status needs 'status'"),
        (
            {"type": "action", "action": "update_status", "status": "won"},
            "status: Input should be 'new'",
        ),
        ({"type": "action", "action": "tag_lead"}, "action tag_lead needs 'tags'"),
        ({"type": "action", "action": "tag_lead", "tags": []}, "action tag_lead needs 'tags'"),
        ({"type": "action", "action": "notify"}, "action notify needs 'url'"),
        (
            {"type": "action", "action": "notify", "url": "ftp://example.com/hook"},
            "url 'ftp://example.com/hook' is not an http(s) URL",
        ),
        (
            {"type": "action", "action": "notify", "url": "javascript:alert(1)"},
            "is not an http(s) URL",
        ),
        (
            {"type": "action", "action": "notify", "url": "http://"},
            "is not an http(s) URL",
        ),
        ({"type": "action", "action": "assign_to_user"}, "action assign_to_user needs 'user'"),
        (
            {"type": "action", "action": "move_to_sequence"},
            "action move_to_sequence needs 'sequence'",
        ),
    ],
)
def test_invalid_steps_are_refused_with_a_message_naming_the_problem(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(SequenceInvalid, match=re.escape(message)):
        parse_step(data)


def test_parse_steps_errors_name_the_step_index() -> None:
    with pytest.raises(SequenceInvalid, match=re.escape("steps.1.hours: Input should be")):
        parse_steps([wait(), {"type": "wait", "hours": -2}])


def test_parse_steps_refuses_a_non_list() -> None:
    with pytest.raises(SequenceInvalid):
        parse_steps({"type": "wait", "days": 1})


# ------------------------------------------------------------------------ keys


def test_assign_keys_numbers_keyless_steps() -> None:
    assert assign_keys(parse_steps([email(), wait(), email()])) == ["s1", "s2", "s3"]


def test_assign_keys_keeps_given_keys_and_skips_taken_ones() -> None:
    steps = parse_steps([email(), email("s1"), wait(), wait("s3"), email(), email("intro")])
    assert assign_keys(steps) == ["s2", "s1", "s4", "s3", "s5", "intro"]


def test_assign_keys_of_nothing() -> None:
    assert assign_keys([]) == []


# ------------------------------------------------------------------ validation


def test_a_valid_sequence_passes() -> None:
    check(
        [
            email("intro"),
            wait("w1"),
            {
                "type": "condition",
                "key": "c",
                "condition": "if_opened",
                "step": "intro",
                "within_days": 3,
                "then": "follow",
                "else": "end",
            },
            email("follow", reply_to_thread=True),
            {"type": "action", "action": "mark_qualified"},
        ],
        activating=True,
    )


@pytest.mark.parametrize(
    ("step", "message"),
    [
        (email("a", next="nowhere"), "step 'a': unknown branch target next='nowhere'"),
        (
            {"type": "condition", "key": "a", "condition": "always", "then": "nowhere"},
            "step 'a': unknown branch target then='nowhere'",
        ),
        (
            {"type": "condition", "key": "a", "condition": "always", "else": "nowhere"},
            "step 'a': unknown branch target else='nowhere'",
        ),
        (wait("a", next="nowhere"), "unknown branch target next='nowhere'"),
    ],
)
def test_unknown_branch_targets_are_refused(step: dict[str, Any], message: str) -> None:
    with pytest.raises(SequenceInvalid, match=re.escape(message)):
        check([step, email("b")])


def test_end_is_an_allowed_target() -> None:
    check(
        [
            email("a", next="end"),
            {"type": "condition", "key": "c", "condition": "always", "then": "end", "else": "end"},
            wait("w", next="end"),
        ]
    )


def test_end_cannot_be_a_step_key() -> None:
    with pytest.raises(SequenceInvalid, match="'end' is reserved"):
        check([email("end")])


def test_duplicate_step_keys_are_refused() -> None:
    with pytest.raises(SequenceInvalid, match=re.escape("step key 'a' is used twice")):
        check([email("a"), wait(), email("a")])


def test_condition_scope_must_be_an_email_step() -> None:
    with pytest.raises(SequenceInvalid, match="'w', which is not an email step"):
        check([email("a"), wait("w"), {"type": "condition", "condition": "if_opened", "step": "w"}])
    with pytest.raises(SequenceInvalid, match="'ghost', which is not an email step"):
        check([email("a"), {"type": "condition", "condition": "if_opened", "step": "ghost"}])


def test_a_self_loop_via_next_is_a_loop_without_a_wait() -> None:
    with pytest.raises(SequenceInvalid, match=r"^loop without a wait: a -> a$"):
        check([email("a", next="a")])


def test_an_action_self_loop_is_a_loop_without_a_wait() -> None:
    with pytest.raises(SequenceInvalid, match=r"^loop without a wait: t -> t$"):
        check(
            [
                email("a"),
                {"type": "action", "key": "t", "action": "tag_lead", "tags": ["x"], "next": "t"},
            ]
        )


def test_a_loop_through_a_conditions_then_branch_is_detected() -> None:
    with pytest.raises(SequenceInvalid, match=r"^loop without a wait: a -> c -> a$"):
        check(
            [
                email("a"),
                {
                    "type": "condition",
                    "key": "c",
                    "condition": "if_not_opened",
                    "within_days": 2,
                    "then": "a",
                    "else": "end",
                },
            ]
        )


def test_a_loop_through_a_conditions_else_branch_is_detected() -> None:
    with pytest.raises(SequenceInvalid, match=r"^loop without a wait: a -> b -> c -> a$"):
        check(
            [
                email("a"),
                email("b"),
                {
                    "type": "condition",
                    "key": "c",
                    "condition": "if_opened",
                    "then": "end",
                    "else": "a",
                },
            ]
        )


def test_a_loop_through_the_default_next_is_detected() -> None:
    # b's default next is c, c jumps back to b.
    with pytest.raises(SequenceInvalid, match=r"^loop without a wait: b -> c -> b$"):
        check(
            [
                email("a"),
                email("b"),
                {"type": "action", "key": "c", "action": "mark_qualified", "next": "b"},
            ]
        )


def test_a_loop_through_a_wait_is_fine() -> None:
    check(
        [
            email("a"),
            wait("w"),
            {
                "type": "condition",
                "key": "c",
                "condition": "if_not_replied",
                "then": "a",
                "else": "end",
            },
        ]
    )
    check([email("a"), wait("w", next="a")])
    check([wait("w", next="w"), email("a")])


def test_stop_and_move_end_a_path_so_they_close_no_loop() -> None:
    check([email("a"), {"type": "action", "action": "stop"}, email("b", next="a")])


def test_activating_refuses_an_empty_sequence() -> None:
    check([])  # a draft may be empty
    with pytest.raises(SequenceInvalid, match="empty sequence cannot be activated"):
        check([], activating=True)


def test_activating_refuses_a_sequence_without_email_steps() -> None:
    steps = [wait(), {"type": "action", "action": "mark_qualified"}]
    check(steps)
    with pytest.raises(SequenceInvalid, match="at least one email step"):
        check(steps, activating=True)


# ------------------------------------------------------------------- templates


def test_variables_without_fallback_finds_the_uncovered_ones() -> None:
    source = "Hi {{ nickname }} from {{ company }}, {{ zeta }} {{ alpha }}"
    assert variables_without_fallback(source) == ["alpha", "nickname", "zeta"]


def test_the_usual_variables_are_covered() -> None:
    source = "{{ first_name }} {{ company }} {{ title }} {{ email }}"
    assert variables_without_fallback(source) == []


def test_last_name_is_not_covered_by_default() -> None:
    assert variables_without_fallback("Dear {{ last_name }}") == ["last_name"]


@pytest.mark.parametrize(
    "source",
    [
        "{{ x | default('y') }}",
        "{{ x|default('y', true) }}",
        "{{ x | d('y') }}",
        "{% if x | default(false) %}yes{% endif %}",
    ],
)
def test_default_filter_covers_its_variable(source: str) -> None:
    assert variables_without_fallback(source) == []


def test_default_on_one_variable_does_not_cover_another() -> None:
    assert variables_without_fallback("{{ x | default('y') }} {{ z }}") == ["z"]


def test_a_bare_use_is_not_covered_by_a_default_elsewhere() -> None:
    assert variables_without_fallback("Hi {{ x | default('there') }}, about {{ x }}") == ["x"]


def test_fallbacks_cover_variables() -> None:
    assert variables_without_fallback("{{ nickname }} {{ city }}", ["nickname"]) == ["city"]
    assert (
        variables_without_fallback("{{ nickname }} {{ city }}", {"nickname": "a", "city": "b"})
        == []
    )


def test_locally_set_variables_need_no_fallback() -> None:
    assert (
        variables_without_fallback("{% set n = 'a' %}{{ n }}{% for i in [1] %}{{ i }}{% endfor %}")
        == []
    )


@pytest.mark.parametrize(
    "source", ["{{ first_name ", "{% if %}", "{% for x in %}{% endfor %}", "{{ }}"]
)
def test_template_syntax_errors_are_sequence_invalid(source: str) -> None:
    with pytest.raises(SequenceInvalid, match="template syntax error"):
        variables_without_fallback(source)


def test_validate_sequence_reports_a_variable_without_fallback() -> None:
    with pytest.raises(
        SequenceInvalid,
        match=re.escape("step 'a' text: template variable 'nickname' has no fallback"),
    ):
        check([email("a", text="Hey {{ nickname }}")])


def test_validate_sequence_checks_subject_and_html() -> None:
    with pytest.raises(
        SequenceInvalid, match=re.escape("step 'a' subject: template variable 'nickname'")
    ):
        check([email("a", subject="Hi {{ nickname }}")])
    with pytest.raises(
        SequenceInvalid, match=re.escape("step 'a' html: template variable 'nickname'")
    ):
        check([email("a", html="<p>{{ nickname }}</p>")])


def test_validate_sequence_checks_variant_subjects() -> None:
    step = email(
        "a",
        variants=[
            {"key": "v1", "subject": "Plain", "text": "a"},
            {"key": "v2", "subject": "Yo {{ nickname }}", "text": "b"},
        ],
    )
    with pytest.raises(
        SequenceInvalid,
        match=re.escape(
            "step 'a' variant v2 subject: template variable 'nickname' has no fallback"
        ),
    ):
        check([step])


def test_step_fallbacks_cover_the_step_and_its_variants() -> None:
    check(
        [
            email(
                "a",
                text="Hey {{ nickname }}",
                fallbacks={"nickname": "friend"},
                variants=[{"key": "v", "subject": "Yo {{ nickname }}", "text": "{{ nickname }}"}],
            )
        ]
    )


def test_fallbacks_of_one_step_do_not_cover_another() -> None:
    with pytest.raises(
        SequenceInvalid, match=re.escape("step 'b' text: template variable 'nickname'")
    ):
        check(
            [
                email("a", text="{{ nickname }}", fallbacks={"nickname": "x"}),
                email("b", text="{{ nickname }}"),
            ]
        )


def test_validate_sequence_reports_template_syntax_errors() -> None:
    with pytest.raises(SequenceInvalid, match="template syntax error"):
        check([email("a", text="{% if %}")])


# -------------------------------------------------------------------- settings


def test_settings_default() -> None:
    for data in (None, {}):
        settings = parse_settings(data)
        assert settings.send_window is None
        assert settings.window() is None
        assert settings.company_stop is False
        assert settings.tracking is True


def test_settings_accept_a_send_window_company_stop_and_tracking() -> None:
    settings = parse_settings(
        {
            "send_window": {
                "timezone": "Europe/Berlin",
                "start": "08:30",
                "end": "18:00",
                "weekdays": ["mon", "tue", "wed"],
                "holidays": "de",
                "jitter_minutes": 15,
            },
            "company_stop": True,
            "tracking": False,
        }
    )
    assert settings.company_stop is True
    assert settings.tracking is False
    assert settings.window() == SendWindow(
        timezone="Europe/Berlin",
        start=time(8, 30),
        end=time(18, 0),
        weekdays=frozenset({0, 1, 2}),
        holidays_country="DE",
        jitter_minutes=15,
    )


@pytest.mark.parametrize(
    "window",
    [
        {"timezone": "Mars/Olympus_Mons"},
        {"timezone": "UTC", "start": "18:00", "end": "09:00"},
        {"timezone": "UTC", "weekdays": []},
        {"timezone": "UTC", "opens": "09:00"},
    ],
)
def test_invalid_send_windows_are_refused_naming_send_window(window: dict[str, Any]) -> None:
    with pytest.raises(SequenceInvalid, match="send_window"):
        parse_settings({"send_window": window})


def test_bad_timezone_message_names_the_zone() -> None:
    with pytest.raises(SequenceInvalid, match=r"send_window: .*'Mars/Olympus_Mons'"):
        parse_settings({"send_window": {"timezone": "Mars/Olympus_Mons"}})


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(SequenceInvalid, match=re.escape("settings.colour")):
        parse_settings({"colour": "red"})


# ---------------------------------------------------------------- step changes


def stored(specs: list[dict[str, Any]]) -> sequences.KeyedSteps:
    """Steps as load_steps returns them: each keyed, with its key in the step."""
    keyed = sequences.keyed(parse_steps(specs))
    return [(k, parse_step({"type": s.type, "key": k, **step_config(s)})) for k, s in keyed]


def keys_of(steps: sequences.KeyedSteps) -> list[str]:
    return [k for k, _ in steps]


@pytest.fixture
def three() -> sequences.KeyedSteps:
    return stored([email("a"), wait("b"), email("c")])


def test_keyed_generates_missing_keys() -> None:
    assert keys_of(sequences.keyed(parse_steps([email(), email("s1"), wait()]))) == [
        "s2",
        "s1",
        "s3",
    ]


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        (0, ["new", "a", "b", "c"]),
        (1, ["a", "new", "b", "c"]),
        (3, ["a", "b", "c", "new"]),
        (None, ["a", "b", "c", "new"]),
        (99, ["a", "b", "c", "new"]),
        (-4, ["new", "a", "b", "c"]),
        (-1, ["new", "a", "b", "c"]),
    ],
)
def test_add_step_at_a_position(
    three: sequences.KeyedSteps, position: int | None, expected: list[str]
) -> None:
    result = sequences.add_step(wait("new", hours=3), position)(three)
    assert keys_of(result) == expected
    added = dict(result)["new"]
    assert isinstance(added, WaitStep) and added.hours == 3
    assert keys_of(three) == ["a", "b", "c"]  # the input is not changed


def test_add_step_without_key_gets_a_free_one() -> None:
    steps = stored([email("s1"), email("intro"), wait("s2")])
    result = sequences.add_step(email(), None)(steps)
    assert keys_of(result) == ["s1", "intro", "s2", "s3"]


def test_add_step_refuses_a_duplicate_key(three: sequences.KeyedSteps) -> None:
    with pytest.raises(SequenceInvalid, match=re.escape("step key 'b' is used twice")):
        sequences.add_step(email("b"), 0)(three)


def test_add_step_parses_the_step_first() -> None:
    with pytest.raises(SequenceInvalid, match="a wait must last longer than zero"):
        sequences.add_step({"type": "wait"}, None)


def test_replace_step_keeps_the_position(three: sequences.KeyedSteps) -> None:
    result = sequences.replace_step("b", {"type": "wait", "business_days": 4})(three)
    assert keys_of(result) == ["a", "b", "c"]
    replaced = result[1][1]
    assert isinstance(replaced, WaitStep)
    assert replaced.business_days == 4 and replaced.key == "b"
    assert result[0] == three[0] and result[2] == three[2]


def test_replace_step_can_rename(three: sequences.KeyedSteps) -> None:
    result = sequences.replace_step("b", {"type": "wait", "days": 1, "key": "pause"})(three)
    assert keys_of(result) == ["a", "pause", "c"]
    assert result[1][1].key == "pause"


def test_replace_step_of_an_unknown_key(three: sequences.KeyedSteps) -> None:
    with pytest.raises(sequences.NotFound, match="'zzz'"):
        sequences.replace_step("zzz", wait())(three)


def test_remove_step(three: sequences.KeyedSteps) -> None:
    assert keys_of(sequences.remove_step("b")(three)) == ["a", "c"]


def test_remove_step_of_an_unknown_key(three: sequences.KeyedSteps) -> None:
    with pytest.raises(sequences.NotFound, match="'zzz'"):
        sequences.remove_step("zzz")(three)


def test_reorder_steps(three: sequences.KeyedSteps) -> None:
    result = sequences.reorder_steps(["c", "a", "b"])(three)
    assert keys_of(result) == ["c", "a", "b"]
    assert dict(result) == dict(three)


@pytest.mark.parametrize(
    "order",
    [["a", "b"], ["a", "b", "c", "d"], ["a", "b", "b"], ["a", "a", "b", "c"], [], ["x", "y", "z"]],
)
def test_reorder_steps_must_name_every_step_once(
    three: sequences.KeyedSteps, order: list[str]
) -> None:
    with pytest.raises(SequenceInvalid, match="order must name every step exactly once: a, b, c"):
        sequences.reorder_steps(order)(three)


def test_a_change_that_breaks_a_reference_is_caught_by_validation() -> None:
    steps = stored([email("a", next="c"), wait("b"), email("c")])
    changed = sequences.remove_step("c")(steps)
    with pytest.raises(SequenceInvalid, match="unknown branch target next='c'"):
        validate_sequence([s for _, s in changed], keys_of(changed))


# -------------------------------------------------------------------- versioning


def test_a_draft_version_is_edited_in_place() -> None:
    for status in ("draft", "paused"):
        target = version_for_edit(status, 3, frozen=False)
        assert (target.new, target.version, target.frozen) == (False, 3, False)


def test_an_edit_of_a_frozen_version_becomes_the_next_version() -> None:
    # Active: new enrollments join the new version at once, so it is frozen at once.
    active = version_for_edit("active", 1, frozen=True)
    assert (active.new, active.version, active.frozen) == (True, 2, True)
    # Paused: nobody joins until it is activated again, so more edits may follow.
    paused = version_for_edit("paused", 4, frozen=True)
    assert (paused.new, paused.version, paused.frozen) == (True, 5, False)


WINDOW = {"timezone": "Europe/London", "start": "09:00", "end": "17:00"}


def test_a_settings_patch_replaces_the_keys_it_names() -> None:
    current = parse_settings({"send_window": WINDOW}).model_dump(exclude_none=True)
    after = settings_after_patch(current, {"company_stop": True})
    assert after == {"send_window": WINDOW, "company_stop": True, "tracking": True}
    later = {**WINDOW, "start": "13:00"}
    assert settings_after_patch(current, {"send_window": later}) == {
        "send_window": later,
        "company_stop": False,
        "tracking": True,
    }
    # Setting the window to null removes it.
    assert settings_after_patch(current, {"send_window": None}) == {
        "company_stop": False,
        "tracking": True,
    }


def test_a_settings_patch_that_changes_nothing_makes_no_version() -> None:
    current = parse_settings({"send_window": WINDOW}).model_dump(exclude_none=True)
    assert settings_after_patch(current, None) is None
    assert settings_after_patch(current, {}) is None
    assert settings_after_patch(current, {"tracking": True, "send_window": WINDOW}) is None
    assert settings_after_patch({}, {"company_stop": False}) is None


def test_a_settings_patch_is_validated_as_a_whole() -> None:
    with pytest.raises(SequenceInvalid, match="send_window"):
        settings_after_patch({}, {"send_window": {"timezone": "Mars/Olympus"}})
    with pytest.raises(SequenceInvalid, match="colour"):
        settings_after_patch({}, {"colour": "red"})
