"""Sender decisions: caps, retries, mailbox choice, guards. Values in, decisions out."""

from __future__ import annotations

import random
import re
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from schemas.events import BounceType

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


#: Longest wait between two attempts of a transiently failing delivery (the backoff
#: stops growing there), and the most of a server's Retry-After that is honoured.
DEFAULT_MAX_RETRY_SECONDS = 3600.0
MAX_RETRY_AFTER_SECONDS = 24 * 3600.0


def retry_at(
    now: datetime,
    attempts: int,
    base_seconds: float,
    *,
    retry_after: float | None = None,
    rng: random.Random | None = None,
    max_seconds: float = DEFAULT_MAX_RETRY_SECONDS,
) -> datetime:
    """When to try again after ``attempts`` transient failures: exponential backoff
    capped at ``max_seconds``, with jitter between half and the whole delay, and at
    least what the server asked for (Retry-After, up to a day). Defined for any
    number of attempts: a delivery is deferred, never dropped."""
    rng = rng or random.Random()
    # 2**exponent past the cap changes nothing, and a bounded exponent cannot overflow.
    exponent = min(max(attempts - 1, 0), 64)
    delay = min(base_seconds * 2.0**exponent, max_seconds)
    delay = delay * (0.5 + rng.random() / 2)
    if retry_after is not None and retry_after > 0:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER_SECONDS))
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


# ------------------------------------------------------------ rejections

_ENHANCED_STATUS = re.compile(r"^\s*([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")

