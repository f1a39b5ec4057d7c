"""Building outgoing messages (services/sender/mime.py)."""

from __future__ import annotations

import dataclasses
import email
import re
from datetime import UTC, datetime
from email.header import decode_header, make_header
from email.message import Message
from email.utils import parseaddr, parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.runtime import tokens
from services.sender.mime import (
    BuiltMessage,
    InvalidMessage,
    OutgoingEmail,
    TrackingConfig,
    build_message,
    check_address,
    domain_of,
    html_to_text,
    message_id_for,
    text_to_html,
)

NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
SECRET = b"mime-test-secret"
BASE_URL = "https://track.example.net"
CONFIG = TrackingConfig(base_url=BASE_URL, secret=SECRET)
FULL_CONFIG = TrackingConfig(
    base_url=BASE_URL,
    secret=SECRET,
    unsubscribe_mailto="unsubscribe@example.com",
    physical_address="Acme Ltd, 1 Main Street, Springfield",
)

FIRST = OutgoingEmail(
    delivery_key="enr-1:0",
    from_email="sales@Example.COM",
    from_name="Sam Sales",
    to_email="ada@example.org",
    to_name="Ada Lovelace",
    subject="Quick question",
    text="Hi Ada,\n\nSee https://acme.example/pricing for details.\n\nBest,\nSam",
    html=None,
    thread_delivery_key=None,
    tracking=True,
)

HTML = (
    "<html><body><p>Hi Ada,</p>"
    '<p><a href="https://acme.example/pricing?plan=pro&amp;seats=5">pricing</a></p>'
    "<p><a href='http://blog.example/post'>blog</a></p>"
    '<p><a class="btn" href="https://acme.example/pricing?plan=pro&amp;seats=5">again</a></p>'
    '<p><a href="mailto:sam@example.com">mail me</a></p>'
    '<p><a href="https://docs.example/start">docs</a></p>'
    "</body></html>"
)

TOKEN = r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"


def outgoing(**changes: object) -> OutgoingEmail:
    return dataclasses.replace(FIRST, **changes)  # type: ignore[arg-type]


def build(config: TrackingConfig = CONFIG, **changes: object) -> BuiltMessage:
    return build_message(outgoing(**changes), config, NOW)


def parse(built: BuiltMessage) -> Message:
    return email.message_from_bytes(built.data)


def part_text(part: Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    # Line ends are CRLF on the wire; compare bodies with plain newlines.
    return payload.decode(part.get_content_charset() or "ascii").replace("\r\n", "\n")


def parts(message: Message) -> dict[str, str]:
    """content type -> decoded body of every leaf part."""
    return {p.get_content_type(): part_text(p) for p in message.walk() if not p.is_multipart()}


def decoded(value: str) -> str:
    return str(make_header(decode_header(value)))


def header_lines(data: bytes) -> list[bytes]:
    return data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")


# ------------------------------------------------------------------- structure


def test_tracked_message_is_multipart_alternative_text_then_html() -> None:
    message = parse(build())

    assert message.get_content_type() == "multipart/alternative"
    payload = message.get_payload()
    assert isinstance(payload, list)
    subparts = [p for p in payload if isinstance(p, Message)]
    assert len(subparts) == len(payload) == 2
    assert [p.get_content_type() for p in subparts] == ["text/plain", "text/html"]
    assert all(p.get_content_charset() == "utf-8" for p in subparts)
    bodies = parts(message)
    assert "See https://acme.example/pricing for details." in bodies["text/plain"]
    assert "<p>Hi Ada,</p>" in bodies["text/html"]


@settings(max_examples=150, deadline=None)
@given(
    body=st.text(
        alphabet=st.sampled_from(["=", "_", "-", "t", "s", "\n", "a", "é", "3", "D", " "]),
        max_size=200,
    )
)
def test_no_body_can_break_the_multipart_boundary(body: str) -> None:
    """The parts are quoted-printable, where "=_" never occurs: whatever they say,
    even our boundary itself, the message still has exactly its two parts."""
    built = build(text="Hi\n" + body)
    boundary = parse(built).get_boundary()
    assert boundary is not None and boundary.startswith("=_")
    message = parse(build(text=f"--{boundary}\n{body}\n--{boundary}--\n"))
    assert [p.get_content_type() for p in message.walk()] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]
    assert f"--{boundary}--" in parts(message)["text/plain"]


