"""DKIM signing of outgoing messages (services/sender/mime.py: sign_dkim, DKIM_HEADERS)."""

from __future__ import annotations

import base64
import dataclasses
import email
import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import cache
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.sender.mime import (
    DKIM_HEADERS,
    BuiltMessage,
    DkimKey,
    InvalidMessage,
    OutgoingEmail,
    TrackingConfig,
    build_message,
    sign_dkim,
)

NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CONFIG = TrackingConfig(
    base_url="https://track.example.net",
    secret=b"dkim-test-secret",
    unsubscribe_mailto="unsubscribe@example.com",
    physical_address="Acme Ltd, 1 Main Street, Springfield",
)
DOMAIN = "example.com"
SELECTOR = "sel1"
DNS_NAME = b"sel1._domainkey.example.com."

FIRST = OutgoingEmail(
    delivery_key="enr-1:0",
    from_email="sales@example.com",
    from_name="Sam Sales",
    to_email="ada@example.org",
    to_name="Ada Lovelace",
    subject="Quick question",
    text="Hi Ada,\n\nSee https://acme.example/pricing for details.\n\nBest,\nSam",
    html=None,
    thread_delivery_key=None,
    tracking=True,
)

PEM_FORMATS = {
    "pkcs1": serialization.PrivateFormat.TraditionalOpenSSL,
    "pkcs8": serialization.PrivateFormat.PKCS8,
}


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(
    fmt: serialization.PrivateFormat = serialization.PrivateFormat.TraditionalOpenSSL,
    key: rsa.RSAPrivateKey | None = None,
) -> bytes:
    return (key or rsa_key()).private_bytes(
        serialization.Encoding.PEM, fmt, serialization.NoEncryption()
    )