#: Exchange Online's Directory-Based Edge Blocking: the mailbox does not exist.
_NO_SUCH_RECIPIENT = re.compile(r"recipient address rejected: access denied", re.IGNORECASE)
#: Words that blame policy (reputation, authentication, content), not the address:
#: checked before the address words, so a blocked sender is no dead address.
_POLICY_WORDS = re.compile(
    r"spam|blocked|block ?list|black ?list|deny ?list|\bpolicy\b|policies|reputation"
    r"|dmarc|\bspf\b|\bdkim\b|\brbl\b|\bdnsbl\b|spamhaus"
    r"|not (?:authori[sz]ed|permitted|allowed)|unauthori[sz]ed|unauthenticated"
    r"|virus|malware|phish|banned|prohibit|unsolicited|bulk mail"
    r"|content rejected|message content|rejected (?:for|due to|because)"
    r"|relay(?:ing)? (?:access )?denied|sender (?:address )?(?:denied|rejected|blocked)",
    re.IGNORECASE,
)
#: Words that say the mailbox is there but cannot take mail now.
_SOFT_WORDS = re.compile(
    r"quota|mailbox (?:is )?full|insufficient (?:system )?storage|exceeded storage"
    r"|out of (?:disk )?space|receiving mail at a rate|rate limit|too many"
    r"|try (?:again|later)|temporar",
    re.IGNORECASE,
)
#: Words that say the address itself is bad.
_ADDRESS_WORDS = re.compile(
    r"user unknown|unknown user|unknown (?:recipient|mailbox|address)|addressee unknown"
    r"|no such (?:user|mailbox|recipient|address|account)"
    r"|(?:does|did) ?n[o']t exist|recipient (?:unknown|not found)"
    r"|invalid (?:recipient|mailbox|address|user|e-?mail address)|illegal email address"
    r"|not a valid (?:recipient|mailbox|user|address)|bad destination mailbox"
    r"|mailbox (?:unavailable|not found|(?:is )?disabled|(?:is )?inactive)"
    r"|address (?:not found|unknown)|user not found|user not local|no mailbox"
    r"|account (?:(?:has been|is|was) )?(?:disabled|deactivated|closed|suspended|inactive)"
    r"|no longer (?:active|available|valid|exists|in use)|unrouteable address"
    r"|(?:doesn't|does not) have an? [\w.-]+ account",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class RejectionClass:
    """How a permanent rejection is read: only ``hard`` means the address is bad and
    belongs on the suppression list."""

    bounce_type: BounceType
    #: The RFC 3463 enhanced status code the server gave ("5.1.1"), if any.
    enhanced_status: str | None = None

    @property
    def suppresses(self) -> bool:
        return self.bounce_type is BounceType.HARD


def enhanced_status(text: str | None) -> str | None:
    """The RFC 3463 enhanced status code at the start of a reply's text ("5.7.26
    Unauthenticated email ..." -> "5.7.26")."""
    found = _ENHANCED_STATUS.match(text or "")
    return ".".join(found.groups()) if found else None


def _by_words(text: str) -> BounceType | None:
    if _NO_SUCH_RECIPIENT.search(text):
        return BounceType.HARD
    if _POLICY_WORDS.search(text):
        return BounceType.POLICY
    if _SOFT_WORDS.search(text):
        return BounceType.SOFT
    if _ADDRESS_WORDS.search(text):
        return BounceType.HARD
    return None


def _by_basic_code(code: int | None) -> BounceType:
    """RFC 5321 basic codes, when neither an enhanced code nor the text says more."""
    if code is None or code < 500:
        return BounceType.SOFT
    if code in (551, 553, 521, 556):  # user not local, mailbox name invalid, null MX
        return BounceType.HARD
    if code == 552:  # storage exceeded
        return BounceType.SOFT
    # 550 is "mailbox unavailable" and just as often a policy block; 554, 5xx syntax
    # errors: nothing says the address is bad, so it is not suppressed on this alone.
    return BounceType.POLICY


def _by_enhanced_code(klass: int, subject: int, detail: int, text: str) -> BounceType | None:
    """RFC 3463 and the IANA registry of enhanced status codes; the reply's words
    settle the codes that say "other" (X.Y.0). None: the code says nothing."""
    if klass == 4:
        return BounceType.SOFT
    if klass != 5:
        return None
    words = _by_words(text)
    if subject == 1:  # addressing
        if detail in (7, 8):  # the sender's own address or system: not the recipient
            return BounceType.POLICY
        if detail == 0:  # "other address status": also said for "sender denied"
            return words or BounceType.HARD
        return BounceType.HARD  # 5.1.1 mailbox, 5.1.2 domain, 5.1.3 syntax, 5.1.6, 5.1.10
    if subject == 2:  # mailbox
        if detail == 1:  # disabled; unless the words say it is a rate or a block
            return words if words in (BounceType.SOFT, BounceType.POLICY) else BounceType.HARD
        if detail == 3:  # message longer than the mailbox takes: our message
            return BounceType.POLICY
        return BounceType.SOFT  # 5.2.2 full, 5.2.0, 5.2.4
    if subject == 3:  # the receiving system: 5.3.4 our message is too big
        return BounceType.POLICY if detail == 4 else BounceType.SOFT
    if subject == 4:  # network and routing: not the address, unless the words say so
        return BounceType.HARD if words is BounceType.HARD else BounceType.SOFT
    if subject == 5:  # protocol; 5.5.0 is also said for "mailbox unavailable"
        return (words or BounceType.POLICY) if detail == 0 else BounceType.POLICY
    if subject == 6:  # media, content
        return BounceType.POLICY
    if subject == 7:  # security and policy (5.7.1 blocked, 5.7.26 DMARC) ...
        if detail in (13, 17, 18):  # ... but: account disabled, mailbox/domain owner changed
            return BounceType.HARD
        return BounceType.POLICY
    return None  # 5.0.0 and unknown subjects: other or undefined


def classify_smtp_rejection(code: int | None, text: str) -> RejectionClass:
    """Classify an SMTP server's permanent rejection of a message: by the RFC 3463
    enhanced status code when the reply has one; else (or for 5.0.0) by the reply's
    words, and failing those by the basic code."""
    status = enhanced_status(text)
    if status is not None:
        klass, subject, detail = (int(p) for p in status.split("."))
        by_code = _by_enhanced_code(klass, subject, detail, text)
        if by_code is not None:
            return RejectionClass(by_code, status)
    return RejectionClass(_by_words(text) or _by_basic_code(code), status)


def classify_provider_rejection(*, blames_recipient: bool) -> RejectionClass:
    """Classify an email API's permanent rejection of a message. Only a rejection that
    blames the recipient's address (the provider named the To field as invalid, or
    said the recipient is inactive: it will refuse that address for good) is hard;
    the rest (payload, size, content) are about our message: policy."""
    return RejectionClass(BounceType.HARD if blames_recipient else BounceType.POLICY)


def recipient_domain(address: str) -> str:
    return address.rsplit("@", 1)[-1].lower()


def serves_one_click(base_url: str) -> bool:
    """Whether tracking links on ``base_url`` qualify for RFC 8058 one-click unsubscribe
    (https), or are local (a laptop or a test, where http is expected)."""
    parsed = urllib.parse.urlsplit(base_url)
    return parsed.scheme == "https" or (parsed.hostname or "") in {"localhost", "127.0.0.1", "::1"}
