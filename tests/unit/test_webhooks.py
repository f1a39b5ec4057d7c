"""Provider webhooks (services/tracker/webhooks.py): authentication and normalisation,
against the providers' documented example payloads (tests/fixtures/webhooks, see
SOURCES.txt there)."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email import policy as email_policy
from email.message import EmailMessage, MIMEPart
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.tracker import domain
from services.tracker.webhooks import (
    NormalizedEvent,
    SnsVerifier,
    WebhookRejected,
    inbound_from_mailgun_route,
    inbound_from_sendgrid_parse,
    is_sns_certificate_url,
    mailgun_route_signature,
    mailgun_token_key,
    parse_mailgun,
    parse_postmark,
    parse_sendgrid,
    parse_ses,
    sns_string_to_sign,
    verify_basic_auth,
    verify_mailgun,
    verify_sendgrid,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks"
OUR_ID = "<3e9a344efc9b27b6f00f8420ff22878233aed9d0@acme.example>"
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def rejected(excinfo: pytest.ExceptionInfo[WebhookRejected], status: int) -> None:
    assert excinfo.value.status == status, excinfo.value.reason


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# ============================================================================ SendGrid

SG_NOW = 1_513_300_000.0


@pytest.fixture(scope="module")
def sg_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def sg_public(key: ec.EllipticCurvePrivateKey, *, pem: bool = False) -> str:
    encoding = serialization.Encoding.PEM if pem else serialization.Encoding.DER
    raw = key.public_key().public_bytes(encoding, serialization.PublicFormat.SubjectPublicKeyInfo)
    # What the SendGrid dashboard shows: the base64 of the DER SubjectPublicKeyInfo.
    return raw.decode() if pem else base64.b64encode(raw).decode()


def sg_sign(key: ec.EllipticCurvePrivateKey, timestamp: str, body: bytes) -> str:
    der = key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return base64.b64encode(der).decode()


def sg_body(**changes: Any) -> bytes:
    events = load("sendgrid_events.json")
    for event in events:
        if event["event"] == "click":
            event["delivery_key"] = "dk-click"  # a v3 custom_arg arrives at top level
        event.update(changes.get(event["event"], {}))
    return json.dumps(events).encode()


def test_sendgrid_signed_batch_verifies_and_normalises(sg_key: ec.EllipticCurvePrivateKey) -> None:
    body = sg_body()
    timestamp = str(int(SG_NOW))
    verify_sendgrid(
        sg_public(sg_key), sg_sign(sg_key, timestamp, body), timestamp, body, now=SG_NOW
    )
    events = parse_sendgrid(body)
    assert [(e.type, e.bounce_type) for e in events] == [
        ("bounced", "hard"),
        ("bounced", "policy"),  # "type": "blocked"
        ("delivered", None),
        ("deferred", None),
        ("dropped", "hard"),  # "Bounced Address"
        ("clicked", None),
        ("opened", None),
        ("complained", None),
        ("unsubscribed", None),
        ("unsubscribed", None),  # group_unsubscribe; processed/group_resubscribe dropped
    ]
    bounce = events[0]
    assert bounce == NormalizedEvent(
        provider="sendgrid",
        provider_event_id="6g4ZI7SA-xmRDv57GoPIPw==",
        type="bounced",
        email="alex@example.com",
        occurred_at=utc(2017, 12, 15, 0, 59, 29),
        delivery_key=None,
        message_id="<14c5d75ce93.dfd.64b469@ismtpd-555>",
        provider_message_id="14c5d75ce93.dfd.64b469",  # the X-Message-Id part
        bounce_type="hard",
        detail={
            "event": "bounce",
            "reason": "500 unknown recipient",
            "status": "5.0.0",
            "type": "bounce",
            "bounce_classification": "Invalid Address",
        },
    )
    deferred = events[3]
    assert deferred.provider_message_id == "14c5d75ce93.dfd.64b469"
    assert deferred.detail["attempt"] == "5"
    click = events[5]
    assert (click.email, click.url, click.ip, click.delivery_key) == (
        "email@example.com",
        "http://example.com/blog/news.html",
        "255.255.255.255",
        "dk-click",
    )
    assert click.user_agent is not None and click.user_agent.startswith("Mozilla/5.0 (iPhone")
    assert click.occurred_at == utc(2009, 8, 11)
    opened = events[6]
    assert opened.detail["sg_machine_open"] is False
    assert opened.message_id is None  # the documented open event carries no smtp-id


def test_sendgrid_pem_key_is_accepted(sg_key: ec.EllipticCurvePrivateKey) -> None:
    body = sg_body()
    verify_sendgrid(
        sg_public(sg_key, pem=True),
        sg_sign(sg_key, "1513300000", body),
        "1513300000",
        body,
        now=SG_NOW,
    )


def test_sendgrid_wrong_key_is_rejected(sg_key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    body = sg_body()
    with pytest.raises(WebhookRejected) as excinfo:
        verify_sendgrid(
            sg_public(other), sg_sign(sg_key, "1513300000", body), "1513300000", body, now=SG_NOW
        )
    rejected(excinfo, 401)


@pytest.mark.parametrize("skew", [-301, 301, -86_400])
def test_sendgrid_timestamp_outside_window_is_rejected(
    sg_key: ec.EllipticCurvePrivateKey, skew: int
) -> None:
    body = sg_body()
    timestamp = str(int(SG_NOW) + skew)
    with pytest.raises(WebhookRejected) as excinfo:
        verify_sendgrid(
            sg_public(sg_key), sg_sign(sg_key, timestamp, body), timestamp, body, now=SG_NOW
        )
    rejected(excinfo, 401)
    # ...and inside the window the same signature is fine.
    verify_sendgrid(
        sg_public(sg_key), sg_sign(sg_key, timestamp, body), timestamp, body, now=SG_NOW + skew
    )


def test_sendgrid_signature_covers_the_timestamp(sg_key: ec.EllipticCurvePrivateKey) -> None:
    body = sg_body()
    signature = sg_sign(sg_key, "1513300000", body)
    with pytest.raises(WebhookRejected) as excinfo:
        verify_sendgrid(sg_public(sg_key), signature, "1513300001", body, now=SG_NOW)
    rejected(excinfo, 401)


@pytest.mark.parametrize(
    ("signature", "timestamp", "status"),
    [("", "1513300000", 401), ("c2ln", "", 401), ("not base64!", "1513300000", 401)],
)
def test_sendgrid_missing_or_garbled_headers(
    sg_key: ec.EllipticCurvePrivateKey, signature: str, timestamp: str, status: int
) -> None:
    with pytest.raises(WebhookRejected) as excinfo:
        verify_sendgrid(sg_public(sg_key), signature, timestamp, b"[]", now=SG_NOW)
    rejected(excinfo, status)


def test_sendgrid_timestamp_must_be_unix_seconds(sg_key: ec.EllipticCurvePrivateKey) -> None:
    body = b"[]"
    for timestamp in ("1513300000.5", "-1", "2017-12-15T00:00:00Z"):
        with pytest.raises(WebhookRejected) as excinfo:
            verify_sendgrid(
                sg_public(sg_key), sg_sign(sg_key, timestamp, body), timestamp, body, now=SG_NOW
            )
        rejected(excinfo, 400)


def test_sendgrid_misconfigured_key_is_our_error() -> None:
    for key in ("not a key", base64.b64encode(b"junk").decode()):
        with pytest.raises(ValueError, match="SendGrid"):
            verify_sendgrid(key, "c2ln", "1513300000", b"[]", now=SG_NOW)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    der = rsa_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ValueError, match="P-256"):
        verify_sendgrid(base64.b64encode(der).decode(), "c2ln", "1", b"[]", now=SG_NOW)


@FAST
@given(data=st.data())
def test_sendgrid_any_tampered_byte_is_rejected(
    sg_key: ec.EllipticCurvePrivateKey, data: st.DataObject
) -> None:
    body = sg_body()
    signature = sg_sign(sg_key, "1513300000", body)
    index = data.draw(st.integers(0, len(body) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = bytearray(body)
    tampered[index] ^= flip
    with pytest.raises(WebhookRejected) as excinfo:
        verify_sendgrid(sg_public(sg_key), signature, "1513300000", bytes(tampered), now=SG_NOW)
    rejected(excinfo, 401)


def test_sendgrid_normalisation_details() -> None:
    body = sg_body(
        bounce={"email": "Alex@Example.COM"},
        dropped={"reason": "Unsubscribed Address"},
        delivered={"sg_event_id": None},
    )
    events = parse_sendgrid(body)
    assert events[0].email == "alex@example.com"
    assert events[4].bounce_type == "policy"
    delivered = events[2]
    assert delivered.provider_event_id.startswith("sha256:")  # derived, and stable:
    assert parse_sendgrid(body)[2].provider_event_id == delivered.provider_event_id
    nested_event = {
        "event": "open",
        "email": "a@b.example",
        "timestamp": "1513299569",
        "custom_args": {"delivery_key": "dk-nested"},
    }
    nested = json.dumps([nested_event]).encode()
    (opened,) = parse_sendgrid(nested)
    assert (opened.delivery_key, opened.occurred_at) == ("dk-nested", utc(2017, 12, 15, 0, 59, 29))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"event": "delivered"}',
        b"[1]",
        b'[{"event": "delivered", "timestamp": 1513299569}]',
        b'[{"event": "delivered", "email": "a@b.example", "timestamp": "soon"}]',
    ],
)
def test_sendgrid_malformed_batches(body: bytes) -> None:
    with pytest.raises(WebhookRejected) as excinfo:
        parse_sendgrid(body)
    rejected(excinfo, 400)


# ============================================================================= Mailgun

MG_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
MG_NOW = 1_770_920_800.0
MG_TIMESTAMP = "1770920772"
MG_TOKEN = "e0b5477167110d68991efc6b9f89f0a11066af27834600e123"


def mg_sign(timestamp: str, token: str, key: str = MG_KEY) -> str:
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def mg_verify(signature: dict[str, str], key: str, *, now: float) -> None:
    verify_mailgun(key, signature["timestamp"], signature["token"], signature["signature"], now=now)


def mg_body(event: str, **changes: Any) -> bytes:
    fixture = load("mailgun_events.json")
    event_data = fixture["event-data"][event]
    event_data.update(changes)
    signature = dict(fixture["signature"])  # the documented shape, signed with our key
    signature["signature"] = mg_sign(signature["timestamp"], signature["token"])
    return json.dumps({"signature": signature, "event-data": event_data}).encode()


def test_mailgun_signed_event_verifies_and_normalises() -> None:
    body = mg_body("delivered", **{"user-variables": {"delivery_key": "dk-7"}})
    signature, events = parse_mailgun(body)
    assert signature["timestamp"] == MG_TIMESTAMP and signature["token"] == MG_TOKEN
    mg_verify(signature, MG_KEY, now=MG_NOW)
    assert events == [
        NormalizedEvent(
            provider="mailgun",
            provider_event_id="MXcc2gEpS-eN8HfkOnmK2w",
            type="delivered",
            email="recipient@sample.mailgun.com",
            occurred_at=datetime.fromtimestamp(1770146431.6585283, UTC),
            delivery_key="dk-7",
            message_id="<20260203192030.53383e583ab41f62@sample.mailgun.com>",
            provider_message_id="20260203192030.53383e583ab41f62@sample.mailgun.com",
            detail={"event": "delivered", "delivery-status": events[0].detail["delivery-status"]},
        )
    ]
    assert events[0].detail["delivery-status"]["code"] == 250


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        ("accepted", None),
        ("delivered", ("delivered", None)),
        ("opened", ("opened", None)),
        ("clicked", ("clicked", None)),
        ("failed_permanent", ("bounced", "hard")),
        ("failed_temporary", ("deferred", None)),  # Mailgun retries it: not a bounce
        ("unsubscribed", ("unsubscribed", None)),
        ("complained", ("complained", None)),
    ],
)
def test_mailgun_documented_events(event: str, expected: tuple[str, str | None] | None) -> None:
    _, events = parse_mailgun(mg_body(event))
    if expected is None:
        assert events == []
        return
    (normalized,) = events
    assert (normalized.type, normalized.bounce_type) == expected
    assert normalized.delivery_key is None  # the examples carry "user-variables": []
    assert normalized.message_id is not None and normalized.message_id.startswith("<")
    if event == "clicked":
        assert normalized.url == "https://sample.mailgun.com"
        assert normalized.ip == "9.169.124.21"
        assert normalized.user_agent is not None and "Android 9" in normalized.user_agent
        assert normalized.occurred_at == utc(2026, 2, 5, 21, 31, 58, 664868)
    if event == "failed_permanent":
        assert normalized.email == "badrecipient@sample.mailgun.com"
        assert normalized.detail["severity"] == "permanent"
        assert normalized.detail["reason"] == "bounce"
        assert normalized.detail["delivery-status"]["code"] == 550


def test_mailgun_suppressed_addresses_are_dropped() -> None:
    _, (event,) = parse_mailgun(mg_body("failed_permanent", reason="suppress-bounce"))
    assert (event.type, event.bounce_type) == ("dropped", "hard")
    _, (event,) = parse_mailgun(mg_body("failed_permanent", reason="suppress-unsubscribe"))
    assert (event.type, event.bounce_type) == ("dropped", "policy")


def test_mailgun_wrong_key_and_old_timestamp_are_rejected() -> None:
    signature, _ = parse_mailgun(mg_body("delivered"))
    with pytest.raises(WebhookRejected) as excinfo:
        mg_verify(signature, "key-other", now=MG_NOW)
    rejected(excinfo, 401)
    with pytest.raises(WebhookRejected) as excinfo:
        mg_verify(signature, MG_KEY, now=int(MG_TIMESTAMP) + 301)
    rejected(excinfo, 401)
    mg_verify(signature, MG_KEY, now=int(MG_TIMESTAMP) + 299.5)
    with pytest.raises(ValueError):
        mg_verify(signature, "", now=MG_NOW)


@FAST
@given(field=st.sampled_from(["timestamp", "token", "signature"]), data=st.data())
def test_mailgun_any_tampered_signature_field_is_rejected(field: str, data: st.DataObject) -> None:
    signature = {
        "timestamp": MG_TIMESTAMP,
        "token": MG_TOKEN,
        "signature": mg_sign(MG_TIMESTAMP, MG_TOKEN),
    }
    value = signature[field]
    index = data.draw(st.integers(0, len(value) - 1))
    replacement = data.draw(st.sampled_from("0123456789abcdef").filter(lambda c: c != value[index]))
    signature[field] = value[:index] + replacement + value[index + 1 :]
    with pytest.raises(WebhookRejected) as excinfo:
        mg_verify(signature, MG_KEY, now=MG_NOW)
    assert excinfo.value.status in (400, 401)


def test_mailgun_token_key_is_stable_and_opaque() -> None:
    key = mailgun_token_key(MG_TOKEN)
    assert key == mailgun_token_key(MG_TOKEN) != mailgun_token_key(MG_TOKEN + "x")
    assert MG_TOKEN not in key


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"event-data": {}}',
        b'{"signature": {"timestamp": "1", "token": "t"}, "event-data": {}}',
        b'{"signature": {"timestamp": "1", "token": "t", "signature": "s"}}',
    ],
)
def test_mailgun_malformed_bodies(body: bytes) -> None:
    with pytest.raises(WebhookRejected) as excinfo:
        parse_mailgun(body)
    rejected(excinfo, 400)


# ============================================================================ Postmark


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_postmark_basic_auth() -> None:
    verify_basic_auth(basic("hooks", "s3cret"), "hooks", "s3cret")
    verify_basic_auth(basic("hooks", "s3cret").replace("Basic", "basic"), "hooks", "s3cret")
    for header in (
        basic("hooks", "wrong"),
        basic("other", "s3cret"),
        basic("hooks", "s3cret") + "x",
        "Bearer s3cret",
        "Basic",
        "Basic !!!",
        None,
        "",
    ):
        with pytest.raises(WebhookRejected) as excinfo:
            verify_basic_auth(header, "hooks", "s3cret")
        rejected(excinfo, 401)
    with pytest.raises(ValueError):
        verify_basic_auth(basic("hooks", ""), "hooks", "")


def pm_body(record: str, **changes: Any) -> bytes:
    payload = load("postmark_events.json")[record]
    payload.update(changes)
    return json.dumps(payload).encode()


AT_PM = utc(2026, 11, 5, 16, 33, 54, 907025)
PM_ID = "883953f4-6105-42a2-a16a-77a8eac79483"


def test_postmark_documented_events() -> None:
    (bounce,) = parse_postmark(pm_body("Bounce", Metadata={"delivery_key": "dk-9"}))
    assert bounce == NormalizedEvent(
        provider="postmark",
        provider_event_id="692560173",
        type="bounced",
        email="margareth@nasa.com",
        occurred_at=AT_PM,
        delivery_key="dk-9",
        provider_message_id=PM_ID,
        bounce_type="hard",
        detail={
            "RecordType": "Bounce",
            "MessageStream": "outbound",
            "Tag": "Test",
            "Type": "HardBounce",
            "TypeCode": 1,
            "Name": "Hard bounce",
            "Description": "The server was unable to deliver your message "
            "(ex: unknown user, mailbox not found).",
            "Details": "Test bounce details",
            "Inactive": True,
            "CanActivate": True,
        },
    )
    (complaint,) = parse_postmark(pm_body("SpamComplaint"))
    assert (complaint.type, complaint.provider_event_id, complaint.email) == (
        "complained",
        "692560174",
        "margareth@nasa.com",
    )
    (delivery,) = parse_postmark(pm_body("Delivery"))
    assert (delivery.type, delivery.occurred_at, delivery.provider_message_id) == (
        "delivered",
        AT_PM,
        PM_ID,
    )
    assert delivery.provider_event_id.startswith("sha256:")
    assert delivery.delivery_key is None  # the examples' Metadata has PropA/PropB only
    (opened,) = parse_postmark(pm_body("Open"))
    assert (opened.type, opened.ip, opened.detail["FirstOpen"]) == ("opened", "203.0.113.42", True)
    assert opened.user_agent is not None and "Chrome/140" in opened.user_agent
    (clicked,) = parse_postmark(pm_body("Click"))
    assert (clicked.type, clicked.url) == ("clicked", "https://example.com/confirm-your-address")
    assert opened.provider_event_id != clicked.provider_event_id
    # The documented SubscriptionChange is a hard-bounce suppression: the Bounce
    # hook already said so. An unsubscribe ("ManualSuppression") is news.
    assert parse_postmark(pm_body("SubscriptionChange")) == []
    (unsubscribed,) = parse_postmark(
        pm_body("SubscriptionChange", SuppressionReason="ManualSuppression")
    )
    assert (unsubscribed.type, unsubscribed.email, unsubscribed.occurred_at) == (
        "unsubscribed",
        "margareth@nasa.com",
        AT_PM,
    )
    assert (
        parse_postmark(pm_body("SubscriptionChange", SuppressionReason=None, SuppressSending=False))
        == []
    )


@pytest.mark.parametrize(
    ("bounce_type", "expected"),
    [
        ("HardBounce", ("bounced", "hard")),
        ("BadEmailAddress", ("bounced", "hard")),
        ("SoftBounce", ("bounced", "soft")),
        ("Transient", ("deferred", None)),  # Postmark: "Message delayed"
        ("DnsError", ("bounced", "soft")),
        ("Blocked", ("bounced", "policy")),
        ("SpamNotification", ("bounced", "policy")),
        ("DMARCPolicy", ("bounced", "policy")),
        ("ManuallyDeactivated", ("dropped", "policy")),
        ("SMTPApiError", ("dropped", "policy")),
        ("Unsubscribe", ("unsubscribed", None)),
        ("AutoResponder", None),
        ("AddressChange", None),
    ],
)
def test_postmark_bounce_types(bounce_type: str, expected: tuple[str, str | None] | None) -> None:
    at = "2014-08-01T13:28:10.2735393-04:00"  # the offset form of the older examples
    events = parse_postmark(pm_body("Bounce", Type=bounce_type, BouncedAt=at))
    if expected is None:
        assert events == []
        return
    (event,) = events
    assert (event.type, event.bounce_type) == expected
    assert event.occurred_at == utc(2014, 8, 1, 17, 28, 10, 273539)


@pytest.mark.parametrize(
    "body", [b"nope", b"[]", b"{}", b'{"RecordType": "Delivery", "Recipient": "x@y.example"}']
)
def test_postmark_malformed_bodies(body: bytes) -> None:
    with pytest.raises(WebhookRejected) as excinfo:
        parse_postmark(body)
    rejected(excinfo, 400)


def test_postmark_unknown_record_type_is_ignored() -> None:
    assert parse_postmark(b'{"RecordType": "Inbound"}') == []


# ================================================================== Amazon SNS / SES

CERT_URL = (
    "https://sns.us-west-2.amazonaws.com/"
    "SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem"
)
TOPIC = "arn:aws:sns:us-west-2:123456789012:MyTopic"


class Signer:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .sign(self.key, hashes.SHA256())
        )
        self.pem = certificate.public_bytes(serialization.Encoding.PEM)

    def sign(self, message: dict[str, Any], version: str = "1") -> dict[str, Any]:
        signed = dict(message, SignatureVersion=version, SigningCertURL=CERT_URL)
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(sns_string_to_sign(signed), padding.PKCS1v15(), algorithm)
        signed["Signature"] = base64.b64encode(signature).decode()
        return signed


class Fetch:
    def __init__(self, pem: bytes) -> None:
        self.pem = pem
        self.calls: list[str] = []

    async def __call__(self, url: str) -> bytes:
        self.calls.append(url)
        return self.pem


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


def documented_sns(kind: str) -> dict[str, Any]:
    """The SNS documentation's example, as published (in 2012)."""
    message: dict[str, Any] = load("sns_messages.json")[kind]
    return message


