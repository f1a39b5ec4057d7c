"""Signed tracking tokens (services/runtime/tokens.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.runtime.tokens import KINDS, TokenClaims, sign, verify

SECRET = b"tracking-secret-for-tests"
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

kinds = st.sampled_from(KINDS)
message_ids = st.text(max_size=200)
links = st.none() | st.integers(min_value=-(2**63), max_value=2**63)
secrets = st.binary(min_size=1, max_size=64)


def claims_for(kind: str, message_id: str, link: int | None) -> TokenClaims:
    return TokenClaims(kind, message_id, link)


def forge(secret: bytes, body: Any) -> str:
    """A token in the documented format, correctly signed, with any JSON body."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    payload = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    mac = hmac.new(secret, payload.encode(), hashlib.sha256).digest()[:16]
    return f"{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def test_round_trip_example() -> None:
    claims = TokenClaims("click", "<abc123@example.com>", 2)
    token = sign(SECRET, claims)
    assert verify(SECRET, token, "click") == claims
    assert token.count(".") == 1
    assert set(token) <= set(B64URL + ".")  # safe in a URL path without escaping


def test_token_matches_the_documented_format() -> None:
    assert sign(SECRET, TokenClaims("open", "<m@example.com>")) == forge(
        SECRET, {"k": "open", "m": "<m@example.com>"}
    )
    assert sign(SECRET, TokenClaims("click", "<m@example.com>", 0)) == forge(
        SECRET, {"k": "click", "m": "<m@example.com>", "l": 0}
    )


def test_signing_is_deterministic() -> None:
    claims = TokenClaims("unsubscribe", "<x@example.com>")
    assert sign(SECRET, claims) == sign(SECRET, claims)
    assert sign(SECRET, claims) != sign(b"other", claims)


@given(kind=kinds, message_id=message_ids, link=links, secret=secrets)
@settings(max_examples=300)
def test_sign_verify_round_trip(
    kind: str, message_id: str, link: int | None, secret: bytes
) -> None:
    claims = claims_for(kind, message_id, link)
    token = sign(secret, claims)
    assert verify(secret, token, kind) == claims


@given(kind=kinds, message_id=message_ids, link=links)
@settings(max_examples=100)
def test_different_claims_give_different_tokens(
    kind: str, message_id: str, link: int | None
) -> None:
    token = sign(SECRET, claims_for(kind, message_id, link))
    other_link = 0 if link is None else None
    assert token != sign(SECRET, claims_for(kind, message_id, other_link))
    assert token != sign(SECRET, claims_for(kind, message_id + "x", link))


def test_unknown_kind_cannot_be_signed() -> None:
    with pytest.raises(ValueError):
        sign(SECRET, TokenClaims("admin", "<m@example.com>"))


@given(kind=kinds, message_id=message_ids, link=links, secret=secrets, other=secrets)
@settings(max_examples=150)
def test_wrong_secret_does_not_verify(
    kind: str, message_id: str, link: int | None, secret: bytes, other: bytes
) -> None:
    assume(secret != other)
    token = sign(secret, claims_for(kind, message_id, link))
    assert verify(other, token, kind) is None


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_kind_does_not_verify(kind: str) -> None:
    token = sign(SECRET, TokenClaims(kind, "<m@example.com>", 0))
    for other in KINDS:
        result = verify(SECRET, token, other)
        if other == kind:
            assert result is not None
        else:
            assert result is None
    assert verify(SECRET, token, "") is None
    assert verify(SECRET, token, kind.upper()) is None


@given(
    kind=kinds,
    message_id=message_ids,
    link=links,
    data=st.data(),
)
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_single_character_change_of_the_payload_fails(
    kind: str, message_id: str, link: int | None, data: st.DataObject
) -> None:
    token = sign(SECRET, claims_for(kind, message_id, link))
    payload_len = token.index(".")
    i = data.draw(st.integers(min_value=0, max_value=payload_len - 1), label="index")
    replacement = data.draw(st.characters(exclude_categories=["Cs"]), label="char")
    assume(replacement != token[i])
    tampered = token[:i] + replacement + token[i + 1 :]
    assert verify(SECRET, tampered, kind) is None


