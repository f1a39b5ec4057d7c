"""The sequence model: what steps look like, and what makes a sequence valid.

Steps have a ``key`` that stays the same across versions; branch targets (``next``,
``then``, ``else``) name keys, or ``end``. Validation errors say exactly what is
wrong, so the API can answer 422 with that message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from jinja2 import TemplateSyntaxError, meta, nodes
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from services.nurture.templates import DEFAULT_FALLBACKS, _text_env
from services.nurture.windows import SendWindow, WindowInvalid

STEP_KEY = r"^[a-z0-9][a-z0-9_-]{0,39}$"
SEQUENCE_KEY = r"^[a-z0-9][a-z0-9_-]{0,99}$"
END = "end"
#: Template variables every lead has.
ALWAYS_PRESENT = frozenset({"email"})

CONDITIONS = (
    "if_opened",
    "if_not_opened",
    "if_clicked",
    "if_replied",
    "if_not_replied",
    "if_bounced",
    "if_unsubscribed",
    "always",
)
ACTIONS = (
    "update_status",
    "tag_lead",
    "mark_qualified",
    "notify",
    "assign_to_user",
    "move_to_sequence",
    "stop",
)
LEAD_STATUSES = ("new", "contacted", "qualified", "lost", "invalid")


class SequenceInvalid(ValueError):
    """The sequence or one of its steps breaks a rule; the message says which."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, populate_by_name=True)


class EmailVariant(_Model):
    key: str = Field(pattern=r"^[A-Za-z0-9_-]{1,20}$")
    weight: int = Field(default=1, ge=0, le=1000)
    subject: str = Field(min_length=1, max_length=500)
    text: str = Field(default="", max_length=100_000)
    html: str | None = Field(default=None, max_length=500_000)


class _Step(_Model):
    key: str | None = Field(default=None, pattern=STEP_KEY)
    #: Where to go after this step (default: the following step).
    next: str | None = Field(default=None, pattern=STEP_KEY)


class EmailStep(_Step):
    type: Literal["email"] = "email"
    subject: str = Field(min_length=1, max_length=500)
    text: str = Field(default="", max_length=100_000)
    html: str | None = Field(default=None, max_length=500_000)
    variants: list[EmailVariant] = Field(default_factory=list, max_length=10)
    #: Send as "Re: <first subject>" in the thread of the first email.
    reply_to_thread: bool = False
    #: Per-template fallbacks, on top of first_name/company/title.
    fallbacks: dict[str, str] = Field(default_factory=dict)
    tracking: bool | None = None

    @model_validator(mode="after")
    def _has_body(self) -> EmailStep:
        if not self.text.strip() and not (self.html or "").strip():
            raise ValueError("an email step needs a text or an html body")
        for variant in self.variants:
            if not variant.text.strip() and not (variant.html or "").strip():
                raise ValueError(f"variant {variant.key!r} needs a text or an html body")
        if self.variants:
            keys = [v.key for v in self.variants]
            if len(set(keys)) != len(keys):
                raise ValueError("variant keys must be unique")
            if sum(v.weight for v in self.variants) <= 0:
                raise ValueError("variant weights must add up to more than 0")
        return self


class WaitStep(_Step):
    type: Literal["wait"] = "wait"
    days: float = Field(default=0, ge=0, le=3650)
    hours: float = Field(default=0, ge=0, le=87600)
    minutes: float = Field(default=0, ge=0, le=5_256_000)
    #: Business days (the sequence's weekdays, minus public holidays), instead of
    #: calendar time.
    business_days: int = Field(default=0, ge=0, le=1000)

    @model_validator(mode="after")
    def _positive(self) -> WaitStep:
        calendar = self.days or self.hours or self.minutes
        if not calendar and not self.business_days:
            raise ValueError("a wait must last longer than zero")
        if calendar and self.days * 1440 + self.hours * 60 + self.minutes < 1:
            raise ValueError("a wait must last at least a minute")
        if calendar and self.business_days:
            raise ValueError("a wait is either business days or days/hours/minutes, not both")
        return self


class ConditionStep(_Step):
    type: Literal["condition"] = "condition"
    condition: Literal[
        "if_opened",
        "if_not_opened",
        "if_clicked",
        "if_replied",
        "if_not_replied",
        "if_bounced",
        "if_unsubscribed",
        "always",
    ]
    #: Only engagement with this email step counts (default: engagement with any email
    #: since the latest one was sent).
    step: str | None = Field(default=None, pattern=STEP_KEY)
    #: Only engagement within this many days of that email counts; the condition
    #: waits until then for a positive answer.
    within_days: float | None = Field(default=None, gt=0, le=365)
    then: str | None = Field(default=None, pattern=STEP_KEY)
    else_: str | None = Field(default=None, alias="else", pattern=STEP_KEY)