def sns_time(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def sns(kind: str, *, age: timedelta = timedelta(seconds=1)) -> dict[str, Any]:
    """The documented example, published ``age`` ago (the replay window is checked)."""
    return dict(documented_sns(kind), Timestamp=sns_time(datetime.now(UTC) - age))


def test_sns_string_to_sign_follows_the_documented_order() -> None:
    notification = documented_sns("Notification")
    assert sns_string_to_sign(notification) == (
        b"Message\nHello world!\n"
        b"MessageId\n22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324\n"
        b"Subject\nMy First Message\n"
        b"Timestamp\n2012-05-02T00:54:06.655Z\n"
        b"TopicArn\narn:aws:sns:us-west-2:123456789012:MyTopic\n"
        b"Type\nNotification\n"
    )
    del notification["Subject"]
    assert b"Subject" not in sns_string_to_sign(notification)
    confirmation = documented_sns("SubscriptionConfirmation")
    names = ["Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type"]
    expected = "".join(f"{name}\n{confirmation[name]}\n" for name in names)
    assert sns_string_to_sign(confirmation) == expected.encode()
    assert b"\nTo confirm the subscription" in sns_string_to_sign(confirmation)  # \n unescaped


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize(
    "kind", ["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]
)
async def test_sns_signed_messages_verify(signer: Signer, kind: str, version: str) -> None:
    fetch = Fetch(signer.pem)
    verifier = SnsVerifier({TOPIC}, fetch)
    await verifier.verify(signer.sign(sns(kind), version))
    await verifier.verify(signer.sign(sns(kind), version))
    assert fetch.calls == [CERT_URL]  # fetched once, then cached


@pytest.mark.parametrize(
    "kind", ["Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation"]
)
async def test_sns_messages_outside_the_replay_window_are_rejected(
    signer: Signer, kind: str
) -> None:
    """Correctly signed, but published longer ago (or later) than the tolerance."""
    verifier = SnsVerifier({TOPIC}, Fetch(signer.pem), tolerance=300)
    await verifier.verify(signer.sign(sns(kind, age=timedelta(seconds=290)), "2"))
    for age in (timedelta(seconds=310), timedelta(days=1), -timedelta(seconds=310)):
        with pytest.raises(WebhookRejected) as excinfo:
            await verifier.verify(signer.sign(sns(kind, age=age), "2"))
        rejected(excinfo, 401)
        assert "replay window" in excinfo.value.reason
    # The documentation's own example, signed as it was published: long stale.
    with pytest.raises(WebhookRejected) as excinfo:
        await verifier.verify(signer.sign(documented_sns(kind), "1"))
    rejected(excinfo, 401)
    # A tolerance is a setting: a verifier allowing a day takes the day-old message.
    lenient = SnsVerifier({TOPIC}, Fetch(signer.pem), tolerance=2 * 86400)
    await lenient.verify(signer.sign(sns(kind, age=timedelta(days=1)), "2"))


async def test_sns_timestamp_that_is_not_a_time_is_malformed(signer: Signer) -> None:
    verifier = SnsVerifier({TOPIC}, Fetch(signer.pem))
    with pytest.raises(WebhookRejected) as excinfo:
        await verifier.verify(signer.sign(dict(sns("Notification"), Timestamp="yesterday")))
    rejected(excinfo, 400)


async def test_sns_notification_without_subject(signer: Signer) -> None:
    message = sns("Notification")
    del message["Subject"]
    signed = signer.sign(message, "2")
    verifier = SnsVerifier({TOPIC}, Fetch(signer.pem))
    await verifier.verify(signed)
    with pytest.raises(WebhookRejected) as excinfo:
        await verifier.verify(dict(signed, Subject="Added later"))
    rejected(excinfo, 401)


async def test_sns_documented_placeholder_signature_does_not_verify(signer: Signer) -> None:
    verifier = SnsVerifier({TOPIC}, Fetch(signer.pem))
    with pytest.raises(WebhookRejected) as excinfo:
        await verifier.verify(sns("Notification"))  # "EXAMPLE..." signature
    rejected(excinfo, 401)


async def test_sns_wrong_key_and_wrong_version_are_rejected(signer: Signer) -> None:
    other = Signer()
    verifier = SnsVerifier({TOPIC}, Fetch(signer.pem))
    for message in (
        other.sign(sns("Notification"), "1"),
        dict(signer.sign(sns("Notification"), "1"), SignatureVersion="2"),
        dict(signer.sign(sns("Notification"), "2"), SignatureVersion="1"),
        dict(signer.sign(sns("Notification"), "1"), SignatureVersion="3"),
        dict(signer.sign(sns("Notification"), "1"), Signature="%%%"),
    ):
        with pytest.raises(WebhookRejected) as excinfo:
            await verifier.verify(message)
        rejected(excinfo, 401)


@pytest.mark.parametrize(
    "url",
    [
        "https://sns.amazonaws.com.evil.example/x.pem",
        "https://sns.us-east-1.amazonaws.com.evil.example/x.pem",
        "http://sns.us-west-2.amazonaws.com/SimpleNotificationService-x.pem",
        "https://evil.example/",
        "https://evil.example/sns.us-west-2.amazonaws.com/x.pem",
        "https://sns.us-west-2.amazonaws.com@evil.example/x.pem",
        "https://user:pw@sns.us-west-2.amazonaws.com/x.pem",
        "https://sns.us-west-2.amazonaws.com:8443/x.pem",
        "https://sns.us-west-2.amazonaws.com/x.pem?u=https://evil.example/",
        "https://sns.us-west-2.amazonaws.com/x.pem#frag",
        "https://sns.us-west-2.amazonaws.com\\@evil.example/x.pem",
        "https://sns.us-west-2.amazonaws.com/x.txt",
        "https://sns.us_west-2.amazonaws.com/x.pem",
        "https://sns.amazonaws.com/x.pem",
        "https://sns.us-west-2.amazonaws.com\n.evil.example/x.pem",
        "https://sns.us-west-2.amazonaws.com.cn.evil/x.pem",
        "https://xsns.us-west-2.amazonaws.com/x.pem",
        "file:///etc/passwd.pem",
        "",
    ],
)
async def test_sns_foreign_certificate_urls_are_refused_before_fetching(
    signer: Signer, url: str
) -> None:
    fetch = Fetch(signer.pem)
    verifier = SnsVerifier({TOPIC}, fetch)
    message = signer.sign(sns("Notification"))
    message["SigningCertURL"] = url
    with pytest.raises(WebhookRejected) as excinfo:
        await verifier.verify(message)
    rejected(excinfo, 401)
    assert fetch.calls == []


@pytest.mark.parametrize(
    "url",
    [
        CERT_URL,
        "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem",
        "https://sns.us-east-1.amazonaws.com:443/SimpleNotificationService-abc.pem",
    ],
)
def test_sns_certificate_urls_on_sns_hosts(url: str) -> None:
    assert is_sns_certificate_url(url)


async def test_sns_topic_outside_allow_list_is_forbidden(signer: Signer) -> None:
    fetch = Fetch(signer.pem)
    verifier = SnsVerifier({"arn:aws:sns:us-east-1:111122223333:other"}, fetch)
    with pytest.raises(WebhookRejected) as excinfo:
        await verifier.verify(signer.sign(sns("Notification")))
    rejected(excinfo, 403)
    assert fetch.calls == []


async def test_sns_certificate_problems(signer: Signer) -> None:
    message = signer.sign(sns("Notification"))
    garbage = SnsVerifier({TOPIC}, Fetch(b"<html>404</html>"))
    with pytest.raises(WebhookRejected) as excinfo:
        await garbage.verify(message)
    rejected(excinfo, 401)
    late = SnsVerifier(
        {TOPIC}, Fetch(signer.pem), clock=lambda: datetime.now(UTC) + timedelta(days=400)
    )
    with pytest.raises(WebhookRejected) as excinfo:
        await late.verify(message)
    rejected(excinfo, 401)


@pytest.mark.parametrize(
    "change",
    [
        {"Type": "Other"},
        {"Type": None},
        {"Message": None},
        {"TopicArn": 7},
        {"Signature": None},
        {"SigningCertURL": None},
    ],
)
async def test_sns_malformed_messages(signer: Signer, change: dict[str, Any]) -> None:
    message = signer.sign(sns("Notification"))
    message.update(change)
    verifier = SnsVerifier({TOPIC}, Fetch(signer.pem))
    with pytest.raises(WebhookRejected) as excinfo:
        await verifier.verify({k: v for k, v in message.items() if v is not None})
    rejected(excinfo, 400)


@FAST
@given(data=st.data())
def test_sns_any_tampered_message_is_rejected(signer: Signer, data: st.DataObject) -> None:
    signed = signer.sign(ses_envelope(load("ses_notifications.json")["bounce_with_dsn"]), "2")
    text = signed["Message"]
    index = data.draw(st.integers(0, len(text) - 1))
    replacement = data.draw(st.characters(codec="utf-8").filter(lambda c: c != text[index]))
    tampered = dict(signed, Message=text[:index] + replacement + text[index + 1 :])
    verifier = SnsVerifier({TOPIC}, Fetch(signer.pem))
    with pytest.raises(WebhookRejected) as excinfo:
        asyncio.run(verifier.verify(tampered))
    rejected(excinfo, 401)


def ses_envelope(notification: dict[str, Any]) -> dict[str, Any]:
    envelope = sns("Notification")
    del envelope["Subject"]
    envelope["Message"] = json.dumps(notification)
    return envelope


async def test_ses_notification_through_verified_sns(signer: Signer) -> None:
    envelope = signer.sign(ses_envelope(load("ses_notifications.json")["bounce_with_dsn"]), "2")
    await SnsVerifier({TOPIC}, Fetch(signer.pem)).verify(envelope)
    (bounce,) = parse_ses(envelope)
    feedback = "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa068a-000000"
    assert bounce == NormalizedEvent(
        provider="ses",
        provider_event_id=f"{feedback}:jane@example.com",
        type="bounced",
        email="jane@example.com",
        occurred_at=utc(2016, 1, 27, 14, 59, 38, 237000),
        message_id="<custom-message-ID>",
        provider_message_id="00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000",
        bounce_type="hard",
        detail={
            "bounceType": "Permanent",
            "bounceSubType": "General",
            "reportingMTA": "dns; email.example.com",
            "remoteMtaIp": "127.0.2.0",
            "action": "failed",
            "status": "5.1.1",
            "diagnosticCode": "smtp; 550 5.1.1 <jane@example.com>... User",
        },
    )


def test_ses_notification_examples() -> None:
    examples = load("ses_notifications.json")
    events = parse_ses(ses_envelope(examples["bounce_without_dsn"]))
    assert [(e.type, e.email, e.bounce_type) for e in events] == [
        ("bounced", "jane@example.com", "hard"),
        ("bounced", "richard@example.com", "hard"),
    ]
    assert len({e.provider_event_id for e in events}) == 2
    (complaint,) = parse_ses(ses_envelope(examples["complaint_with_feedback"]))
    assert (complaint.type, complaint.email) == ("complained", "richard@example.com")
    assert complaint.detail["complaintFeedbackType"] == "abuse"
    assert complaint.user_agent is None  # the feedback loop's agent is not the reader's
    (complaint,) = parse_ses(ses_envelope(examples["complaint_without_feedback"]))
    assert complaint.provider_event_id.startswith("0000013786031775-fea503bc")
    (delivered,) = parse_ses(ses_envelope(examples["delivery"]))
    assert (delivered.type, delivered.email, delivered.message_id) == (
        "delivered",
        "jane@example.com",
        "<custom-message-ID>",
    )
    assert delivered.detail["smtpResponse"] == "250 ok:  Message 64111812 accepted"
    (again,) = parse_ses(ses_envelope(examples["delivery"]))
    assert delivered.provider_event_id == again.provider_event_id


SES_EXAMPLE_ID = "EXAMPLE7c191be45-e9aedb9a-02f9-4d12-a87d-dd0099a07f8a-000000"
SES_DOC_LINK = "http://docs.aws.amazon.com/ses/latest/DeveloperGuide/send-email-smtp.html"


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("Bounce", [("bounced", "recipient@example.com", "hard")]),
        ("Complaint", [("complained", "recipient@example.com", None)]),
        ("Delivery", [("delivered", "recipient@example.com", None)]),
        ("Send", []),
        ("Reject", [("dropped", "sender@example.com", "policy")]),
        ("Open", [("opened", "recipient@example.com", None)]),
        ("Click", [("clicked", "recipient@example.com", None)]),
        ("Rendering Failure", []),
        ("DeliveryDelay", [("deferred", "recipient@example.com", None)]),
    ],
)
def test_ses_event_publishing_examples(
    kind: str, expected: list[tuple[str, str, str | None]]
) -> None:
    record = load("ses_events.json")[kind]
    events = parse_ses(ses_envelope(record))
    assert [(e.type, e.email, e.bounce_type) for e in events] == expected
    for event in events:
        assert event.provider_message_id == SES_EXAMPLE_ID
    if kind == "Open":
        assert events[0].ip == "192.0.2.1"
        assert events[0].occurred_at == utc(2017, 8, 9, 22, 0, 19, 652000)
        assert events[0].user_agent is not None and "iPhone" in events[0].user_agent
    if kind == "Click":
        assert events[0].url == SES_DOC_LINK
        assert events[0].message_id == f"<{SES_EXAMPLE_ID}>"  # its Message-ID header
    if kind == "DeliveryDelay":
        assert events[0].detail["delayType"] == "TransientCommunicationFailure"