@given(kind=kinds, message_id=message_ids, link=links, data=st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_any_significant_change_of_the_signature_fails(
    kind: str, message_id: str, link: int | None, data: st.DataObject
) -> None:
    """Every signature character but the last carries only MAC bits: changing one to any
    other base64url character invalidates the token."""
    token = sign(SECRET, claims_for(kind, message_id, link))
    start = token.index(".") + 1
    i = data.draw(st.integers(min_value=start, max_value=len(token) - 2), label="index")
    replacement = data.draw(st.sampled_from(B64URL), label="char")
    assume(replacement != token[i])
    tampered = token[:i] + replacement + token[i + 1 :]
    assert verify(SECRET, tampered, kind) is None


@given(kind=kinds, message_id=message_ids, link=links, data=st.data())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_signature_changes_never_raise_nor_yield_other_claims(
    kind: str, message_id: str, link: int | None, data: st.DataObject
) -> None:
    claims = claims_for(kind, message_id, link)
    token = sign(SECRET, claims)
    start = token.index(".") + 1
    i = data.draw(st.integers(min_value=start, max_value=len(token) - 1), label="index")
    replacement = data.draw(st.characters(exclude_categories=["Cs"]), label="char")
    assume(replacement != token[i])
    tampered = token[:i] + replacement + token[i + 1 :]
    assert verify(SECRET, tampered, kind) in (None, claims)


def _last_char_variant(token: str) -> str:
    """The same token with the padding bits of its last signature character flipped."""
    last = token[-1]
    # A 16-byte MAC is 22 base64 characters; only the top 2 bits of the last one count.
    twin = B64URL[B64URL.index(last) ^ 0b1]
    return token[:-1] + twin


@pytest.mark.parametrize("alteration", ["padding bits", "standard alphabet"])
def test_altered_signature_encodings_do_not_verify(alteration: str) -> None:
    claims = TokenClaims("click", "<abc@example.com>", 3)
    token = sign(SECRET, claims)
    if alteration == "padding bits":
        tampered = _last_char_variant(token)
    else:
        # Find a claim whose signature contains '-' or '_' (deterministically).
        n = 0
        while not any(c in token.split(".")[1] for c in "-_"):
            n += 1
            claims = TokenClaims("click", f"<abc{n}@example.com>", 3)
            token = sign(SECRET, claims)
        payload, signature = token.split(".")
        tampered = payload + "." + signature.replace("-", "+").replace("_", "/")
    assert tampered != token
    assert verify(SECRET, tampered, claims.kind) is None


@given(kind=kinds, message_id=message_ids, link=links, data=st.data())
@settings(max_examples=200)
def test_truncated_tokens_fail(
    kind: str, message_id: str, link: int | None, data: st.DataObject
) -> None:
    token = sign(SECRET, claims_for(kind, message_id, link))
    cut = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    assert verify(SECRET, token[:cut], kind) is None  # tail cut off
    assert verify(SECRET, token[cut + 1 :], kind) is None  # head cut off


@given(garbage=st.text(max_size=300), kind=st.sampled_from((*KINDS, "x")))
@settings(max_examples=300)
def test_garbage_never_verifies_and_never_raises(garbage: str, kind: str) -> None:
    assert verify(SECRET, garbage, kind) is None


@given(
    left=st.text(st.characters(), max_size=80),
    right=st.text(st.characters(), max_size=80),
    kind=kinds,
)
@settings(max_examples=300)
def test_garbage_with_one_dot_never_verifies(left: str, right: str, kind: str) -> None:
    assert verify(SECRET, f"{left.replace('.', '')}.{right.replace('.', '')}", kind) is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "..",
        "a.b.c",
        "abc",
        "abc.",
        ".abc",
        "\ud800.\udfff",
        "é.é",
        "====.====",
        "eyJrIjoib3BlbiJ9.AAAAAAAAAAAAAAAAAAAAAA",
    ],
)
def test_malformed_tokens_fail(token: str) -> None:
    for kind in KINDS:
        assert verify(SECRET, token, kind) is None


def test_overlong_tokens_are_refused_before_any_work() -> None:
    token = forge(SECRET, {"k": "open", "m": "<" + "m" * 3000 + "@example.com>"})
    assert len(token) > 2048
    assert verify(SECRET, token, "open") is None


@pytest.mark.parametrize(
    "body",
    [
        ["open", "<m@example.com>"],
        "open",
        42,
        None,
        {"k": "open"},  # no message id
        {"k": "open", "m": 5},
        {"k": "open", "m": None},
        {"k": "click", "m": "<m@example.com>", "l": "3"},
        {"k": "click", "m": "<m@example.com>", "l": 1.5},
        {"m": "<m@example.com>"},
    ],
)
def test_genuinely_signed_but_malformed_claims_fail(body: Any) -> None:
    token = forge(SECRET, body)
    for kind in KINDS:
        assert verify(SECRET, token, kind) is None


def test_genuinely_signed_claims_in_documented_format_verify() -> None:
    token = forge(SECRET, {"k": "click", "m": "<m@example.com>", "l": 4})
    assert verify(SECRET, token, "click") == TokenClaims("click", "<m@example.com>", 4)