def test_untracked_text_message_is_text_only() -> None:
    message = parse(build(tracking=False))

    assert message.get_content_type() == "text/plain"
    assert not message.is_multipart()
    body = part_text(message)
    assert body.startswith("Hi Ada,")
    assert "/t/o/" not in body and "/t/c/" not in body
    assert message["List-Unsubscribe"] is not None  # the header is always there


def test_untracked_html_message_keeps_links_and_has_no_pixel() -> None:
    built = build(tracking=False, html=HTML)
    bodies = parts(parse(built))

    assert built.links == []
    assert "/t/o/" not in bodies["text/html"]
    assert "/t/c/" not in bodies["text/html"]
    assert 'href="https://acme.example/pricing?plan=pro&amp;seats=5"' in bodies["text/html"]
    assert f"{BASE_URL}/u/" in bodies["text/html"]  # unsubscribe link in the body


def test_html_only_body_gets_a_text_alternative() -> None:
    bodies = parts(parse(build(text="  ", html=HTML)))
    text = bodies["text/plain"]
    assert "Hi Ada," in text
    assert "pricing (https://acme.example/pricing?plan=pro&seats=5)" in text
    assert "<p>" not in text


def test_line_endings_are_crlf() -> None:
    for built in (build(), build(tracking=False), build(FULL_CONFIG, html=HTML)):
        assert b"\r\n" in built.data
        assert re.search(rb"(?<!\r)\n", built.data) is None
        assert re.search(rb"\r(?!\n)", built.data) is None


def test_required_headers_and_date() -> None:
    message = parse(build())
    assert parsedate_to_datetime(message["Date"]) == NOW
    assert parseaddr(message["From"]) == ("Sam Sales", "sales@Example.COM")
    assert parseaddr(message["To"]) == ("Ada Lovelace", "ada@example.org")
    assert message["Subject"] == "Quick question"
    assert message["MIME-Version"] == "1.0"


def test_names_are_optional() -> None:
    message = parse(build(from_name=None, to_name=None))
    assert parseaddr(message["From"]) == ("", "sales@Example.COM")
    assert message["To"] == "ada@example.org"


# ------------------------------------------------------------------ Message-ID


def test_message_id_is_deterministic_and_uses_the_sender_domain() -> None:
    a = build()
    b = build_message(FIRST, CONFIG, datetime(2030, 1, 1, tzinfo=UTC))
    c = build(delivery_key="enr-1:1")

    assert a.message_id == b.message_id
    assert a.message_id != c.message_id
    assert a.message_id == message_id_for("enr-1:0", "example.com")
    assert re.fullmatch(r"<[0-9a-f]{40}@example\.com>", a.message_id)
    assert parse(a)["Message-ID"] == a.message_id


@given(a=st.text(min_size=1, max_size=60), b=st.text(min_size=1, max_size=60))
@settings(max_examples=100)
def test_message_id_for_is_a_function_of_the_key(a: str, b: str) -> None:
    assert message_id_for(a, "example.com") == message_id_for(a, "example.com")
    if a != b:
        assert message_id_for(a, "example.com") != message_id_for(b, "example.com")


def test_domain_of() -> None:
    assert domain_of("Sam@Mail.Example.COM") == "mail.example.com"


# ------------------------------------------------------------------- threading


def test_first_email_has_no_threading_headers() -> None:
    for thread in (None, FIRST.delivery_key):
        message = parse(build(thread_delivery_key=thread))
        assert message["In-Reply-To"] is None
        assert message["References"] is None


def test_follow_up_threads_to_the_first_email() -> None:
    first = build()
    follow_up = build(delivery_key="enr-1:1", thread_delivery_key="enr-1:0")
    message = parse(follow_up)

    assert message["In-Reply-To"] == first.message_id
    assert message["References"] == first.message_id
    assert message["In-Reply-To"] == message_id_for("enr-1:0", "example.com")
    assert follow_up.message_id != first.message_id


# ------------------------------------------------------------------ unsubscribe