def test_ses_tags_and_bounce_types() -> None:
    record = load("ses_events.json")["Bounce"]
    record["mail"]["tags"]["delivery_key"] = ["dk-ses"]
    for ses_type, ours in (("Permanent", "hard"), ("Transient", "soft"), ("Undetermined", "soft")):
        record["bounce"]["bounceType"] = ses_type
        (event,) = parse_ses(ses_envelope(record))
        assert (event.bounce_type, event.delivery_key) == (ours, "dk-ses")


def test_ses_non_notifications_and_malformed() -> None:
    assert parse_ses(sns("SubscriptionConfirmation")) == []
    assert parse_ses(ses_envelope({"notificationType": "AmazonSnsSubscriptionSucceeded"})) == []
    for message in ("not json", "[]", json.dumps({"eventType": "Bounce"})):
        with pytest.raises(WebhookRejected) as excinfo:
            parse_ses(dict(sns("Notification"), Message=message))
        rejected(excinfo, 400)


# ====================================================================== inbound email


def multipart(fields: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "xYzZY"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
        for name, value in fields
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def content(part: MIMEPart | None) -> str:
    assert part is not None
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")  # the rebuilt messages use CRLF line ends


def parsed(raw: bytes) -> EmailMessage:
    message = message_from_bytes(raw, policy=email_policy.default)
    assert isinstance(message, EmailMessage)
    return message


def sendgrid_default_fields(**changes: str) -> list[tuple[str, bytes]]:
    fields = dict(load("sendgrid_inbound_default.json"), **changes)
    return [(name, value.encode()) for name, value in fields.items()]


def test_sendgrid_inbound_default_payload_is_rebuilt() -> None:
    raw = inbound_from_sendgrid_parse(*multipart(sendgrid_default_fields()))
    message = parsed(raw)
    assert message["Message-ID"] == (
        "<CAN_P_JMvV7ZpAQhOnDienypLrJmuhN=LQWweu4yScw4jQyXY2w@mail.gmail.com>"
    )
    assert message["Subject"] == "Different File Types"
    assert message["From"] == "Sender Name <example@example.com>"
    assert len(message.get_all("Received") or []) == 4
    assert message.get_content_type() == "multipart/alternative"  # not the old multipart/mixed
    assert len(message.get_all("Content-Type") or []) == 1
    assert len(message.get_all("MIME-Version") or []) == 1
    assert content(message.get_body(("plain",))) == "Here's an email with multiple attachments\n"
    assert "cid:ii_1562e2169c132d83" in content(message.get_body(("html",)))
    assert b"\r\n" in raw and b"\n\n" not in raw.replace(b"\r\n", b"")
    inbound = domain.parse_inbound(raw)
    assert inbound.subject == "Different File Types"
    assert inbound.from_email == "example@example.com"


def test_sendgrid_inbound_reply_keeps_threading_headers() -> None:
    headers = load("sendgrid_inbound_default.json")["headers"]
    headers += f"In-Reply-To: {OUR_ID}\nReferences: {OUR_ID}\n"
    fields = sendgrid_default_fields(
        headers=headers,
        text="Caf\u00e9 at three?\n",
        charsets=json.dumps({"text": "iso-8859-1"}),
    )
    fields = [
        (name, "Caf\u00e9 at three?\n".encode("iso-8859-1") if name == "text" else value)
        for name, value in fields
        if name != "html"
    ]
    raw = inbound_from_sendgrid_parse(*multipart(fields))
    message = parsed(raw)
    assert message["In-Reply-To"] == OUR_ID
    assert message.get_content_type() == "text/plain"
    assert content(message) == "Caf\u00e9 at three?\n"
    assert raw.isascii()  # the rebuilt body is 7-bit clean
    assert domain.parse_inbound(raw).referenced == [OUR_ID]


def test_sendgrid_inbound_raw_payload_is_returned_as_is() -> None:
    email_bytes = (FIXTURES / "sendgrid_inbound_raw_email.txt").read_bytes()
    fields = [
        ("dkim", b"{@sendgrid.com : pass}"),
        ("email", email_bytes),
        ("to", b"example@example.comom"),
        ("from", b"Sender Name <example@example.com>"),
        ("sender_ip", b"209.85.214.45"),
        ("envelope", b'{"to":["example@example.comom"],"from":"example@example.com"}'),
        ("subject", b"Hello"),
        ("spam_score", b"0.353"),
        ("charsets", b'{"to":"UTF-8","subject":"UTF-8","from":"UTF-8"}'),
        ("SPF", b"pass"),
    ]
    raw = inbound_from_sendgrid_parse(*multipart(fields))
    assert raw == email_bytes
    message = parsed(raw)
    assert message["Message-ID"] == (
        "<CAN_P_JNa25--hzm5=-ES9cnxgWa+h+E49OOAS7sPpV0gsoXCOw@mail.gmail.com>"
    )
    assert message["Subject"] == "Hello"
    assert content(message.get_body(("plain",))).strip() == (
        "This is a test email with 1 attachment."
    )
    crlf = email_bytes.replace(b"\n", b"\r\n")  # byte-exact with CRLF line ends too
    assert inbound_from_sendgrid_parse(*multipart([("email", crlf)])) == crlf


UNCLOSED = b'--xYzZY\r\nContent-Disposition: form-data; name="email"\r\n\r\nx'


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (*multipart([("to", b"a@b.example"), ("text", b"hi")]),),
        (UNCLOSED, "multipart/form-data; boundary=xYzZY"),
        (b"{}", "application/json"),
        (b"email=x", "multipart/form-data; boundary=xYzZY\r\nX-Evil: 1"),
        (*multipart([("headers", b"not a header line\n"), ("text", b"hi")]),),
        (*multipart([("headers", b" continuation first\n"), ("text", b"hi")]),),
    ],
)
def test_sendgrid_inbound_malformed(body: bytes, content_type: str) -> None:
    with pytest.raises(WebhookRejected) as excinfo:
        inbound_from_sendgrid_parse(body, content_type)
    rejected(excinfo, 400)


