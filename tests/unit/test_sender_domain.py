"""Sender decisions: retry backoff that never gives up, and how a permanent
rejection reads (only a hard one suppresses the address)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.events import BounceType
from services.sender.domain import (
    DEFAULT_MAX_RETRY_SECONDS,
    MAX_RETRY_AFTER_SECONDS,
    classify_provider_rejection,
    classify_smtp_rejection,
    enhanced_status,
    retry_at,
    serves_one_click,
)

NOW = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
HARD, SOFT, POLICY = BounceType.HARD, BounceType.SOFT, BounceType.POLICY


# --------------------------------------------------------------------- backoff


def _delay(attempts: int, **kwargs: object) -> float:
    return (retry_at(NOW, attempts, 60.0, **kwargs) - NOW).total_seconds()  # type: ignore[arg-type]


def test_backoff_doubles_with_jitter_between_half_and_the_whole_delay() -> None:
    for attempts, full in ((1, 60), (2, 120), (3, 240), (6, 1920)):
        delays = [_delay(attempts, rng=random.Random(seed)) for seed in range(200)]
        assert full / 2 <= min(delays) and max(delays) <= full
        assert max(delays) - min(delays) > full / 4  # jittered, not constant


@given(st.integers(min_value=1, max_value=10**6))
def test_backoff_is_capped_and_defined_for_any_number_of_attempts(attempts: int) -> None:
    delay = _delay(attempts)
    assert 0 < delay <= DEFAULT_MAX_RETRY_SECONDS


def test_the_cap_is_a_setting() -> None:
    assert _delay(30, max_seconds=300.0) <= 300.0
    assert _delay(30, max_seconds=300.0, rng=random.Random(1)) >= 150.0


def test_retry_after_is_honoured_even_past_the_cap_up_to_a_day() -> None:
    assert _delay(1, retry_after=7200.0) == pytest.approx(7200.0)
    assert _delay(1, retry_after=10 * 86400.0) == pytest.approx(MAX_RETRY_AFTER_SECONDS)
    assert _delay(1, retry_after=1.0) >= 30.0  # a short Retry-After does not hurry us
    assert _delay(1, retry_after=0.0) >= 30.0


def test_retry_at_moves_forward_from_now() -> None:
    assert retry_at(NOW, 4, 1.0) - NOW > timedelta(0)


# ------------------------------------------------------------- SMTP rejections


@pytest.mark.parametrize(
    ("code", "text", "kind", "status"),
    [
        # Addressing: the address is bad.
        (550, "5.1.1 <ann@example.org>: Recipient address rejected: User unknown", HARD, "5.1.1"),
        (550, "5.1.2 Bad destination system address", HARD, "5.1.2"),
        (553, "5.1.3 Bad recipient address syntax", HARD, "5.1.3"),
        (551, "5.1.6 Recipient has moved", HARD, "5.1.6"),
        (550, "5.1.10 RESOLVER.ADR.RecipientNotFound", HARD, "5.1.10"),
        (550, "5.1.0 Address rejected", HARD, "5.1.0"),
        # ... but not when it is about our own sender address.
        (550, "5.1.0 Sender denied", POLICY, "5.1.0"),
        (553, "5.1.7 Bad sender's mailbox address syntax", POLICY, "5.1.7"),
        (550, "5.1.8 Access denied, bad outbound sender", POLICY, "5.1.8"),
        # Mailbox.
        (550, "5.2.1 The email account that you tried to reach is disabled", HARD, "5.2.1"),
        (552, "5.2.2 The email account that you tried to reach is over quota", SOFT, "5.2.2"),
        (552, "5.2.2 Mailbox full", SOFT, "5.2.2"),
        (552, "5.2.3 Message size exceeds fixed maximum", POLICY, "5.2.3"),
        # System, routing, protocol.
        (552, "5.3.4 Message too big for system", POLICY, "5.3.4"),
        (554, "5.3.0 Mail system error", SOFT, "5.3.0"),
        (554, "5.4.4 Unable to route", SOFT, "5.4.4"),
        (554, "5.4.6 Routing loop detected", SOFT, "5.4.6"),
        (550, "5.4.1 Recipient address rejected: Access denied", HARD, "5.4.1"),
        (550, "5.5.0 Requested action not taken: mailbox unavailable", HARD, "5.5.0"),
        (501, "5.5.2 Syntax error", POLICY, "5.5.2"),
        # Security and policy: a valid address we may not reach now.
        (550, "5.7.1 Message rejected as spam", POLICY, "5.7.1"),
        (550, "5.7.1 Recipient address rejected: User unknown", POLICY, "5.7.1"),
        (
            550,
            "5.7.26 This mail has been blocked because the sender is unauthenticated. "
            "Gmail requires all senders to authenticate with either SPF or DKIM.",
            POLICY,
            "5.7.26",
        ),
        (550, "5.7.606 Access denied, banned sending IP", POLICY, "5.7.606"),
        (550, "5.7.13 User account disabled", HARD, "5.7.13"),
        # Other/undefined: the words decide.
        (550, "5.0.0 <ann@example.org>... User unknown", HARD, "5.0.0"),
        (550, "5.0.0 your IP has a poor reputation", POLICY, "5.0.0"),
        # No enhanced code: the words, then the basic code.
        (550, "No such user here", HARD, None),
        (550, "Requested action not taken: mailbox unavailable", HARD, None),
        (550, "Recipient does not exist", HARD, None),
        (554, "delivery error: this user doesn't have a ymail.com account", HARD, None),
        (550, "Message rejected as spam by Content Filtering", POLICY, None),
        (
            554,
            "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
            POLICY,
            None,
        ),
        (552, "Requested mail action aborted: exceeded storage allocation", SOFT, None),
        (551, "User not local; please try <forward@example.org>", HARD, None),
        (553, "Requested action not taken", HARD, None),
        (550, "Requested action not taken", POLICY, None),
        (554, "Transaction failed", POLICY, None),
        (550, "", POLICY, None),
    ],
)
def test_smtp_rejections_are_classified_by_enhanced_code_then_words_then_code(
    code: int, text: str, kind: BounceType, status: str | None
) -> None:
    rejection = classify_smtp_rejection(code, text)
    assert (rejection.bounce_type, rejection.enhanced_status) == (kind, status)
    assert rejection.suppresses is (kind is HARD)


def test_only_the_leading_code_counts_as_the_enhanced_status() -> None:
    assert enhanced_status("5.7.26 Unauthenticated") == "5.7.26"
    assert enhanced_status("  5.1.1 unknown\n5.1.1 more") == "5.1.1"
    assert enhanced_status("Mailbox 5.1.1 unknown") is None
    assert enhanced_status("5.1.1.4 not a code") is None
    assert enhanced_status("6.1.1 not a class") is None
    assert enhanced_status(None) is None


def test_a_temporary_enhanced_code_in_a_5xx_reply_is_soft() -> None:
    assert classify_smtp_rejection(550, "4.2.2 Mailbox full").bounce_type is SOFT


# --------------------------------------------------------- provider rejections


def test_provider_rejections_are_hard_only_when_they_blame_the_recipient() -> None:
    assert classify_provider_rejection(blames_recipient=True).bounce_type is HARD
    assert classify_provider_rejection(blames_recipient=True).suppresses
    assert classify_provider_rejection(blames_recipient=False).bounce_type is POLICY
    assert not classify_provider_rejection(blames_recipient=False).suppresses


@pytest.mark.parametrize(
    ("url", "qualifies"),
    [
        ("https://track.example.com", True),
        ("https://track.example.com/base/", True),
        ("http://127.0.0.1:8084", True),
        ("http://localhost:8084", True),
        ("http://track.example.com", False),
        ("ftp://track.example.com", False),
    ],
)
def test_one_click_unsubscribe_needs_an_https_tracker(url: str, qualifies: bool) -> None:
    assert serves_one_click(url) is qualifies