def dns_record(key: rsa.RSAPrivateKey | None = None) -> bytes:
    der = (
        (key or rsa_key())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dnsfunc_for(
    record: bytes | None = None, lookups: list[bytes] | None = None
) -> Callable[..., bytes | None]:
    published = record if record is not None else dns_record()

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        if lookups is not None:
            lookups.append(name)
        return published if name == DNS_NAME else None

    return dnsfunc


def dkim_key(pem: bytes | None = None) -> DkimKey:
    return DkimKey(DOMAIN, SELECTOR, private_pem() if pem is None else pem)


def build(*, key: DkimKey | None = None, **changes: object) -> BuiltMessage:
    outgoing = dataclasses.replace(FIRST, **changes)  # type: ignore[arg-type]
    return build_message(outgoing, CONFIG, NOW, dkim_key=key or dkim_key())


def verify(data: bytes, record: bytes | None = None) -> bool:
    return bool(dkim.verify(data, dnsfunc=dnsfunc_for(record)))


def signature_tags(data: bytes) -> dict[str, str]:
    message = email.message_from_bytes(data)
    values = message.get_all("DKIM-Signature") or []
    assert len(values) == 1, values
    unfolded = re.sub(r"\s+", "", str(values[0]))
    tags = dict(part.split("=", 1) for part in unfolded.split(";") if part)
    return tags


def signed_headers(data: bytes) -> list[str]:
    return [h.lower() for h in signature_tags(data)["h"].split(":")]


def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1, (old, data.count(old))
    return data.replace(old, new)


def header_line(data: bytes, name: bytes) -> bytes:
    head = data.split(b"\r\n\r\n", 1)[0]
    lines = [line for line in head.split(b"\r\n") if line.lower().startswith(name.lower() + b":")]
    assert len(lines) == 1, lines
    return lines[0]


# ----------------------------------------------------------------- a valid signature


@pytest.mark.parametrize("fmt", list(PEM_FORMATS), ids=list(PEM_FORMATS))
def test_signed_message_verifies(fmt: str) -> None:
    pem = private_pem(PEM_FORMATS[fmt])
    assert pem.startswith(
        b"-----BEGIN RSA PRIVATE KEY-----" if fmt == "pkcs1" else b"-----BEGIN PRIVATE KEY-----"
    )
    built = build(key=dkim_key(pem))
    lookups: list[bytes] = []

    assert dkim.verify(built.data, dnsfunc=dnsfunc_for(lookups=lookups)) is True
    assert lookups == [DNS_NAME]


def test_signature_is_the_first_header_and_names_the_domain_and_selector() -> None:
    built = build()
    assert built.data.startswith(b"DKIM-Signature:")
    tags = signature_tags(built.data)
    assert tags["v"] == "1"
    assert tags["a"] == "rsa-sha256"
    assert tags["c"] == "relaxed/relaxed"
    assert tags["d"] == DOMAIN
    assert tags["s"] == SELECTOR
    assert tags["b"] and tags["bh"]


def test_signature_covers_the_identity_and_both_unsubscribe_headers() -> None:
    headers = signed_headers(build().data)

    for name in (
        "from",
        "to",
        "subject",
        "date",
        "message-id",
        "list-unsubscribe",
        "list-unsubscribe-post",  # RFC 8058 section 4: both must be signed
        "mime-version",
        "content-type",
    ):
        assert name in headers, f"{name} is not signed: h={headers}"
    assert "in-reply-to" not in headers and "references" not in headers


def test_first_message_signs_no_absent_headers() -> None:
    """Signing an absent header is legal but freezes its absence; the code only signs
    headers that are present, and every signed header is one of DKIM_HEADERS."""
    data = build().data
    known = {h.decode().lower() for h in DKIM_HEADERS}
    headers = signed_headers(data)
    assert set(headers) <= known
    for name in headers:
        header_line(data, name.encode())  # present exactly once


def test_follow_up_also_signs_threading_headers() -> None:
    built = build(delivery_key="enr-1:1", thread_delivery_key="enr-1:0", subject="Re: Quick")
    headers = signed_headers(built.data)

    assert "in-reply-to" in headers
    assert "references" in headers
    assert verify(built.data) is True
    original = build(delivery_key="enr-1:0")
    message = email.message_from_bytes(built.data)
    assert message["In-Reply-To"] == message["References"] == original.message_id


def test_tampering_with_in_reply_to_of_a_follow_up_breaks_the_signature() -> None:
    built = build(delivery_key="enr-1:1", thread_delivery_key="enr-1:0")
    line = header_line(built.data, b"In-Reply-To")
    tampered = replace_once(built.data, line, b"In-Reply-To: <forged@example.com>")
    assert verify(tampered) is False


@pytest.mark.parametrize(
    "changes",
    [
        {"html": "<html><body><p>Hi <b>Ada</b></p></body></html>", "text": ""},
        {"subject": "Grüße aus Köln: ein Angebot", "from_name": "Zoë Ünal"},
        {"tracking": False},
        {"to_email": "ada@bücher.example"},
    ],
    ids=["html", "non-ascii-headers", "untracked", "idn-recipient"],
)
def test_other_message_shapes_verify(changes: dict[str, Any]) -> None:
    assert verify(build(**changes).data) is True


def test_signature_survives_lf_line_endings_at_the_verifier() -> None:
    """Some MTAs hand messages to filters with bare LF; relaxed canonicalisation copes."""
    data = build().data
    assert verify(data.replace(b"\r\n", b"\n")) is True


# ----------------------------------------------------------------- tampering


def test_tampered_list_unsubscribe_fails_verification() -> None:
    data = build().data
    line = header_line(data, b"List-Unsubscribe")
    forged = re.sub(rb"/u/[A-Za-z0-9_.-]+>", b"/u/forged-token>", line)
    assert forged != line
    assert verify(replace_once(data, line, forged)) is False


def test_tampered_list_unsubscribe_post_fails_verification() -> None:
    data = build().data
    line = header_line(data, b"List-Unsubscribe-Post")
    tampered = replace_once(data, line, b"List-Unsubscribe-Post: List-Unsubscribe=Two-Click")
    assert verify(tampered) is False


def test_removed_list_unsubscribe_post_fails_verification() -> None:
    data = build().data
    line = header_line(data, b"List-Unsubscribe-Post")
    assert verify(replace_once(data, line + b"\r\n", b"")) is False


@pytest.mark.parametrize("name", [b"From", b"To", b"Subject", b"Message-ID", b"Date"])
def test_tampered_signed_header_fails_verification(name: bytes) -> None:
    data = build().data
    line = header_line(data, name)
    tampered = replace_once(data, line, line + b"x")
    assert verify(tampered) is False


def test_tampered_body_fails_verification() -> None:
    data = build().data
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"Hi Ada," in body
    assert verify(head + b"\r\n\r\n" + body.replace(b"Hi Ada,", b"Hi Eve,", 1)) is False


def test_appended_body_fails_verification() -> None:
    data = build().data
    assert verify(data + b"P.S. click here\r\n") is False


def test_unsigned_header_may_be_added_without_breaking_the_signature() -> None:
    """Sanity check of the tamper tests: relaying MTAs add Received: lines."""
    data = build().data
    assert verify(b"Received: from relay.example by mx.example.org\r\n" + data) is True


def test_wrong_published_key_fails_verification() -> None:
    data = build().data
    assert verify(data, record=dns_record(other_rsa_key())) is False


def test_no_published_key_fails_verification() -> None:
    data = build().data
    assert dkim.verify(data, dnsfunc=lambda name, timeout=5: None) is False


# ----------------------------------------------------------------- bad keys


def _ec_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _truncated_pem() -> bytes:
    pem = private_pem()
    body = pem.split(b"\n")
    return b"\n".join([*body[:5], body[-2]]) + b"\n"


@pytest.mark.parametrize(
    "pem",
    [
        b"",
        b"not a key",
        b"-----BEGIN RSA PRIVATE KEY-----\n"
        + base64.b64encode(b"definitely not ASN.1 but valid base64")
        + b"\n-----END RSA PRIVATE KEY-----\n",
        b"-----BEGIN RSA PRIVATE KEY-----\n!!!!\n-----END RSA PRIVATE KEY-----\n",
        "truncated",
        "ec",
        "public",
    ],
    ids=["empty", "text", "not-asn1", "garbage", "truncated", "ec-key", "public-key"],
)
def test_invalid_key_yields_invalid_message(pem: bytes | str) -> None:
    if pem == "truncated":
        pem = _truncated_pem()
    elif pem == "ec":
        pem = _ec_pem()
    elif pem == "public":
        pem = (
            rsa_key()
            .public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        )
    assert isinstance(pem, bytes)
    with pytest.raises(InvalidMessage, match="DKIM"):
        build(key=dkim_key(pem))


def test_key_with_broken_base64_yields_invalid_message() -> None:
    pem = private_pem()
    lines = pem.split(b"\n")
    lines[3] = lines[3][:-1]  # one character lost in a copy-paste
    with pytest.raises(InvalidMessage, match="DKIM"):
        build(key=dkim_key(b"\n".join(lines)))


def test_key_with_crlf_line_endings_signs() -> None:
    pem = private_pem().replace(b"\n", b"\r\n")
    serialization.load_pem_private_key(pem, password=None)  # a valid key to cryptography
    assert verify(build(key=dkim_key(pem)).data) is True


def test_sign_dkim_directly_prepends_one_signature() -> None:
    data = b"From: Sam <sales@example.com>\r\nTo: ada@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
    signed = sign_dkim(data, dkim_key())
    assert signed.endswith(data)
    assert signed.startswith(b"DKIM-Signature:")
    # From and Subject are oversigned: a second copy added later breaks the signature.
    assert signed_headers(signed) == ["from", "to", "subject", "from", "subject"]
    assert verify(signed) is True
