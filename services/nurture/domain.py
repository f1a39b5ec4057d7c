"""Nurture decisions: the step machine. Values in, decisions out, no I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from schemas.events import EngagementReceived, EngagementType

RUNNING_STATUSES = ("active", "awaiting_send", "paused")
FINAL_STATUSES = ("completed", "stopped")


@dataclass(frozen=True, slots=True)
class Step:
    id: uuid.UUID
    position: int
    kind: str
    config: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EnrollmentState:
    id: uuid.UUID
    position: int
    cursor: int
    steps_done: int
    thread_delivery_key: str | None


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


@dataclass(slots=True)
class Advance:
    """What the enrollment becomes, and what to emit."""

    status: str
    position: int
    cursor: int
    steps_done: int
    next_action_at: datetime | None
    thread_delivery_key: str | None
    awaiting_delivery_key: str | None = None
    email: EmailDue | None = None
    stop_reason: str | None = None
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


def advance(state: EnrollmentState, steps: list[Step], now: datetime) -> Advance:
    """Run the enrollment from its current step until it must wait or send.

    An email step is emitted and the enrollment waits for its outcome; a wait step
    sets the time of the next action; running past the last step completes it.
    """
    result = Advance(
        status="active",
        position=state.position,
        cursor=state.cursor,
        steps_done=state.steps_done,
        next_action_at=now,
        thread_delivery_key=state.thread_delivery_key,
    )
    # Each step is visited at most once per call: a sequence cannot spin.
    for _ in range(len(steps) + 1):
        if result.position >= len(steps):
            result.status = "completed"
            result.next_action_at = None
            result.log.append(LogEntry(None, "completed", "sequence complete"))
            return result
        step = steps[result.position]
        if step.kind == "email":
            key = delivery_key(state.id, result.cursor)
            thread = result.thread_delivery_key
            result.email = EmailDue(step, key, thread)
            if thread is None:
                result.thread_delivery_key = key
            result.cursor += 1
            result.status = "awaiting_send"
            result.awaiting_delivery_key = key
            result.next_action_at = None
            result.log.append(LogEntry(step.position, "email_due", f"email step due ({key})"))
            return result
        if step.kind == "wait":
            duration = wait_duration(step.config)
            result.position += 1
            result.steps_done += 1
            result.next_action_at = now + duration
            result.log.append(LogEntry(step.position, "wait", f"waiting {duration}"))
            if duration > timedelta(0):
                return result
            continue
        # Condition and action steps arrive with the full step model; until then a
        # step of an unknown kind is skipped, and the log says so.
        result.position += 1
        result.log.append(LogEntry(step.position, "skipped", f"unsupported step {step.kind}"))
    result.status = "stopped"
    result.stop_reason = "sequence does not progress"
    result.next_action_at = None
    return result


def after_email_sent(state: EnrollmentState, steps: list[Step], sent_at: datetime) -> Advance:
    """The awaited email went out: move past it and on to what comes next."""
    moved = EnrollmentState(
        id=state.id,
        position=state.position + 1,
        cursor=state.cursor,
        steps_done=state.steps_done + 1,
        thread_delivery_key=state.thread_delivery_key,
    )
    return advance(moved, steps, sent_at)


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