FORM = "application/x-www-form-urlencoded"


def mailgun_route_fields(**changes: str) -> dict[str, str]:
    fields: dict[str, str] = dict(load("mailgun_route_fields.json"), **changes)
    fields["signature"] = mg_sign(fields["timestamp"], fields["token"])
    return fields


def test_mailgun_route_parsed_post_is_rebuilt_and_signed() -> None:
    fields = mailgun_route_fields()
    body = urlencode(fields).encode()
    content_type = "application/x-www-form-urlencoded"
    signature = mailgun_route_signature(body, content_type)
    assert signature == {
        "timestamp": "1770920772",
        "token": MG_TOKEN,
        "signature": mg_sign("1770920772", MG_TOKEN),
    }
    mg_verify(signature, MG_KEY, now=MG_NOW)
    raw = inbound_from_mailgun_route(body, content_type)
    message = parsed(raw)
    assert message["Message-ID"] == (
        "<CAN_P_JNa25--hzm5=-ES9cnxgWa+h+E49OOAS7sPpV0gsoXCOw@mail.gmail.com>"
    )
    assert message["In-Reply-To"] == OUR_ID
    assert message["Subject"] == "Re: Sample POST request"
    assert message.get_content_type() == "multipart/alternative"
    assert content(message.get_body(("plain",))).startswith("Hi Alice,\n\nThis is Bob.")
    inbound = domain.parse_inbound(raw)
    assert (inbound.from_email, inbound.referenced) == ("bob@example.com", [OUR_ID])
    # The same fields as multipart/form-data (how Mailgun posts when there are
    # attachments) give the same message.
    with_file = [(k, v.encode()) for k, v in fields.items()] + [("attachment-1", b"\x00\xff")]
    assert inbound_from_mailgun_route(*multipart(with_file)) == raw
    assert mailgun_route_signature(*multipart(with_file)) == signature


