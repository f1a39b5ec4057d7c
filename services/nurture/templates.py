"""Sandboxed personalisation: templates see only the lead's fields, with fallbacks.

A variable without a value and without a fallback is an error raised here, before
anything is sent, never a "Hi ," email.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError
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


class RenderError(ValueError):
    """A template cannot be rendered for this lead."""


_text_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_html_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, autoescape=True)


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