class ActionStep(_Step):
    type: Literal["action"] = "action"
    action: Literal[
        "update_status",
        "tag_lead",
        "mark_qualified",
        "notify",
        "assign_to_user",
        "move_to_sequence",
        "stop",
    ]
    status: Literal["new", "contacted", "qualified", "lost", "invalid"] | None = None
    tags: list[str] = Field(default_factory=list, max_length=50)
    user: str | None = Field(default=None, min_length=1, max_length=200)
    url: str | None = Field(default=None, max_length=2000)
    sequence: str | None = Field(default=None, pattern=SEQUENCE_KEY)
    reason: str | None = Field(default=None, max_length=500)

    @model_validator(mode="after")
    def _arguments(self) -> ActionStep:
        needs = {
            "update_status": ("status", self.status),
            "tag_lead": ("tags", self.tags),
            "assign_to_user": ("user", self.user),
            "notify": ("url", self.url),
            "move_to_sequence": ("sequence", self.sequence),
        }
        if self.action in needs:
            name, value = needs[self.action]
            if not value:
                raise ValueError(f"action {self.action} needs {name!r}")
        if self.url is not None and not re.match(r"^https?://[^\s/$.?#][^\s]*$", self.url):
            raise ValueError(f"url {self.url!r} is not an http(s) URL")
        return self


StepSpec = Annotated[EmailStep | WaitStep | ConditionStep | ActionStep, Field(discriminator="type")]
_STEP = TypeAdapter(StepSpec)
_STEPS = TypeAdapter(list[StepSpec])


def _error_message(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for error in exc.errors()[:5]:
        loc = ".".join(
            str(p)
            for p in error.get("loc", ())
            if p not in ("email", "wait", "condition", "action")
        )
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{prefix}{loc}: {message}" if loc else f"{prefix}{message}")
    return "; ".join(parts)


def parse_step(data: Any) -> EmailStep | WaitStep | ConditionStep | ActionStep:
    try:
        return _STEP.validate_python(data)
    except ValidationError as exc:
        raise SequenceInvalid(_error_message(exc)) from exc


def parse_steps(data: Any) -> list[EmailStep | WaitStep | ConditionStep | ActionStep]:
    try:
        return _STEPS.validate_python(data)
    except ValidationError as exc:
        raise SequenceInvalid(_error_message(exc, "steps.")) from exc


def step_config(step: EmailStep | WaitStep | ConditionStep | ActionStep) -> dict[str, Any]:
    """What is stored for a step (its JSON, ``else`` spelled as in the API)."""
    return step.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"key", "type"})


def assign_keys(steps: Sequence[EmailStep | WaitStep | ConditionStep | ActionStep]) -> list[str]:
    """Keys of the steps, generating ``s<n>`` for steps that have none."""
    taken = {s.key for s in steps if s.key}
    keys: list[str] = []
    counter = 1
    for step in steps:
        if step.key:
            keys.append(step.key)
            continue
        while f"s{counter}" in taken:
            counter += 1
        keys.append(f"s{counter}")
        taken.add(f"s{counter}")
    return keys


# --------------------------------------------------------------------- templates


def _defaulted_names(ast: nodes.Template) -> set[str]:
    """Variables every use of which is wrapped in ``| default(...)``."""
    wrapped = {
        id(node.node)
        for node in ast.find_all(nodes.Filter)
        if node.name in ("default", "d") and isinstance(node.node, nodes.Name)
    }
    uses: dict[str, bool] = {}
    for name in ast.find_all(nodes.Name):
        if name.ctx == "load":
            uses[name.name] = uses.get(name.name, True) and id(name) in wrapped
    return {n for n, covered in uses.items() if covered}


def variables_without_fallback(source: str, fallbacks: Iterable[str] = ()) -> list[str]:
    """Variables a template uses that some lead may lack and nothing fills in."""
    try:
        ast = _text_env.parse(source)
    except TemplateSyntaxError as exc:
        raise SequenceInvalid(f"template syntax error: {exc.message} (line {exc.lineno})") from exc
    used = meta.find_undeclared_variables(ast)
    covered = ALWAYS_PRESENT | set(DEFAULT_FALLBACKS) | set(fallbacks) | _defaulted_names(ast)
    return sorted(used - covered)


def check_email_templates(key: str, step: EmailStep) -> None:
    sources = [("subject", step.subject), ("text", step.text), ("html", step.html or "")]
    for variant in step.variants:
        sources += [
            (f"variant {variant.key} subject", variant.subject),
            (f"variant {variant.key} text", variant.text),
            (f"variant {variant.key} html", variant.html or ""),
        ]
    for where, source in sources:
        missing = variables_without_fallback(source, step.fallbacks)
        if missing:
            raise SequenceInvalid(
                f"step {key!r} {where}: template variable {missing[0]!r} has no fallback"
                f" (add it to the step's fallbacks or write {{{{ {missing[0]} | default('…') }}}})"
            )


# ------------------------------------------------------------------------- graph


def successors(
    index: int,
    step: EmailStep | WaitStep | ConditionStep | ActionStep,
    positions: dict[str, int],
    count: int,
) -> list[int]:
    """Where the machine can go from a step (``count`` means the end)."""

    def target(key: str | None) -> int:
        if key is None:
            return index + 1
        return count if key == END else positions[key]

    if isinstance(step, ConditionStep):
        return [target(step.then or step.next), target(step.else_ or step.next)]
    if isinstance(step, ActionStep) and step.action in ("stop", "move_to_sequence"):
        return []
    return [target(step.next)]