def test_mailgun_route_non_ascii_headers_are_encoded() -> None:
    listed = json.loads(load("mailgun_route_fields.json")["message-headers"])
    listed = [
        [name, "Re: caf\u00e9 \u2615" if name == "Subject" else value] for name, value in listed
    ]
    listed = [
        [name, "J\u00f6rg <bob@example.com>" if name == "From" else value] for name, value in listed
    ]
    fields = mailgun_route_fields(
        **{"message-headers": json.dumps(listed), "body-plain": "\u00e7a va"}
    )
    raw = inbound_from_mailgun_route(urlencode(fields).encode(), FORM)
    assert raw.isascii()
    message = parsed(raw)
    assert message["Subject"] == "Re: caf\u00e9 \u2615"
    assert message["From"].addresses[0].display_name == "J\u00f6rg"
    assert content(message.get_body(("plain",))) == "\u00e7a va\n"


def test_mailgun_route_raw_mime_is_returned_byte_for_byte() -> None:
    mime = (
        "From: Bob <bob@example.com>\r\nTo: alice@example.com\r\n"
        f"Message-ID: <reply-1@example.com>\r\nIn-Reply-To: {OUR_ID}\r\n"
        "Subject: Re: caf\u00e9\r\nContent-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\nOui, \u00e0 demain.\r\n"
    ).encode()
    fields = {
        "recipient": "alice@example.com",
        "sender": "bob@example.com",
        "from": "Bob <bob@example.com>",
        "subject": "Re: café",
        "timestamp": MG_TIMESTAMP,
        "token": MG_TOKEN,
        "signature": mg_sign(MG_TIMESTAMP, MG_TOKEN),
    }
    body = (urlencode(fields) + "&body-mime=" + "".join(f"%{b:02X}" for b in mime)).encode()
    assert inbound_from_mailgun_route(body, "application/x-www-form-urlencoded") == mime
    multipart_body = multipart([*((k, v.encode()) for k, v in fields.items()), ("body-mime", mime)])
    assert inbound_from_mailgun_route(*multipart_body) == mime
    assert domain.parse_inbound(mime).referenced == [OUR_ID]


