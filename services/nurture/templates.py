"""Sandboxed personalisation: templates see only the lead's fields, with fallbacks.

A variable without a value and without a fallback is an error raised here, before
anything is sent, never a "Hi ," email.

Templates are written by users, so rendering one must not exhaust the memory or the
CPU: arithmetic (``*``, ``**``, ``+``, ``%``), concatenation (``~``), the filters
that can multiply a text (``center``, ``indent``, ``replace``, ``join``,
``wordwrap``, ``format``, ``batch``, ``slice``, ``urlize``) and the rendered output
are bounded, and going over a bound is a clear render error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from jinja2 import Environment, StrictUndefined, TemplateError, pass_environment, pass_eval_context
from jinja2 import filters as jinja_filters
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.nodes import Concat, EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Defaults for the usual variables when the lead lacks them.
DEFAULT_FALLBACKS: dict[str, str] = {
    "first_name": "there",
    "company": "your company",
    "title": "professional",
}

LEAD_VARIABLES = (
    "email",
    "first_name",
    "last_name",
    "company",
    "title",
    "timezone",
    "country",
)

#: Longest text or list a template may make, and longest rendered result (an email
#: body is far smaller: Gmail clips messages at about 100 KB).
MAX_LENGTH = 200_000
#: Largest integer a template may make, in bits (about 1,200 decimal digits).
MAX_INT_BITS = 4096


class RenderError(ValueError):
    """A template cannot be rendered for this lead."""


def _too_large(what: str, size: int) -> SecurityError:
    return SecurityError(
        f"{what} would be {size:,} long, over the template limit of {MAX_LENGTH:,}"
    )


def _check_length(what: str, size: int) -> None:
    if size > MAX_LENGTH:
        raise _too_large(what, size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int)  # bool included: True * 'x' is 'x'


def _bits(value: int) -> int:
    return abs(value).bit_length()


_SIZED = (str, bytes, list, tuple)


def _check_repeat(sequence: Any, times: int) -> None:
    _check_length("a repeated text or list", len(sequence) * max(times, 0))


#: A printf-style conversion: %(name)s, %-10.3f, %*d ...
_CONVERSION = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")


def _check_printf(template: str) -> None:
    """``'%0999999999d' % 1`` would allocate a gigabyte: bound widths and precisions."""
    for found in _CONVERSION.finditer(template):
        for number in found.groups():
            if number == "*":
                raise SecurityError("'*' widths and precisions are not allowed in templates")
            if number and int(number) > MAX_LENGTH:
                _check_length(f"the formatted field {found.group(0)!r}", int(number))


def _check_binop(operator: str, left: Any, right: Any) -> None:
    if operator == "*":
        if isinstance(left, _SIZED) and _is_int(right):
            _check_repeat(left, right)
        elif isinstance(right, _SIZED) and _is_int(left):
            _check_repeat(right, left)
        elif _is_int(left) and _is_int(right) and _bits(left) + _bits(right) > MAX_INT_BITS:
            raise SecurityError(f"a product over {MAX_INT_BITS} bits is over the template limit")
    elif operator == "**":
        grows = _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1
        if grows and _bits(left) * right > MAX_INT_BITS:
            raise SecurityError(f"a power over {MAX_INT_BITS} bits is over the template limit")
    elif operator == "+":
        if isinstance(left, _SIZED) and isinstance(right, _SIZED):
            _check_length("a concatenation", len(left) + len(right))
    elif operator == "%" and isinstance(left, str):
        _check_printf(left)


class _BoundedCodeGenerator(CodeGenerator):
    """Checks the length of every ``~`` concatenation (a loop doubling a text with
    ``~`` stops at the limit instead of exhausting the memory)."""

    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        self.write("environment.bounded_text(")
        super().visit_Concat(node, frame)
        self.write(")")


def _bounded_join(parts: Iterable[str]) -> str:
    """The rendered output, joined as it is produced: refused as soon as it grows too
    long (a loop cannot pile up pieces past the limit)."""
    pieces: list[str] = []
    size = 0
    for piece in parts:
        size += len(piece)
        if size > MAX_LENGTH:
            raise _too_large("the rendered template", size)
        pieces.append(piece)
    return "".join(pieces)


# ----------------------------------------------------------------- bounded filters


def _center(value: Any, width: int = 80) -> str:
    _check_length("a centered text", int(width))
    return jinja_filters.do_center(value, width)


def _indent(s: str, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = str(s)
    indent = len(width) if isinstance(width, str) else int(width)
    _check_length("an indented text", len(text) + (text.count("\n") + 1) * max(indent, 0))
    return jinja_filters.do_indent(s, width, first, blank)


@pass_eval_context
def _replace(eval_ctx: EvalContext, s: str, old: str, new: str, count: int | None = None) -> str:
    text, before, after = str(s), str(old), str(new)
    hits = text.count(before) if before else len(text) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    _check_length("a replaced text", len(text) + hits * max(len(after) - len(before), 0))
    return jinja_filters.do_replace(eval_ctx, s, old, new, count)


@pass_eval_context
def _join(
    eval_ctx: EvalContext, value: Iterable[Any], d: str = "", attribute: str | int | None = None
) -> str:
    items = list(value)
    if attribute is not None:
        items = list(map(jinja_filters.make_attrgetter(eval_ctx.environment, attribute), items))
    size = sum(len(str(item)) for item in items) + max(len(items) - 1, 0) * len(str(d))
    _check_length("a joined text", size)
    return jinja_filters.sync_do_join(eval_ctx, items, d)


def _format(value: str, *args: Any, **kwargs: Any) -> str:
    _check_printf(str(value))
    return jinja_filters.do_format(value, *args, **kwargs)


@pass_environment
def _wordwrap(
    environment: Environment,
    s: str,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> Any:
    text = str(s)
    if wrapstring is not None:
        lines = len(text) // max(int(width), 1) + text.count("\n") + 1
        _check_length("a wrapped text", len(text) + lines * len(str(wrapstring)))
    return jinja_filters.do_wordwrap(
        environment, s, width, break_long_words, wrapstring, break_on_hyphens
    )


def _batch(value: Iterable[Any], linecount: int, fill_with: Any = None) -> Any:
    _check_length("a batch", int(linecount))
    return jinja_filters.do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    _check_length("a slicing", int(slices))
    return jinja_filters.sync_do_slice(value, slices, fill_with)


@pass_eval_context
def _urlize(
    eval_ctx: EvalContext,
    value: str,
    trim_url_limit: int | None = None,
    nofollow: bool = False,
    target: str | None = None,
    rel: str | None = None,
    extra_schemes: Iterable[str] | None = None,
) -> str:
    text = str(value)
    # Each word may become <a href="word" rel=".." target="..">word</a>.
    per_link = len(str(target or "")) + len(str(rel or "")) + 64
    _check_length("a text with links", 2 * len(text) + len(text.split()) * per_link)
    return jinja_filters.do_urlize(
        eval_ctx, value, trim_url_limit, nofollow, target, rel, extra_schemes
    )


_BOUNDED_FILTERS: dict[str, Any] = {
    "center": _center,
    "indent": _indent,
    "replace": _replace,
    "join": _join,
    "format": _format,
    "wordwrap": _wordwrap,
    "batch": _batch,
    "slice": _slice,
    "urlize": _urlize,
}


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with bounded arithmetic, concatenation, amplifying
    filters and output (see the module docstring)."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})
    code_generator_class = _BoundedCodeGenerator
    concat = staticmethod(_bounded_join)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters.update(_BOUNDED_FILTERS)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    @staticmethod
    def bounded_text(value: str) -> str:
        _check_length("a concatenation", len(value))
        return value


_text_env = BoundedSandbox(undefined=StrictUndefined, autoescape=False)
_html_env = BoundedSandbox(undefined=StrictUndefined, autoescape=True)


@lru_cache(maxsize=4096)
def _compile(source: str, html: bool) -> Any:
    env = _html_env if html else _text_env
    return env.from_string(source)


def template_context(
    lead: Mapping[str, Any], fallbacks: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The variables a template may use: lead fields and custom fields, with fallbacks
    for empty values."""
    merged_fallbacks = {**DEFAULT_FALLBACKS, **(fallbacks or {})}
    context: dict[str, Any] = {}
    custom = lead.get("custom_fields") or {}
    for key, value in custom.items():
        if value not in (None, ""):
            context[str(key)] = value
    for key in LEAD_VARIABLES:
        value = lead.get(key)
        if value not in (None, ""):
            context[key] = value
    for key, value in merged_fallbacks.items():
        context.setdefault(key, value)
    return context


def render(source: str, context: Mapping[str, Any], *, html: bool = False) -> str:
    try:
        return str(_compile(source, html).render(**context))
    except TemplateError as exc:
        raise RenderError(f"template error: {exc}") from exc
    except Exception as exc:  # a template's own arithmetic, types, sandbox limits
        raise RenderError(f"template error: {type(exc).__name__}: {exc}") from exc


def check_template(source: str) -> None:
    """Raise RenderError when a template does not parse."""
    try:
        _compile(source, False)
    except TemplateError as exc:
        raise RenderError(f"template error: {exc}") from exc
