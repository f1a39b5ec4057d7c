"""Tracker parsing and dedupe keys (services/tracker/domain.py)."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import BounceType, EmailFailed, FailureKind
from services.tracker.domain import (
    PIXEL_GIF,
    InboundInvalid,
    bounce_dedupe_key,
    choose_reply_target,
    click_dedupe_key,
    delay_dedupe_key,
    message_ids,
    minute_bucket,
    open_dedupe_key,
    parse_inbound,
    rejection_bounce_type,
    reply_dedupe_key,
    unsubscribe_dedupe_key,
)

FIRST = "<3e9a344efc9b27b6f00f8420ff22878233aed9d0@acme.example>"
SECOND = "<007cea802ec6eccb258d152381ae68ff1cd38203@acme.example>"
THIRD = "<9b1c4d3e2f0a1b2c3d4e5f60718293a4b5c6d7e8@acme.example>"
REPLY_ID = "<CAJx8Zk7q+3vH=Ff0sQ2Wm9@mail.gmail.com>"

# A reply as Gmail sends it: folded References (oldest first), In-Reply-To the parent,
# quoted text, multipart/alternative.
GMAIL_REPLY = (
    "Delivered-To: sam@acme.example\r\n"
    "Received: by 2002:a05:6a10:1234 with SMTP id abc;\r\n"
    "        Sat, 21 Nov 2026 02:15:03 -0800 (PST)\r\n"
    "MIME-Version: 1.0\r\n"
    f"References: {FIRST}\r\n"
    f" {SECOND}\r\n"
    f"\t{THIRD}\r\n"
    f"In-Reply-To: {THIRD}\r\n"
    "From: Ada Lovelace <Ada.Lovelace@Example.ORG>\r\n"
    "Date: Sat, 21 Nov 2026 10:15:00 +0000\r\n"
    f"Message-ID: {REPLY_ID}\r\n"
    "Subject: Re: Final check-in: are you open to one quick call?\r\n"
    "To: Sam Sales <sales@acme.example>\r\n"
    'Content-Type: multipart/alternative; boundary="000000000000b1f2c305d9a1e0f3"\r\n'
    "\r\n"
    "--000000000000b1f2c305d9a1e0f3\r\n"
    'Content-Type: text/plain; charset="UTF-8"\r\n'
    "\r\n"
    "Yes, Thursday works.\r\n"
    "\r\n"
    "On Fri, Nov 20, 2026 at 9:00 AM Sam Sales <sales@acme.example> wrote:\r\n"
    "> Hi Ada,\r\n"
    ">\r\n"
    "> Would Thursday or Friday work? Message-ID: <not-a-header@acme.example>\r\n"
    "\r\n"
    "--000000000000b1f2c305d9a1e0f3\r\n"
    'Content-Type: text/html; charset="UTF-8"\r\n'
    "\r\n"
    '<div dir="ltr">Yes, Thursday works.</div><br><div class="gmail_quote">'
    "<blockquote>Hi Ada,</blockquote></div>\r\n"
    "\r\n"
    "--000000000000b1f2c305d9a1e0f3--\r\n"
).encode()


def test_gmail_reply_is_parsed() -> None:
    inbound = parse_inbound(GMAIL_REPLY)

    assert inbound.message_id == REPLY_ID
    assert inbound.reply_key == REPLY_ID
    assert inbound.from_email == "ada.lovelace@example.org"
    assert inbound.subject == "Re: Final check-in: are you open to one quick call?"
    # In-Reply-To first, then References newest first, each once.
    assert inbound.referenced == [THIRD, SECOND, FIRST]


def test_quoted_text_does_not_count_as_a_reference() -> None:
    inbound = parse_inbound(GMAIL_REPLY)
    assert "<not-a-header@acme.example>" not in inbound.referenced


def test_in_reply_to_missing_from_references_comes_first() -> None:
    raw = (
        f"From: a@example.org\r\nIn-Reply-To: <x@example.org>\r\n"
        f"References: {FIRST} {SECOND}\r\n\r\nhi\r\n"
    ).encode()
    assert parse_inbound(raw).referenced == ["<x@example.org>", SECOND, FIRST]


def test_only_references() -> None:
    raw = f"From: a@example.org\r\nReferences: {FIRST} {SECOND}\r\n\r\nhi\r\n".encode()
    assert parse_inbound(raw).referenced == [SECOND, FIRST]


def test_duplicate_references_appear_once() -> None:
    raw = (
        f"From: a@example.org\r\nIn-Reply-To: {SECOND}\r\n"
        f"References: {FIRST} {SECOND} {FIRST}\r\n\r\nhi\r\n"
    ).encode()
    referenced = parse_inbound(raw).referenced
    assert referenced == [SECOND, FIRST]


@given(
    ids=st.lists(
        st.from_regex(r"<[a-z0-9]{1,12}@[a-z]{1,8}\.example>", fullmatch=True), max_size=8
    ),
    parent=st.none() | st.from_regex(r"<[a-z0-9]{1,12}@[a-z]{1,8}\.example>", fullmatch=True),
)
@settings(max_examples=100)
def test_referenced_order_property(ids: list[str], parent: str | None) -> None:
    headers = "From: a@example.org\r\n"
    if parent:
        headers += f"In-Reply-To: {parent}\r\n"
    if ids:
        headers += "References: " + " ".join(ids) + "\r\n"
    referenced = parse_inbound((headers + "\r\nbody\r\n").encode()).referenced

    expected = list(dict.fromkeys(([parent] if parent else []) + list(reversed(ids))))
    assert referenced == expected
    assert len(referenced) == len(set(referenced))


def test_reply_without_message_id_is_keyed_by_content_hash() -> None:
    raw = f"From: Ada <ada@example.org>\r\nIn-Reply-To: {FIRST}\r\n\r\nYes please\r\n".encode()
    inbound = parse_inbound(raw)

    assert inbound.message_id is None
    assert inbound.reply_key == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert parse_inbound(raw).reply_key == inbound.reply_key  # stable
    assert parse_inbound(raw + b"!").reply_key != inbound.reply_key


def test_from_is_lower_cased_and_optional() -> None:
    raw = b'From: "Ada, Countess" <ADA@EXAMPLE.ORG>\r\n\r\nhi\r\n'
    assert parse_inbound(raw).from_email == "ada@example.org"

    no_from = parse_inbound(b"Subject: hello\r\n\r\nhi\r\n")
    assert no_from.from_email is None
    assert no_from.subject == "hello"
    assert no_from.referenced == []


def test_missing_subject_is_none() -> None:
    assert parse_inbound(b"From: a@example.org\r\n\r\nhi\r\n").subject is None


def test_encoded_subject_is_decoded() -> None:
    raw = b"From: a@example.org\r\nSubject: =?UTF-8?B?UmU6IEdyw7zDn2U=?=\r\n\r\nhi\r\n"
    assert parse_inbound(raw).subject == "Re: Gr\u00fc\u00dfe"


@pytest.mark.parametrize("raw", [b"", b"   ", b"\r\n\r\n", b"\n \t\n"])
def test_empty_message_is_invalid(raw: bytes) -> None:
    with pytest.raises(InboundInvalid):
        parse_inbound(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"just some text, no headers at all",
        b"\r\nbody after an empty header block",
        b"<html><body>hello</body></html>",
    ],
)
def test_message_without_headers_is_invalid(raw: bytes) -> None:
    with pytest.raises(InboundInvalid):
        parse_inbound(raw)


@given(raw=st.binary(max_size=400))
@settings(max_examples=200)
def test_arbitrary_bytes_parse_or_are_invalid(raw: bytes) -> None:
    try:
        inbound = parse_inbound(raw)
    except InboundInvalid:
        return
    assert inbound.reply_key
    assert len(inbound.referenced) == len(set(inbound.referenced))


# ---------------------------------------------------------------- message ids


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, []),
        ("", []),
        ("no ids here", []),
        ("<a@b>", ["<a@b>"]),
        ("<a@b> <c@d>\r\n\t<e@f>", ["<a@b>", "<c@d>", "<e@f>"]),
        ("<a@b><c@d>", ["<a@b>", "<c@d>"]),
        ("<a b@c>", []),
        ("<<a@b>>", ["<a@b>"]),
        ("Ada <ada@example.org>", ["<ada@example.org>"]),
    ],
)
def test_message_ids(value: str | None, expected: list[str]) -> None:
    assert message_ids(value) == expected


# ----------------------------------------------------------------------- pixel


def test_pixel_is_a_1x1_gif() -> None:
    assert PIXEL_GIF.startswith(b"GIF89a")
    width = int.from_bytes(PIXEL_GIF[6:8], "little")
    height = int.from_bytes(PIXEL_GIF[8:10], "little")
    assert (width, height) == (1, 1)
    assert PIXEL_GIF.endswith(b";")  # the GIF trailer
    assert len(PIXEL_GIF) < 100


# ----------------------------------------------------------------- dedupe keys

AT = datetime(2026, 11, 21, 10, 15, 0, tzinfo=UTC)


def test_minute_bucket_format() -> None:
    assert minute_bucket(AT) == "202611211015"


def test_opens_dedupe_within_a_minute() -> None:
    m = FIRST
    assert open_dedupe_key(m, AT) == open_dedupe_key(m, AT + timedelta(seconds=59))
    assert open_dedupe_key(m, AT) != open_dedupe_key(m, AT + timedelta(seconds=60))
    assert open_dedupe_key(m, AT) != open_dedupe_key(SECOND, AT)
    assert open_dedupe_key(m, AT) == f"open:{m}:202611211015"


def test_clicks_dedupe_per_link_within_a_minute() -> None:
    m = FIRST
    assert click_dedupe_key(m, 0, AT) == click_dedupe_key(m, 0, AT + timedelta(seconds=30))
    assert click_dedupe_key(m, 0, AT) != click_dedupe_key(m, 1, AT)
    assert click_dedupe_key(m, 0, AT) != click_dedupe_key(m, 0, AT + timedelta(minutes=1))
    assert click_dedupe_key(m, 2, AT) == f"click:{m}:2:202611211015"


@given(
    at=st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    seconds=st.integers(min_value=0, max_value=3600),
)
@settings(max_examples=200)
def test_same_key_iff_same_minute(at: datetime, seconds: int) -> None:
    later = at + timedelta(seconds=seconds)
    same_minute = at.replace(second=0, microsecond=0) == later.replace(second=0, microsecond=0)
    assert (open_dedupe_key(FIRST, at) == open_dedupe_key(FIRST, later)) is same_minute
    assert (click_dedupe_key(FIRST, 1, at) == click_dedupe_key(FIRST, 1, later)) is same_minute


def test_unsubscribe_and_reply_keys_do_not_depend_on_time() -> None:
    assert unsubscribe_dedupe_key(FIRST) == f"unsubscribe:{FIRST}"
    assert reply_dedupe_key(REPLY_ID) == f"reply:{REPLY_ID}"
    assert reply_dedupe_key("sha256:ab") != unsubscribe_dedupe_key("sha256:ab")


def test_kinds_of_key_never_collide() -> None:
    keys = {
        open_dedupe_key(FIRST, AT),
        click_dedupe_key(FIRST, 0, AT),
        unsubscribe_dedupe_key(FIRST),
        reply_dedupe_key(FIRST),
        bounce_dedupe_key(FIRST, REPLY_ID),
        delay_dedupe_key(FIRST, REPLY_ID),
    }
    assert len(keys) == 6


def test_a_delay_notice_never_shares_a_key_with_the_final_failure() -> None:
    """Keyed by the report itself: the delay notice and the later failure (same status
    code, same message) are two facts; the same report delivered twice is one."""
    delay, failure = "<dsn-1@mx.example.org>", "<dsn-2@mx.example.org>"
    assert delay_dedupe_key(FIRST, delay) != bounce_dedupe_key(FIRST, failure)
    assert bounce_dedupe_key(FIRST, delay) != bounce_dedupe_key(FIRST, failure)
    assert bounce_dedupe_key(FIRST, failure) == bounce_dedupe_key(FIRST, failure)


def test_recipients_of_an_inbound_email() -> None:
    assert parse_inbound(GMAIL_REPLY).recipients == ["sales@acme.example"]
    raw = (
        b"From: a@example.org\r\nTo: Sam <Sam@Acme.example>, b@example.org\r\n"
        b"Cc: sam@acme.example, c@example.org\r\nSubject: x\r\n\r\nhi\r\n"
    )
    assert parse_inbound(raw).recipients == ["sam@acme.example", "b@example.org", "c@example.org"]
    assert parse_inbound(b"From: a@example.org\r\n\r\nhi\r\n").recipients == []


def candidate(tenant: str, sender: str, minutes_ago: int) -> dict[str, object]:
    return {
        "tenant_id": tenant,
        "from_email": sender,
        "sent_at": AT - timedelta(minutes=minutes_ago),
    }


def test_reply_by_address_prefers_the_mailbox_it_was_sent_to() -> None:
    acme = candidate("acme", "Sam@Acme.example", 60)
    other = candidate("globex", "hank@globex.example", 5)
    assert choose_reply_target([acme, other], ["sam@acme.example"]) is acme
    assert choose_reply_target([acme, other], ["hank@globex.example"]) is other


def test_reply_by_address_with_one_tenant_takes_its_latest_message() -> None:
    only = candidate("acme", "sam@acme.example", 60)
    assert choose_reply_target([only], ["inbound@parse.acme.example"]) is only
    assert choose_reply_target([only], []) is only


def test_reply_by_address_is_not_guessed_between_tenants() -> None:
    acme = candidate("acme", "sam@acme.example", 60)
    other = candidate("globex", "hank@globex.example", 5)
    assert choose_reply_target([acme, other], ["inbound@parse.example"]) is None
    assert choose_reply_target([], ["sam@acme.example"]) is None


def failed(**changes: object) -> EmailFailed:
    values: dict[str, object] = {
        "lead_id": uuid.uuid4(),
        "enrollment_id": uuid.uuid4(),
        "sequence_id": uuid.uuid4(),
        "step_id": uuid.uuid4(),
        "step_index": 0,
        "delivery_key": "dk-1",
        "to_email": "ada@example.org",
        "failure": FailureKind.PERMANENT,
        "reason": "550 5.1.1 <ada@example.org>: Recipient address rejected: User unknown",
        "smtp_code": 550,
    }
    values.update(changes)
    return EmailFailed.model_validate(values)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"bounce_type": BounceType.HARD, "enhanced_status": "5.1.1"}, BounceType.HARD),
        ({"bounce_type": BounceType.POLICY, "enhanced_status": "5.7.1"}, BounceType.POLICY),
        # The sender's classification stands, whatever the text says.
        ({"bounce_type": BounceType.SOFT}, BounceType.SOFT),
        # Not classified by the sender: by the enhanced status code, as for a DSN.
        ({"enhanced_status": "5.1.1"}, BounceType.HARD),
        ({"enhanced_status": "5.7.26", "reason": "550 5.7.26 DMARC policy"}, BounceType.POLICY),
        ({"enhanced_status": "5.2.2", "reason": "552 5.2.2 Mailbox full"}, BounceType.SOFT),
        ({}, BounceType.HARD),  # the code in the server's text
        ({"reason": "550 go away", "smtp_code": 550}, None),  # no code: not guessed
        ({"failure": FailureKind.SUPPRESSED, "bounce_type": BounceType.HARD}, None),
        ({"failure": FailureKind.CANCELLED}, None),
        ({"failure": FailureKind.INVALID}, None),
    ],
)
def test_how_a_rejection_counts(changes: dict[str, object], expected: BounceType | None) -> None:
    assert rejection_bounce_type(failed(**changes)) == expected
