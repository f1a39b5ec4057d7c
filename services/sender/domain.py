"""Sender decisions: caps, retries, mailbox choice, guards. Values in, decisions out."""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

_PLACEHOLDER = re.compile(r"\{\{.*?\}\}|\{%.*?%\}", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Caps:
    daily: int | None = None
    hourly: int | None = None
    domain_hourly: int | None = None


@dataclass(frozen=True, slots=True)
class CapScope:
    """One counter a send must fit under: ``limit`` sends per window."""

    scope: str
    window_start: datetime
    window_end: datetime
    limit: int
    label: str


def _day(now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


def _hour(now: datetime) -> tuple[datetime, datetime]:
    start = now.replace(minute=0, second=0, microsecond=0)
    return start, start + timedelta(hours=1)


def cap_scopes(
    mailbox_key: str, recipient_domain: str, caps: Caps, now: datetime
) -> list[CapScope]:
    """The counters one send to ``recipient_domain`` from a mailbox must fit under
    (UTC days and hours of product time)."""
    scopes: list[CapScope] = []
    if caps.daily:
        start, end = _day(now)
        scopes.append(
            CapScope(
                f"mailbox:{mailbox_key}:day", start, end, caps.daily, f"daily cap of {caps.daily}"
            )
        )
    if caps.hourly:
        start, end = _hour(now)
        scopes.append(
            CapScope(
                f"mailbox:{mailbox_key}:hour",
                start,
                end,
                caps.hourly,
                f"hourly cap of {caps.hourly}",
            )
        )
    if caps.domain_hourly:
        start, end = _hour(now)
        scopes.append(
            CapScope(
                f"mailbox:{mailbox_key}:domain:{recipient_domain}:hour",
                start,
                end,
                caps.domain_hourly,
                f"cap of {caps.domain_hourly} an hour to {recipient_domain}",
            )
        )
    return scopes


def retry_at(
    now: datetime,
    attempts: int,
    base_seconds: float,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    max_seconds: float = 6 * 3600,
) -> datetime:
    """When to try again after ``attempts`` transient failures: exponential backoff
    with full jitter between half and the whole delay, at least what the server
    asked for (Retry-After)."""
    rng = rng or random.Random()
    delay = min(base_seconds * 2 ** max(attempts - 1, 0), max_seconds)
    delay = delay * (0.5 + rng.random() / 2)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return now + timedelta(seconds=delay)


def choose_mailbox(
    mailboxes: Sequence[uuid.UUID], load: Mapping[uuid.UUID, int], enrollment_id: uuid.UUID
) -> uuid.UUID:
    """The least loaded mailbox; ties broken by a stable hash of the enrollment, so
    replicas choosing at once spread rather than pile up."""
    if not mailboxes:
        raise ValueError("no mailbox to choose from")
    lowest = min(load.get(m, 0) for m in mailboxes)
    candidates = sorted(m for m in mailboxes if load.get(m, 0) == lowest)
    return candidates[enrollment_id.int % len(candidates)]


def unrendered_placeholder(*texts: str | None) -> str | None:
    """A template placeholder left in a rendered message: it must never go out."""
    for text in texts:
        if text:
            found = _PLACEHOLDER.search(text)
            if found:
                return found.group(0)[:60]
    return None


#: SMTP replies after which the address is put on the suppression list: the mailbox
#: does not exist or the address is invalid.
SUPPRESSING_SMTP_CODES = frozenset({550, 551, 553})


def recipient_domain(address: str) -> str:
    return address.rsplit("@", 1)[-1].lower()
