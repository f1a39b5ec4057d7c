"""Template sandbox limits: a user's template cannot exhaust memory or CPU through
arithmetic, concatenation, amplifying filters or its output; legitimate templates
render as before."""

from __future__ import annotations

import time

import pytest

from services.nurture.templates import MAX_LENGTH, RenderError, check_template, render

LEAD = {"first_name": "Ann", "company": "Acme", "score": 7}

BOMBS = [
    ("{{ 'x' * 10**9 }}", "repeated text"),
    ("{{ 10**9 * 'x' }}", "repeated text"),
    ("{{ ['x'] * 10**9 }}", "repeated text"),
    ("{{ 9 ** (9 ** 9) }}", "power over"),
    ("{{ 2 ** 100000 }}", "power over"),
    ("{{ (10 ** 1000) * (10 ** 1000) * (10 ** 1000) * (10 ** 1000) * (10 ** 1000) }}", "product"),
    ("{{ '%0999999999d' % 1 }}", "formatted field"),
    ("{{ '%.999999999f' % 1.5 }}", "formatted field"),
    ("{{ '%*d' % (10**9, 1) }}", "'*' widths"),
    ("{{ '%0999999999d'|format(1) }}", "formatted field"),
    ("{{ ('x' * 150000) + ('y' * 150000) }}", "concatenation"),
    (
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "concatenation",
    ),
    ("{% for i in range(100000) %}{{ 'y' * 200000 }}{% endfor %}", "rendered template"),
    ("{{ ''|center(10**9) }}", "centered"),
    ("{{ ('a\n' * 1000)|indent(10**6) }}", "indented"),
    ("{{ ('ab' * 1000)|replace('', 'x' * 1000) }}", "replaced"),
    ("{{ range(100000)|join('x' * 100000) }}", "joined"),
    ("{{ ('word ' * 1000)|wordwrap(1, wrapstring='x' * 10000) }}", "wrapped"),
    ("{{ [1]|batch(10**9, 'x')|list }}", "batch"),
    ("{{ [1]|slice(10**9, 'x')|list }}", "slicing"),
    ("{{ ('a.io ' * 10000)|urlize(target='x' * 10000) }}", "links"),
]


@pytest.mark.parametrize(("source", "says"), BOMBS)
def test_a_template_bomb_fails_fast_with_a_clear_render_error(source: str, says: str) -> None:
    started = time.monotonic()
    with pytest.raises(RenderError) as caught:
        render(source, LEAD)
    assert time.monotonic() - started < 2.0
    assert says in str(caught.value)
    assert "template" in str(caught.value)


@pytest.mark.parametrize("html", [False, True])
def test_the_html_environment_is_bounded_too(html: bool) -> None:
    with pytest.raises(RenderError, match="repeated text"):
        render("<p>{{ 'x' * 10**9 }}</p>", LEAD, html=html)


def test_a_bomb_compiles_without_being_evaluated() -> None:
    """Intercepted operators are not folded at compile time: checking a template's
    syntax never runs its arithmetic."""
    started = time.monotonic()
    check_template("{{ 9 ** (9 ** 9) }} {{ 'x' * 10**9 }}")
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ 'ab' * 3 }}", "ababab"),
        ("{{ 3 * 'ab' }}", "ababab"),
        ("{{ [0] * 2 }}", "[0, 0]"),
        ("{{ 2 ** 10 }} {{ 2 ** -1 }} {{ 1 ** (10 ** 9) }} {{ 1.5 * 2 }}", "1024 0.5 1 3.0"),
        ("{{ score * 3 + 1 }} {{ score % 4 }} {{ score // 2 }}", "22 3 3"),
        ("{{ '%05.1f' % 3.14159 }} {{ '%s at %s' % (first_name, company) }}", "003.1 Ann at Acme"),
        ("{{ '%s!'|format(first_name) }}", "Ann!"),
        ("{{ first_name ~ ' from ' ~ company }}", "Ann from Acme"),
        ("{{ 'a' + 'b' }} {{ [1] + [2] }}", "ab [1, 2]"),
        ("{{ 'x'|center(5) }}|", "  x  |"),
        ("{{ 'a\nb'|indent(2) }}", "a\n  b"),
        ("{{ 'a,b'|replace(',', ', ') }}", "a, b"),
        ("{{ ['a', 'b']|join(', ') }}", "a, b"),
        ("{{ [1, 2, 3]|batch(2)|list }}", "[[1, 2], [3]]"),
        ("{{ [1, 2, 3]|slice(2)|list }}", "[[1, 2], [3]]"),
        ("{{ 'see https://acme.example'|urlize }}", 'see <a href="https://acme.example"'),
        ("{{ 'one two'|wordwrap(3) }}", "one\ntwo"),
    ],
)
def test_ordinary_templates_render_as_before(source: str, expected: str) -> None:
    assert render(source, LEAD).startswith(expected)


def test_output_up_to_the_limit_is_fine() -> None:
    assert len(render("{{ 'x' * n }}", {"n": MAX_LENGTH})) == MAX_LENGTH
    with pytest.raises(RenderError):
        render("{{ 'x' * n }}{{ 'y' }}", {"n": MAX_LENGTH})