def validate_sequence(
    steps: Sequence[EmailStep | WaitStep | ConditionStep | ActionStep],
    keys: Sequence[str],
    *,
    activating: bool = False,
) -> None:
    """Raise SequenceInvalid when the steps do not make a sequence that can run."""
    if activating and not steps:
        raise SequenceInvalid("an empty sequence cannot be activated: add steps first")
    if activating and not any(isinstance(s, EmailStep) for s in steps):
        raise SequenceInvalid("a sequence needs at least one email step to be activated")
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if list(keys).count(k) > 1)
        raise SequenceInvalid(f"step key {duplicate!r} is used twice")
    if END in keys:
        raise SequenceInvalid(f"{END!r} is reserved: it names the end of the sequence")
    positions = {key: i for i, key in enumerate(keys)}
    emails = {key for key, step in zip(keys, steps, strict=True) if isinstance(step, EmailStep)}
    for key, step in zip(keys, steps, strict=True):
        targets: list[tuple[str, str | None]] = [("next", step.next)]
        if isinstance(step, ConditionStep):
            targets += [("then", step.then), ("else", step.else_)]
            if step.step is not None and step.step not in emails:
                raise SequenceInvalid(
                    f"step {key!r}: condition refers to {step.step!r}, which is not an email"
                    " step of this sequence"
                )
        for name, target in targets:
            if target is not None and target != END and target not in positions:
                raise SequenceInvalid(f"step {key!r}: unknown branch target {name}={target!r}")
        if isinstance(step, EmailStep):
            check_email_templates(key, step)
    _check_loops(steps, keys, positions)


def _check_loops(
    steps: Sequence[EmailStep | WaitStep | ConditionStep | ActionStep],
    keys: Sequence[str],
    positions: dict[str, int],
) -> None:
    """Every cycle must pass through a wait: otherwise the machine spins, or sends
    emails back to back forever."""
    count = len(steps)
    edges = {
        i: [j for j in successors(i, step, positions, count) if j < count]
        for i, step in enumerate(steps)
    }
    waits = {i for i, s in enumerate(steps) if isinstance(s, WaitStep)}
    state: dict[int, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: int, path: list[int]) -> None:
        state[node] = 1
        path.append(node)
        for nxt in edges[node]:
            if nxt in waits:
                continue
            if state.get(nxt) == 1:
                cycle = [*path[path.index(nxt) :], nxt]
                raise SequenceInvalid("loop without a wait: " + " -> ".join(keys[i] for i in cycle))
            if state.get(nxt) is None:
                visit(nxt, path)
        path.pop()
        state[node] = 2

    for start in range(count):
        if start not in waits and state.get(start) is None:
            visit(start, [])


# --------------------------------------------------------------------- settings


class SequenceSettings(_Model):
    send_window: dict[str, Any] | None = None
    #: A reply from one person stops the enrollments of everyone at the same company domain.
    company_stop: bool = False
    #: Open pixel and click tracking for email steps that do not say otherwise.
    tracking: bool = True

    @model_validator(mode="after")
    def _window(self) -> SequenceSettings:
        if self.send_window is not None:
            try:
                SendWindow.from_config(self.send_window)
            except WindowInvalid as exc:
                raise ValueError(f"send_window: {exc}") from exc
        return self

    def window(self) -> SendWindow | None:
        return SendWindow.from_config(self.send_window) if self.send_window else None


def parse_settings(data: Any) -> SequenceSettings:
    try:
        return SequenceSettings.model_validate(data or {})
    except ValidationError as exc:
        raise SequenceInvalid(_error_message(exc, "settings.")) from exc


# --------------------------------------------------------------------- versions


@dataclass(frozen=True, slots=True)
class VersionTarget:
    """Where an edit of a sequence's steps or settings is written."""

    #: A new version: the current one is frozen (enrollments run on it, or may join it).
    new: bool
    #: The version the edit is written to.
    version: int
    #: Whether that version is frozen at once.
    frozen: bool


def version_for_edit(status: str, current_version: int, frozen: bool) -> VersionTarget:
    """Where an edit goes: a draft version is edited in place; a frozen version never
    changes, so the edit becomes the next version. That version is frozen at once when
    the sequence is active (new enrollments join it from now on); for a paused
    sequence it stays open to further edits and is frozen when the sequence is
    activated again. (An archived sequence is not edited at all: the caller refuses.)
    """
    if not frozen:
        return VersionTarget(new=False, version=current_version, frozen=False)
    return VersionTarget(new=True, version=current_version + 1, frozen=status == "active")


def settings_after_patch(
    current: dict[str, Any], patch: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The validated settings a PATCH leaves (keys it names replace the current ones),
    or None when it changes nothing. Raises SequenceInvalid."""
    if patch is None:
        return None
    after = parse_settings({**current, **patch}).model_dump(exclude_none=True)
    before = parse_settings(current).model_dump(exclude_none=True)
    return None if after == before else after