def test_list_unsubscribe_points_at_a_signed_tracker_url() -> None:
    built = build()
    message = parse(built)

    match = re.fullmatch(rf"<{re.escape(BASE_URL)}/u/({TOKEN})>", message["List-Unsubscribe"])
    assert match is not None
    claims = tokens.verify(SECRET, match.group(1), "unsubscribe")
    assert claims == tokens.TokenClaims("unsubscribe", built.message_id)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_list_unsubscribe_with_mailto() -> None:
    message = parse(build(FULL_CONFIG))
    value = message["List-Unsubscribe"]
    mailto = r"<mailto:unsubscribe@example\.com\?subject=unsubscribe>"
    assert re.fullmatch(rf"<{re.escape(BASE_URL)}/u/{TOKEN}>, {mailto}", value)


@pytest.mark.parametrize("base_url", [BASE_URL, "http://localhost:8084"])
def test_list_unsubscribe_is_never_folded(base_url: str) -> None:
    config = dataclasses.replace(FULL_CONFIG, base_url=base_url + "/a/very/long/path" * 4)
    built = build(config)
    lines = header_lines(built.data)

    unsubscribe = [line for line in lines if line.startswith(b"List-Unsubscribe: <")]
    assert len(unsubscribe) == 1
    line = unsubscribe[0]
    assert len(line) > 78  # long enough that a folding policy would have folded it
    assert line.endswith(b"?subject=unsubscribe>")
    assert config.base_url.encode() + b"/u/" in line
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in lines


def test_unsubscribe_link_in_html_is_not_click_tracked() -> None:
    built = build(html=HTML)
    html = parts(parse(built))["text/html"]
    header_url = parse(built)["List-Unsubscribe"].strip("<>")
    assert f'<a href="{header_url}">Unsubscribe</a>' in html


# ------------------------------------------------------------- header injection

LINE_BREAKS = ["\r", "\n", "\r\n", "\0"]


@pytest.mark.parametrize("field", ["subject", "to_name", "from_name", "to_email", "from_email"])
@pytest.mark.parametrize("brk", LINE_BREAKS)
def test_line_breaks_in_headers_are_refused(field: str, brk: str) -> None:
    value = getattr(FIRST, field)
    with pytest.raises(InvalidMessage):
        build_message(outgoing(**{field: f"{value}{brk}Bcc: victim@example.com"}), CONFIG, NOW)


@given(
    field=st.sampled_from(["subject", "to_name", "from_name", "to_email", "from_email"]),
    before=st.text(max_size=30),
    brk=st.sampled_from(["\r", "\n"]),
    after=st.text(max_size=30),
)
@settings(max_examples=300)
def test_any_text_with_a_line_break_is_refused(
    field: str, before: str, brk: str, after: str
) -> None:
    with pytest.raises(InvalidMessage):
        build_message(outgoing(**{field: before + brk + after}), CONFIG, NOW)


header_text = st.text(
    st.characters(categories=("L", "N", "P", "S"), exclude_characters="\r\n\0") | st.just(" "),
    max_size=120,
)
EXPECTED_HEADERS = sorted(
    [
        "Content-Type",
        "MIME-Version",
        "Content-Transfer-Encoding",
        "Message-ID",
        "Date",
        "From",
        "To",
        "Subject",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
    ]
)


@given(
    subject=header_text.filter(lambda s: bool(s.strip()) and "=?" not in s),
    name=st.none() | header_text.filter(lambda s: "=?" not in s),
)
@settings(max_examples=200)
def test_any_safe_subject_and_name_survive_without_new_headers(
    subject: str, name: str | None
) -> None:
    built = build(subject=subject, to_name=name, tracking=False)
    message = parse(built)

    assert sorted(message.keys()) == EXPECTED_HEADERS  # nothing injected
    assert all(line.isascii() for line in header_lines(built.data))
    assert decoded(message["Subject"]).strip() == subject.strip()
    display, address = parseaddr(message["To"])
    assert address == "ada@example.org"
    assert decoded(display).strip() == (name or "").strip()


def test_empty_subject_is_refused() -> None:
    for subject in ("", "   "):
        with pytest.raises(InvalidMessage):
            build(subject=subject)