@pytest.mark.parametrize(
    "fields",
    [
        {"recipient": "a@b.example", "body-plain": "hi"},
        {"message-headers": "not json", "body-plain": "hi"},
        {"message-headers": '{"Subject": "x"}', "body-plain": "hi"},
        {"message-headers": '[["Subject"]]', "body-plain": "hi"},
        {"message-headers": '[["Bad Name", "x"]]', "body-plain": "hi"},
        {"message-headers": '[["Subject", "a\\r\\nBcc: evil@example.com"]]'},
    ],
)
def test_mailgun_route_malformed(fields: dict[str, str]) -> None:
    with pytest.raises(WebhookRejected) as excinfo:
        inbound_from_mailgun_route(urlencode(fields).encode(), "application/x-www-form-urlencoded")
    rejected(excinfo, 400)


def test_mailgun_route_signature_fields_are_required() -> None:
    for missing in ("timestamp", "token", "signature"):
        fields = {k: v for k, v in mailgun_route_fields().items() if k != missing}
        with pytest.raises(WebhookRejected) as excinfo:
            mailgun_route_signature(urlencode(fields).encode(), "application/x-www-form-urlencoded")
        rejected(excinfo, 400)
    with pytest.raises(WebhookRejected) as excinfo:
        mailgun_route_signature(b"a=%zz&=", "application/x-www-form-urlencoded")
    rejected(excinfo, 400)


def test_fixtures_are_left_untouched() -> None:
    """The documented payloads stay as documented: tests only mutate copies."""
    before = load("mailgun_events.json")
    mg_body("delivered", **{"user-variables": {"delivery_key": "x"}})
    assert load("mailgun_events.json") == before == copy.deepcopy(before)


@FAST
@given(raw=st.binary(min_size=1, max_size=300).filter(lambda b: b.strip() and b"--xYzZY" not in b))
def test_raw_mime_fields_come_back_byte_for_byte(raw: bytes) -> None:
    assert inbound_from_sendgrid_parse(*multipart([("email", raw)])) == raw
    assert inbound_from_mailgun_route(*multipart([("body-mime", raw)])) == raw
    encoded = "".join(f"%{byte:02X}" for byte in raw)
    assert inbound_from_mailgun_route(f"body-mime={encoded}".encode(), FORM) == raw
