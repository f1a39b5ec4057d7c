"""Nurture decisions: the step machine. Values in, decisions out, no I/O."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from schemas.events import EngagementReceived, EngagementType
from services.nurture.windows import (
    SendWindow,
    add_business_days,
    is_open,
    schedule_send,
    with_lead_holidays,
    zone_for,
)

RUNNING_STATUSES = ("active", "awaiting_send", "paused")
FINAL_STATUSES = ("completed", "stopped")
END = "end"

#: Free-mail domains: people there do not share a company.
FREEMAIL_DOMAINS = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "yahoo.com",
        "hotmail.com",
        "outlook.com",
        "live.com",
        "msn.com",
        "aol.com",
        "icloud.com",
        "me.com",
        "mac.com",
        "proton.me",
        "protonmail.com",
        "gmx.com",
        "gmx.de",
        "web.de",
        "yandex.ru",
        "mail.ru",
        "zoho.com",
        "fastmail.com",
        "hey.com",
        "qq.com",
        "163.com",
        "126.com",
    }
)


@dataclass(frozen=True, slots=True)
class Step:
    id: uuid.UUID
    position: int
    key: str
    kind: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SequenceContext:
    key: str
    version: int
    window: SendWindow | None = None
    tracking: bool = True


@dataclass(frozen=True, slots=True)
class EnrollmentState:
    id: uuid.UUID
    lead_id: uuid.UUID
    position: int
    cursor: int
    steps_done: int
    thread_delivery_key: str | None
    due_since: datetime | None = None
    lead_timezone: str | None = None
    #: The lead's country (ISO 3166 alpha-2): whose public holidays count.
    lead_country: str | None = None


@dataclass(frozen=True, slots=True)
class SentEmail:
    step_key: str
    sent_at: datetime


@dataclass(frozen=True, slots=True)
class EngagementFact:
    type: str
    step_key: str | None
    occurred_at: datetime
    machine: bool = False


@dataclass(frozen=True, slots=True)
class Facts:
    """What happened so far in one enrollment: emails sent, engagement received."""

    sent: tuple[SentEmail, ...] = ()
    engagements: tuple[EngagementFact, ...] = ()

    def last_sent(self, step_key: str | None = None) -> SentEmail | None:
        matching = [s for s in self.sent if step_key is None or s.step_key == step_key]
        return max(matching, key=lambda s: s.sent_at) if matching else None


@dataclass(frozen=True, slots=True)
class LogEntry:
    step_index: int | None
    decision: str
    reason: str


@dataclass(frozen=True, slots=True)
class EmailDue:
    step: Step
    delivery_key: str
    thread_delivery_key: str | None
    variant: str | None
    subject: str
    text: str
    html: str | None
    #: Prefix the rendered subject of the first email with "Re: ".
    reply_to_thread: bool
    tracking: bool


@dataclass(frozen=True, slots=True)
class LeadUpdate:
    action: str
    status: str | None = None
    tags: tuple[str, ...] = ()
    user: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Notification:
    url: str
    payload: dict[str, Any]


@dataclass(slots=True)
class Advance:
    """What the enrollment becomes, and what to emit."""

    status: str
    position: int
    cursor: int
    steps_done: int
    next_action_at: datetime | None
    thread_delivery_key: str | None
    due_since: datetime | None = None
    waiting_on: str | None = None
    awaiting_delivery_key: str | None = None
    email: EmailDue | None = None
    stop_reason: str | None = None
    lead_updates: list[LeadUpdate] = field(default_factory=list)
    notifications: list[Notification] = field(default_factory=list)
    move_to: str | None = None
    log: list[LogEntry] = field(default_factory=list)


def delivery_key(enrollment_id: uuid.UUID, cursor: int) -> str:
    """One key per email execution of an enrollment: the sender sends each key once."""
    return f"{enrollment_id}:{cursor}"


def wait_duration(config: dict[str, Any]) -> timedelta:
    return timedelta(
        days=float(config.get("days", 0)),
        hours=float(config.get("hours", 0)),
        minutes=float(config.get("minutes", 0)),
    )


def assign_variant(lead_id: uuid.UUID, step_key: str, variants: Sequence[dict[str, Any]]) -> Any:
    """A/B assignment: stable per lead and step, distributed by weight."""
    total = sum(int(v.get("weight", 1)) for v in variants)
    if not variants or total <= 0:
        return None
    digest = hashlib.sha256(f"{lead_id}:{step_key}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") % total
    for variant in variants:
        point -= int(variant.get("weight", 1))
        if point < 0:
            return variant
    return variants[-1]  # pragma: no cover - unreachable when weights add up


# ------------------------------------------------------------------- conditions

_CONDITION_EVENT = {
    "if_opened": ("opened", True),
    "if_not_opened": ("opened", False),
    "if_clicked": ("clicked", True),
    "if_replied": ("replied", True),
    "if_not_replied": ("replied", False),
    "if_bounced": ("bounced", True),
    "if_unsubscribed": ("unsubscribed", True),
}


def evaluate_condition(config: dict[str, Any], facts: Facts, now: datetime) -> bool | None:
    """True or False, or None while the answer is not known yet (a positive answer
    may still come before ``within_days`` runs out)."""
    condition = config["condition"]
    if condition == "always":
        return True
    event_type, positive = _CONDITION_EVENT[condition]
    scope = config.get("step")
    base = facts.last_sent(scope)
    if base is None:
        # The email it asks about was never sent (another branch): nothing happened.
        return not positive
    within = config.get("within_days")
    deadline = base.sent_at + timedelta(days=float(within)) if within else None
    happened = any(
        e.type == event_type
        and not e.machine  # machine opens and link scanners are not people
        and (scope is None or e.step_key == scope)
        and e.occurred_at >= base.sent_at - timedelta(minutes=1)
        and (deadline is None or e.occurred_at <= deadline)
        for e in facts.engagements
    )
    if happened:
        return positive
    if deadline is not None and now < deadline:
        return None
    return not positive


def condition_deadline(config: dict[str, Any], facts: Facts) -> datetime | None:
    base = facts.last_sent(config.get("step"))
    within = config.get("within_days")
    if base is None or not within:
        return None
    return base.sent_at + timedelta(days=float(within))


# ---------------------------------------------------------------------- machine


def _target(key: str | None, index: int, positions: dict[str, int], count: int) -> int:
    if key is None:
        return index + 1
    if key == END:
        return count
    return positions.get(key, count)


def advance(
    state: EnrollmentState,
    steps: Sequence[Step],
    now: datetime,
    facts: Facts | None = None,
    context: SequenceContext | None = None,
) -> Advance:
    """Run the enrollment from its current step until it must wait or send.

    An email step is emitted (inside the send window) and the enrollment waits for
    its outcome; a wait sets the time of the next action; a condition branches, or
    waits for its answer; an action is carried out; past the last step, the
    enrollment is complete.
    """
    facts = facts or Facts()
    context = context or SequenceContext("", 0)
    count = len(steps)
    positions = {s.key: i for i, s in enumerate(steps)}
    result = Advance(
        status="active",
        position=state.position,
        cursor=state.cursor,
        steps_done=state.steps_done,
        next_action_at=now,
        thread_delivery_key=state.thread_delivery_key,
        due_since=state.due_since,
    )
    zone: ZoneInfo | None = None

    def tz() -> ZoneInfo:
        nonlocal zone
        if zone is None:
            window = context.window or SendWindow()
            zone = zone_for(window, state.lead_timezone)
        return zone

    # Validation forbids loops without a wait; the bound is a second line of defence.
    for _ in range(2 * count + 2):
        if result.position >= count:
            result.status = "completed"
            result.next_action_at = None
            result.due_since = None
            result.log.append(LogEntry(None, "completed", "sequence complete"))
            return result
        index = result.position
        step = steps[index]
        config = step.config
        follow = _target(config.get("next"), index, positions, count)

        if step.kind == "email":
            due = result.due_since or now
            if context.window is not None:
                window = with_lead_holidays(context.window, state.lead_country)
                seed = delivery_key(state.id, result.cursor)
                send_at = schedule_send(window, due, state.lead_timezone, seed)
                if now >= send_at and not is_open(window, now, tz()):
                    # Reached late (a backlog, a pause): the window has closed again.
                    due = now
                    send_at = schedule_send(window, due, state.lead_timezone, seed)
                    result.due_since = None
                if now < send_at:
                    if result.due_since is None:
                        result.log.append(
                            LogEntry(
                                index,
                                "deferred",
                                f"outside the send window: sending at {send_at.isoformat()}",
                            )
                        )
                    result.due_since = due
                    result.next_action_at = send_at
                    result.waiting_on = "window"
                    return result
            result.email = _email_due(state, step, result, context)
            if result.thread_delivery_key is None:
                result.thread_delivery_key = result.email.delivery_key
            result.cursor += 1
            result.status = "awaiting_send"
            result.awaiting_delivery_key = result.email.delivery_key
            result.next_action_at = None
            result.due_since = None
            result.waiting_on = "send"
            variant = f", variant {result.email.variant}" if result.email.variant else ""
            result.log.append(
                LogEntry(
                    index,
                    "email_due",
                    f"email {step.key} due{variant} ({result.email.delivery_key})",
                )
            )
            return result

        if step.kind == "wait":
            if config.get("business_days"):
                window = with_lead_holidays(context.window or SendWindow(), state.lead_country)
                until = add_business_days(
                    now,
                    int(config["business_days"]),
                    tz(),
                    window.weekdays,
                    window.holidays_country,
                )
                label = f"{config['business_days']} business day(s)"
            else:
                duration = wait_duration(config)
                until = now + duration
                label = str(duration)
            result.position = follow
            result.steps_done += 1
            result.log.append(LogEntry(index, "wait", f"waiting {label} until {until.isoformat()}"))
            if until > now:
                result.next_action_at = until
                result.waiting_on = "wait"
                return result
            continue

        if step.kind == "condition":
            answer = evaluate_condition(config, facts, now)
            if answer is None:
                deadline = condition_deadline(config, facts)
                result.next_action_at = deadline
                result.waiting_on = "condition"
                if state.position != index or state.due_since is None:
                    result.log.append(
                        LogEntry(
                            index,
                            "waiting",
                            f"{config['condition']}: no answer yet, deciding by"
                            f" {deadline.isoformat() if deadline else 'now'}",
                        )
                    )
                result.due_since = result.due_since or now
                return result
            branch = config.get("then") if answer else config.get("else")
            result.position = _target(branch or config.get("next"), index, positions, count)
            result.steps_done += 1
            result.due_since = None
            result.log.append(
                LogEntry(
                    index,
                    "branch",
                    f"{config['condition']} is {str(answer).lower()}:"
                    f" going to {steps[result.position].key if result.position < count else END}",
                )
            )
            continue

        if step.kind == "action":
            action = config["action"]
            reason = config.get("reason") or f"sequence {context.key} step {step.key}"
            result.steps_done += 1
            if action == "stop":
                result.status = "stopped"
                result.stop_reason = config.get("reason") or "stopped by the sequence"
                result.next_action_at = None
                result.log.append(LogEntry(index, "stopped", result.stop_reason))
                return result
            if action == "move_to_sequence":
                result.status = "stopped"
                result.move_to = config["sequence"]
                result.stop_reason = f"moved to sequence {config['sequence']}"
                result.next_action_at = None
                result.log.append(LogEntry(index, "moved", result.stop_reason))
                return result
            if action == "notify":
                result.notifications.append(
                    Notification(config["url"], {"step": step.key, "reason": reason})
                )
                result.log.append(LogEntry(index, "action", f"notify {config['url']}"))
            else:
                update = LeadUpdate(
                    action=action,
                    status="qualified" if action == "mark_qualified" else config.get("status"),
                    tags=tuple(config.get("tags", ())),
                    user=config.get("user"),
                    reason=reason,
                )
                result.lead_updates.append(update)
                result.log.append(LogEntry(index, "action", _describe(update)))
            result.position = follow
            continue

        result.position = follow
        result.log.append(LogEntry(index, "skipped", f"unknown step type {step.kind}"))
    result.status = "stopped"
    result.stop_reason = "sequence does not progress"
    result.next_action_at = None
    return result


def _describe(update: LeadUpdate) -> str:
    if update.action in ("update_status", "mark_qualified"):
        return f"{update.action}: status -> {update.status}"
    if update.action == "tag_lead":
        return f"tag_lead: {', '.join(update.tags)}"
    return f"{update.action}: {update.user}"


def _email_due(
    state: EnrollmentState, step: Step, result: Advance, context: SequenceContext
) -> EmailDue:
    config = step.config
    variant = assign_variant(state.lead_id, step.key, config.get("variants") or [])
    source = variant if variant is not None else config
    tracking = config.get("tracking")
    return EmailDue(
        step=step,
        delivery_key=delivery_key(state.id, result.cursor),
        thread_delivery_key=result.thread_delivery_key,
        variant=variant["key"] if variant is not None else None,
        subject=source["subject"],
        text=source.get("text", ""),
        html=source.get("html"),
        reply_to_thread=bool(config.get("reply_to_thread")),
        tracking=context.tracking if tracking is None else bool(tracking),
    )


def after_email_sent(
    state: EnrollmentState,
    steps: Sequence[Step],
    sent_at: datetime,
    facts: Facts | None = None,
    context: SequenceContext | None = None,
) -> Advance:
    """The awaited email went out: move past it and on to what comes next."""
    positions = {s.key: i for i, s in enumerate(steps)}
    step = steps[state.position]
    moved = EnrollmentState(
        id=state.id,
        lead_id=state.lead_id,
        position=_target(step.config.get("next"), state.position, positions, len(steps)),
        cursor=state.cursor,
        steps_done=state.steps_done + 1,
        thread_delivery_key=state.thread_delivery_key,
        due_since=None,
        lead_timezone=state.lead_timezone,
        lead_country=state.lead_country,
    )
    return advance(moved, steps, sent_at, facts, context)


def sent_while_paused(state: EnrollmentState, steps: Sequence[Step], sent_at: datetime) -> Advance:
    """The awaited email went out while the enrollment was paused: move past it and
    stay paused."""
    positions = {s.key: i for i, s in enumerate(steps)}
    step = steps[state.position]
    return Advance(
        status="paused",
        position=_target(step.config.get("next"), state.position, positions, len(steps)),
        cursor=state.cursor,
        steps_done=state.steps_done + 1,
        next_action_at=sent_at,
        thread_delivery_key=state.thread_delivery_key,
    )


def stop_reason_for(engagement: EngagementReceived) -> str | None:
    """Why this engagement ends the lead's enrollments (None: it does not)."""
    if not engagement.stops_sequence:
        return None
    return {
        EngagementType.REPLIED: "replied",
        EngagementType.UNSUBSCRIBED: "unsubscribed",
        EngagementType.COMPLAINED: "complained",
        EngagementType.BOUNCED: "bounced",
    }[engagement.engagement_type]


#: How long an out-of-office pauses an enrollment when it names no return date.
DEFAULT_OUT_OF_OFFICE = timedelta(days=7)


def resume_after_out_of_office(return_date: str | None, now: datetime) -> datetime:
    """The morning after the stated return date (the person catches up first), or a
    week from now when none is stated (or it is not in the future)."""
    if return_date:
        try:
            back = date.fromisoformat(return_date)
        except ValueError:
            back = None
        if back is not None:
            resume = datetime.combine(back + timedelta(days=1), time(9, 0), tzinfo=UTC)
            if resume > now:
                return resume
    return now + DEFAULT_OUT_OF_OFFICE


def company_domain(email: str) -> str | None:
    """The company a lead belongs to by email domain (None for free-mail addresses)."""
    domain = email.rsplit("@", 1)[-1].lower()
    return None if domain in FREEMAIL_DOMAINS else domain