@pytest.mark.parametrize(
    "address",
    [
        "",
        "ada",
        "ada@",
        "@example.org",
        "ada@@example.org",
        "ada example@example.org",
        "Ada <ada@example.org>",
        "ada@example.org, eve@example.org",
        "ada@example.org;eve@example.org",
        '"ada"@example.org',
        "ada@-example.org",
        "ada@example.org.",
        "ada@exa mple.org",
        "ada@ex_ample.org",
    ],
)
def test_invalid_addresses_are_refused(address: str) -> None:
    with pytest.raises(InvalidMessage):
        check_address("recipient address", address)
    with pytest.raises(InvalidMessage):
        build(to_email=address)
    with pytest.raises(InvalidMessage):
        build(from_email=address)


def test_non_ascii_address_is_built_or_refused_cleanly() -> None:
    try:
        built = build(to_email="j\u00fcrgen@example.org")
    except InvalidMessage:
        return
    assert parse(built)["To"]


# ----------------------------------------------------------------- non-ASCII


def test_non_ascii_subject_and_names_are_rfc2047_encoded() -> None:
    subject = "Gr\u00fc\u00dfe aus K\u00f6ln \u2014 \u00bfqu\u00e9 tal? \U0001f44b"
    built = build(subject=subject, to_name="Zo\u00eb \u00c5str\u00f6m", from_name="S\u00e4m")
    lines = header_lines(built.data)
    message = parse(built)

    assert all(line.isascii() for line in lines)
    assert message["Subject"].startswith("=?utf-8?")
    assert decoded(message["Subject"]) == subject
    to_name, to_address = parseaddr(message["To"])
    assert (decoded(to_name), to_address) == ("Zo\u00eb \u00c5str\u00f6m", "ada@example.org")
    from_name, _ = parseaddr(message["From"])
    assert decoded(from_name) == "S\u00e4m"


def test_long_non_ascii_subject_folds_but_decodes_back() -> None:
    subject = "\u00dcber " * 40
    message = parse(build(subject=subject))
    assert decoded(message["Subject"]).strip() == subject.strip()


def test_non_ascii_bodies_are_utf8() -> None:
    text = "Gr\u00fc\u00dfe, \u0410\u0434\u0430! \u2603"
    bodies = parts(parse(build(text=text, tracking=False)))
    assert bodies["text/plain"].startswith(text)


# --------------------------------------------------------------------- tracking


def click_tokens(html: str) -> list[str]:
    return re.findall(rf"{re.escape(BASE_URL)}/t/c/({TOKEN})", html)


def test_click_tracking_rewrites_links_in_first_appearance_order() -> None:
    built = build(html=HTML)
    html = parts(parse(built))["text/html"]

    assert built.links == [
        "https://acme.example/pricing?plan=pro&seats=5",
        "http://blog.example/post",
        "https://docs.example/start",
    ]
    found = click_tokens(html)
    assert len(found) == 4  # the repeated link is rewritten too
    indexes = []
    for token in found:
        claims = tokens.verify(SECRET, token, "click")
        assert claims is not None
        assert claims.message_id == built.message_id
        assert claims.link is not None
        indexes.append(claims.link)
    assert indexes == [0, 1, 0, 2]
    # The original destinations no longer appear as hrefs, mailto: links are left alone.
    assert "https://acme.example/pricing" not in html
    assert "http://blog.example/post" not in html
    assert 'href="mailto:sam@example.com"' in html
    assert "href='" + BASE_URL + "/t/c/" in html  # the quote style is kept
    assert 'class="btn" href="' + BASE_URL + "/t/c/" in html


def test_click_tokens_do_not_verify_as_other_kinds() -> None:
    html = parts(parse(build(html=HTML)))["text/html"]
    for token in click_tokens(html):
        assert tokens.verify(SECRET, token, "open") is None
        assert tokens.verify(SECRET, token, "unsubscribe") is None
        assert tokens.verify(b"another secret", token, "click") is None


def test_links_in_a_text_body_are_tracked_through_the_generated_html() -> None:
    built = build(text="Go to https://acme.example/a?x=1&y=2. Or https://acme.example/b!")
    html = parts(parse(built))["text/html"]
    assert built.links == ["https://acme.example/a?x=1&y=2", "https://acme.example/b"]
    assert len(click_tokens(html)) == 2


def test_open_pixel_is_present_and_signed() -> None:
    built = build(html=HTML)
    html = parts(parse(built))["text/html"]

    pixels = re.findall(rf'<img src="{re.escape(BASE_URL)}/t/o/({TOKEN})"', html)
    assert len(pixels) == 1
    assert tokens.verify(SECRET, pixels[0], "open") == tokens.TokenClaims("open", built.message_id)
    assert html.index("/t/o/") < html.lower().index("</body>")


@given(
    urls=st.lists(
        st.sampled_from(
            [
                "https://a.example/1",
                "https://a.example/2",
                "http://b.example/",
                "https://c.example/x?y=1",
            ]
        ),
        min_size=0,
        max_size=12,
    )
)
@settings(max_examples=100)
def test_link_list_is_deduplicated_in_first_appearance_order(urls: list[str]) -> None:
    html = "".join(f'<a href="{u}">{i}</a>' for i, u in enumerate(urls))
    built = build(html=f"<html><body>{html}</body></html>")
    body = parts(parse(built))["text/html"]

    assert built.links == list(dict.fromkeys(urls))
    found = click_tokens(body)
    assert len(found) == len(urls)
    for token, url in zip(found, urls, strict=True):
        claims = tokens.verify(SECRET, token, "click")
        assert claims is not None and claims.link is not None
        assert built.links[claims.link] == url


def test_physical_address_in_both_parts() -> None:
    address = FULL_CONFIG.physical_address
    assert address is not None
    for html in (None, HTML):
        bodies = parts(parse(build(FULL_CONFIG, html=html)))
        assert bodies["text/plain"].rstrip().endswith(address)
        assert address in bodies["text/html"]


def test_physical_address_in_text_only_message() -> None:
    message = parse(build(FULL_CONFIG, tracking=False))
    assert part_text(message).rstrip().endswith("--\nAcme Ltd, 1 Main Street, Springfield")


def test_physical_address_is_escaped_in_html() -> None:
    config = dataclasses.replace(FULL_CONFIG, physical_address="A & B <Ltd>")
    bodies = parts(parse(build(config)))
    assert "A &amp; B &lt;Ltd&gt;" in bodies["text/html"]
    assert "A & B <Ltd>" in bodies["text/plain"]


def test_no_physical_address_when_not_configured() -> None:
    bodies = parts(parse(build()))
    assert "\n--\n" not in bodies["text/plain"]


# ------------------------------------------------------------ html <-> text


def test_text_to_html_escapes_and_links() -> None:
    html = text_to_html("Tom & Jerry <3\nsecond line\n\nSee https://x.example/a?b=1&c=2.")
    assert html.startswith("<!DOCTYPE html>")
    assert "<p>Tom &amp; Jerry &lt;3<br>\nsecond line</p>" in html
    assert '<a href="https://x.example/a?b=1&amp;c=2">https://x.example/a?b=1&amp;c=2</a>.' in html
    assert "<3" not in html


def test_text_to_html_does_not_let_markup_through() -> None:
    html = text_to_html('<script>alert("x")</script>')
    assert "<script>" not in html
    assert "&lt;script&gt;" in html


def test_html_to_text_keeps_links_and_drops_markup() -> None:
    text = html_to_text(
        "<html><head><style>p{color:red}</style></head><body>"
        "<h1>Title</h1><p>Hello&nbsp;<b>Ada</b> &amp; co<br/>next</p>"
        '<p>Visit <a href="https://acme.example/x">our site</a>.</p>'
        "<script>alert(1)</script></body></html>"
    )
    assert "Title" in text
    assert "Hello\u00a0Ada & co\nnext" in text
    assert "Visit our site (https://acme.example/x)." in text
    assert "<" not in text
    assert "color:red" not in text and "alert" not in text
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert "\n\n\n" not in text


def test_text_round_trip_keeps_words_and_links() -> None:
    original = "Hi Ada,\n\nPricing: https://acme.example/p\n\nBest"
    back = html_to_text(text_to_html(original))
    for piece in ("Hi Ada,", "Pricing:", "https://acme.example/p", "Best"):
        assert piece in back
