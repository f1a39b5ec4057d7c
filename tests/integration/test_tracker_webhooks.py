"""The tracker's provider webhooks, over real HTTP, in-process on real PostgreSQL and a
real Kafka-protocol broker: signed provider payloads (SendGrid, Mailgun, Postmark, SES
through SNS) and inbound replies become engagement rows and EngagementReceived
events attributed to the message they are about, once per provider event; forged,
stale, replayed or foreign requests are refused and record nothing."""

from __future__ import annotations

import asyncio
import base64
import copy
import functools
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import asyncpg
import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from schemas import topics
from schemas.events import BounceType, EmailFailed, EmailSent, EngagementReceived, FailureKind
from services.runtime import tokens
from services.runtime.devstack import free_port
from services.runtime.kafka import create_topics
from services.runtime.settings import TrackerSettings
from services.tracker import handlers, repo
from services.tracker.app import TrackerService
from services.tracker.domain import PARKED_REPLY_TTL
from services.tracker.webhooks import sns_string_to_sign

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "webhooks"
MG_KEY = "key-3ax6xnjp29jd6fds4gc373sgvjxteol0"
PM_USER = "hooks"
PM_PASSWORD = "s3cret-postmark"
INBOUND_TOKEN = "inbound-s3cret"
TOPIC = "arn:aws:sns:us-west-2:123456789012:MyTopic"
CERT_URL = (
    "https://sns.us-west-2.amazonaws.com/"
    "SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem"
)
#: The Message-ID the Mailgun route fixture's In-Reply-To/References name.
ROUTE_PARENT = "<3e9a344efc9b27b6f00f8420ff22878233aed9d0@acme.example>"
MAX_BODY = 64 * 1024
TOLERANCE = 300
WAIT_SECONDS = 20.0


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


# ------------------------------------------------------------------ signing helpers
# (after tests/unit/test_webhooks.py)


@functools.cache
def sg_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def sg_public(key: ec.EllipticCurvePrivateKey) -> str:
    raw = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(raw).decode()  # what the SendGrid dashboard shows


def sg_headers(
    body: bytes, *, key: ec.EllipticCurvePrivateKey | None = None, at: float | None = None
) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    der = (key or sg_key()).sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "Content-Type": "application/json",
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(der).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
    }


def mg_sign(timestamp: str, token: str, key: str = MG_KEY) -> str:
    return hmac.new(key.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


def mg_signature(*, key: str = MG_KEY, at: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    token = uuid.uuid4().hex + uuid.uuid4().hex[:18]
    return {"timestamp": timestamp, "token": token, "signature": mg_sign(timestamp, token, key)}


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class SnsSigner:
    """A self-signed stand-in for the SNS signing certificate."""

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

    def sign(
        self,
        message: dict[str, Any],
        *,
        version: str = "1",
        cert_url: str = CERT_URL,
        key: rsa.RSAPrivateKey | None = None,
    ) -> dict[str, Any]:
        signed = dict(message, SignatureVersion=version, SigningCertURL=cert_url)
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = (key or self.key).sign(
            sns_string_to_sign(signed), padding.PKCS1v15(), algorithm
        )
        signed["Signature"] = base64.b64encode(signature).decode()
        return signed


@functools.cache
def sns_signer() -> SnsSigner:
    return SnsSigner()


def sns_time(age: timedelta = timedelta(seconds=1)) -> str:
    """An SNS ``Timestamp`` (publication time) ``age`` ago."""
    at = datetime.now(UTC) - age
    return at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"


def sns_message(kind: str, *, age: timedelta = timedelta(seconds=1)) -> dict[str, Any]:
    """The SNS documentation's example of ``kind``, published ``age`` ago."""
    message: dict[str, Any] = load("sns_messages.json")[kind]
    message["Timestamp"] = sns_time(age)
    return message


def ses_envelope(
    notification: dict[str, Any], *, topic: str = TOPIC, age: timedelta = timedelta(seconds=1)
) -> dict[str, Any]:
    envelope = sns_message("Notification", age=age)
    del envelope["Subject"]
    envelope["MessageId"] = str(uuid.uuid4())
    envelope["TopicArn"] = topic
    envelope["Message"] = json.dumps(notification)
    return envelope


def multipart(fields: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = "xYzZY"
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        + value
        + b"\r\n"
        for name, value in fields
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


# ----------------------------------------------------------------------- the service


def sent(
    to_email: str, *, message_id: str | None = None, provider_message_id: str | None = None
) -> EmailSent:
    """A message the sender handed off an hour ago."""
    token = uuid.uuid4().hex
    return EmailSent(
        lead_id=uuid.uuid4(),
        enrollment_id=uuid.uuid4(),
        sequence_id=uuid.uuid4(),
        sequence_key="cold_outreach",
        sequence_version=1,
        step_id=uuid.uuid4(),
        step_index=0,
        delivery_key=f"dk-{token[:12]}",
        message_id=message_id or f"<{token}@acme.example>",
        to_email=to_email,
        from_email="ann@acme.example",
        subject="Hello",
        sent_at=datetime.now(UTC) - timedelta(hours=1),
        transport="provider",
        provider_message_id=provider_message_id or f"pm-{token[12:]}",
    )


def follow_up(message: EmailSent) -> EmailSent:
    """The lead's next step, to the same address, sent since: the latest message to the
    address, which events attributed by their identifiers must not land on."""
    token = uuid.uuid4().hex
    return message.model_copy(
        update={
            "event_id": uuid.uuid4(),
            "step_id": uuid.uuid4(),
            "step_index": message.step_index + 1,
            "delivery_key": f"dk-{token[:12]}",
            "message_id": f"<{token}@acme.example>",
            "provider_message_id": f"pm-{token[12:]}",
            "sent_at": datetime.now(UTC) - timedelta(minutes=5),
        }
    )


@dataclass
class Tracker:
    service: TrackerService
    http: httpx.AsyncClient
    producer: AIOKafkaProducer
    offsets: AIOKafkaConsumer
    fetched: list[str] = field(default_factory=list)
    confirmed: list[str] = field(default_factory=list)
    raw_baseline: int = 0

    @property
    def pool(self) -> asyncpg.Pool:
        return self.service.pool

    async def register(self, *messages: EmailSent) -> None:
        """Publish EmailSent the way the sender does; wait until the registry has them."""
        for message in messages:
            await self.producer.send_and_wait(
                topics.EMAIL_SENT, message.to_bytes(), key=message.kafka_key()
            )
        ids = [m.message_id for m in messages]
        for _ in range(int(WAIT_SECONDS / 0.05)):
            known = await self.pool.fetchval(
                "SELECT count(*) FROM messages WHERE message_id = ANY($1::text[])", ids
            )
            if known == len(ids):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the tracker never registered the sent messages")

    async def processed(self, *responses: httpx.Response) -> None:
        """Wait until the consumer has applied the webhooks these responses accepted."""
        ids = [uuid.UUID(r.json()["event_id"]) for r in responses]
        for _ in range(int(WAIT_SECONDS / 0.05)):
            done = await self.pool.fetchval(
                "SELECT count(*) FROM inbox WHERE event_id = ANY($1::uuid[])", ids
            )
            if done == len(ids):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the tracker never applied the accepted webhooks")

    async def raw_end(self) -> int:
        await self.offsets.topics()  # refresh metadata
        partitions = self.offsets.partitions_for_topic(topics.WEBHOOKS_RAW) or set()
        ends = await self.offsets.end_offsets(
            [TopicPartition(topics.WEBHOOKS_RAW, p) for p in partitions]
        )
        return sum(ends.values())

    async def raw_written(self) -> int:
        """Records written to webhooks-raw since the test started (end offsets)."""
        return await self.raw_end() - self.raw_baseline

    async def engagements(self) -> set[tuple[Any, ...]]:
        rows = await self.pool.fetch(
            "SELECT message_id, lead_id, type, machine, detail->>'bounce_type' AS bounce_type,"
            " source, provider_event_id FROM engagement_events"
        )
        return {tuple(r.values()) for r in rows}

    async def emitted(self) -> set[tuple[Any, ...]]:
        """EngagementReceived events in the outbox."""
        rows = await self.pool.fetch(
            "SELECT convert_from(payload, 'UTF8') AS payload FROM outbox"
            " WHERE event_type = 'EngagementReceived'"
        )
        out = set()
        for row in rows:
            event = json.loads(row["payload"])
            out.add(
                (
                    event["message_id"],
                    uuid.UUID(event["lead_id"]),
                    event["engagement_type"],
                    event["machine"],
                    event["bounce_type"],
                    event["source"],
                    event["provider_event_id"],
                )
            )
        return out

    async def assert_recorded(self, expected: set[tuple[Any, ...]]) -> None:
        assert await self.engagements() == expected
        assert await self.emitted() == expected


def row(
    message: EmailSent,
    type_: str,
    provider_event_id: str | None,
    *,
    source: str,
    machine: bool = False,
    bounce_type: str | None = None,
) -> tuple[Any, ...]:
    """An engagement as both tables show it (see Tracker.engagements/emitted)."""
    return (
        message.message_id,
        message.lead_id,
        type_,
        machine,
        bounce_type,
        source,
        provider_event_id,
    )


def tracker_settings(database_url: str, kafka_bootstrap: str, **changes: Any) -> TrackerSettings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "kafka_bootstrap_servers": kafka_bootstrap,
        "kafka_session_timeout_ms": 3000,
        "http_port": free_port(),
        "http_host": "127.0.0.1",
        "tracking_secret": "test-tracking-secret",
        "max_body_bytes": MAX_BODY,
        "registry_wait_seconds": 0.2,
        "webhook_tolerance_seconds": TOLERANCE,
        "sendgrid_public_key": sg_public(sg_key()),
        "mailgun_signing_key": MG_KEY,
        "postmark_username": PM_USER,
        "postmark_password": PM_PASSWORD,
        "ses_topic_arns": f"{TOPIC}, arn:aws:sns:eu-west-1:123456789012:Other",
        "inbound_token": INBOUND_TOKEN,
    }
    values.update(changes)
    return TrackerSettings(**values)


@pytest.fixture
async def tracker(database_url: str, kafka_bootstrap: str) -> AsyncIterator[Tracker]:
    await create_topics(kafka_bootstrap, 2)
    service = TrackerService(tracker_settings(database_url, kafka_bootstrap))
    fetched: list[str] = []
    confirmed: list[str] = []

    async def fetch_certificate(url: str) -> bytes:
        fetched.append(url)
        return sns_signer().pem

    async def confirm_subscription(url: str) -> None:
        confirmed.append(url)

    service.fetch_certificate = fetch_certificate
    service.confirm_subscription = confirm_subscription
    await service.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    offsets = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
    base_url = f"http://127.0.0.1:{service.settings.http_port}"
    try:
        await producer.start()
        await offsets.start()
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
            harness = Tracker(service, http, producer, offsets, fetched, confirmed)
            harness.raw_baseline = await harness.raw_end()
            yield harness
    finally:
        await offsets.stop()
        await producer.stop()
        await service.stop()


# ------------------------------------------------------------------------- SendGrid


DELIVERED_RESPONSE = "250 2.0.0 OK \u2013 re\u00e7u \u2615"


def sendgrid_batch(a: EmailSent, b: EmailSent, now: int) -> bytes:
    """The documented events, about our two messages: delivered/opens to A, a click and
    a bounce to B, each attributed by a different identifier."""
    docs = load("sendgrid_events.json")

    def doc(event: str, type_: str | None = None) -> dict[str, Any]:
        found = next(d for d in docs if d["event"] == event and d.get("type", type_) == type_)
        return copy.deepcopy(found)

    delivered = doc("delivered")
    delivered.update(email=a.to_email, delivery_key=a.delivery_key, timestamp=now)
    delivered["response"] = DELIVERED_RESPONSE  # non-ASCII: the raw bytes travel unchanged
    human_open = doc("open")  # a browser UA, an hour after the send
    human_open.update(email=a.to_email, custom_args={"delivery_key": a.delivery_key})
    human_open["timestamp"] = now
    machine_open = doc("open")
    machine_open.update(
        email=a.to_email,
        delivery_key=a.delivery_key,
        sg_event_id="machine-open-0001",
        sg_machine_open=True,
        timestamp=now,
    )
    click = doc("click")
    click.update(email=b.to_email, delivery_key=b.delivery_key, timestamp=now)
    bounce = doc("bounce", "bounce")  # attributed by smtp-id only
    bounce.update(email=b.to_email, timestamp=now)
    bounce["smtp-id"] = b.message_id
    processed = doc("processed")  # not an engagement
    batch = [processed, delivered, human_open, machine_open, click, bounce]
    return json.dumps(batch, ensure_ascii=False).encode()


async def test_sendgrid_signed_batch_is_recorded_once_and_forgeries_are_refused(
    tracker: Tracker,
) -> None:
    a, b = sent("alex@example.com"), sent("email@example.com")
    await tracker.register(a, b, follow_up(a), follow_up(b))
    body = sendgrid_batch(a, b, int(time.time()))
    http = tracker.http

    refusals: list[tuple[str, bytes, dict[str, str]]] = [
        ("tampered body", body.replace(b"250 2.0.0", b"250 2.0.1"), sg_headers(body)),
        ("wrong key", body, sg_headers(body, key=ec.generate_private_key(ec.SECP256R1()))),
        ("old timestamp", body, sg_headers(body, at=time.time() - TOLERANCE - 60)),
        ("unsigned", body, {"Content-Type": "application/json"}),
    ]
    for what, payload, headers in refusals:
        response = await http.post("/webhooks/sendgrid", content=payload, headers=headers)
        assert response.status_code == 401, (what, response.text)
    assert await tracker.raw_written() == 0

    accepted = await http.post("/webhooks/sendgrid", content=body, headers=sg_headers(body))
    assert accepted.status_code == 200, accepted.text
    await tracker.processed(accepted)
    expected = {
        row(a, "delivered", "rWVYmVk90MjZJ9iohOBa3w==", source="sendgrid"),
        row(a, "opened", "FOTFFO0ecsBE-zxFXfs6WA==", source="sendgrid", machine=False),
        row(a, "opened", "machine-open-0001", source="sendgrid", machine=True),
        row(b, "clicked", "sendgrid_internal_event_id", source="sendgrid"),
        row(b, "bounced", "6g4ZI7SA-xmRDv57GoPIPw==", source="sendgrid", bounce_type="hard"),
    }
    await tracker.assert_recorded(expected)
    details = {
        r["provider_event_id"]: r["detail"]
        for r in await tracker.pool.fetch("SELECT provider_event_id, detail FROM engagement_events")
    }
    assert details["machine-open-0001"]["machine_reason"] == "sendgrid flags a machine open"
    assert "machine_reason" not in details["FOTFFO0ecsBE-zxFXfs6WA=="]
    assert details["rWVYmVk90MjZJ9iohOBa3w=="]["response"] == DELIVERED_RESPONSE

    # SendGrid delivers the same batch again (a retry): nothing new.
    again = await http.post("/webhooks/sendgrid", content=body, headers=sg_headers(body))
    assert again.status_code == 200, again.text
    await tracker.processed(again)
    await tracker.assert_recorded(expected)
    assert await tracker.raw_written() == 2


# -------------------------------------------------------------------------- Mailgun


def mailgun_body(event: str, signature: dict[str, str], **changes: Any) -> bytes:
    event_data = load("mailgun_events.json")["event-data"][event]
    event_data.update(changes)
    return json.dumps({"signature": signature, "event-data": event_data}).encode()


async def test_mailgun_events_are_recorded_once_and_replays_are_refused(
    tracker: Tracker,
) -> None:
    c = sent("recipient@sample.mailgun.com")
    d = sent("badrecipient@sample.mailgun.com", message_id="<mg-d-20260212@acme.example>")
    await tracker.register(c, d, follow_up(c), follow_up(d))
    http = tracker.http
    now = time.time()
    opened = {"timestamp": now, "user-variables": {"delivery_key": c.delivery_key}}
    failed = {
        "timestamp": now,
        "message": {"headers": {"message-id": d.message_id.strip("<>")}},
    }

    first = await http.post(
        "/webhooks/mailgun", content=mailgun_body("opened", mg_signature(), **opened)
    )
    assert first.status_code == 200, first.text
    replay = await http.post("/webhooks/mailgun", content=first.request.content)
    assert replay.status_code == 403, replay.text
    # The same event redelivered under a fresh signature: accepted, recorded once.
    second = await http.post(
        "/webhooks/mailgun", content=mailgun_body("opened", mg_signature(), **opened)
    )
    assert second.status_code == 200, second.text
    bounce = await http.post(
        "/webhooks/mailgun", content=mailgun_body("failed_permanent", mg_signature(), **failed)
    )
    assert bounce.status_code == 200, bounce.text
    assert await tracker.raw_written() == 3

    forged = mg_signature()
    forged["signature"] = mg_sign(forged["timestamp"], forged["token"] + "0")  # other data
    for what, signature in (
        ("wrong key", mg_signature(key="key-not-ours")),
        ("old timestamp", mg_signature(at=now - TOLERANCE - 60)),
        ("tampered signature", forged),
    ):
        response = await http.post(
            "/webhooks/mailgun", content=mailgun_body("opened", signature, **opened)
        )
        assert response.status_code == 401, (what, response.text)
    assert await tracker.raw_written() == 3

    await tracker.processed(first, second, bounce)
    await tracker.assert_recorded(
        {
            row(c, "opened", "q7DMpbLFRKW1QuiLC9XV4Q", source="mailgun", machine=False),
            row(d, "bounced", "2kFItcrLQuKTdp-Ia2Xr7w", source="mailgun", bounce_type="hard"),
        }
    )


# ------------------------------------------------------------------------- Postmark


def postmark_body(record: str, message: EmailSent, at: datetime, **changes: Any) -> bytes:
    payload = load("postmark_events.json")[record]
    when = at.isoformat().replace("+00:00", "Z")
    payload.update(
        MessageID=message.provider_message_id,
        Metadata={"delivery_key": message.delivery_key},
        **{"Email" if record == "Bounce" else "Recipient": message.to_email},
        **{"BouncedAt" if record == "Bounce" else "ReceivedAt": when},
    )
    payload.update(changes)
    return json.dumps(payload).encode()


async def test_postmark_events_need_the_credentials_and_are_recorded_once(
    tracker: Tracker,
) -> None:
    e, f = sent("margareth@nasa.com"), sent("katherine@nasa.com")
    await tracker.register(e, f, follow_up(e), follow_up(f))
    http = tracker.http
    now = datetime.now(UTC)
    bounce = postmark_body("Bounce", e, now)
    opened = postmark_body("Open", f, now)

    for what, headers in (
        ("missing", {}),
        ("wrong password", {"Authorization": basic(PM_USER, "guess")}),
        ("wrong user", {"Authorization": basic("admin", PM_PASSWORD)}),
        ("not basic", {"Authorization": f"Bearer {PM_PASSWORD}"}),
    ):
        response = await http.post("/webhooks/postmark", content=bounce, headers=headers)
        assert response.status_code == 401, (what, response.text)
    assert await tracker.raw_written() == 0

    auth = {"Authorization": basic(PM_USER, PM_PASSWORD), "Content-Type": "application/json"}
    responses = [
        await http.post("/webhooks/postmark", content=body, headers=auth)
        for body in (bounce, opened, opened, bounce)  # each delivered twice
    ]
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    await tracker.processed(*responses)
    open_id = await tracker.pool.fetchval(
        "SELECT provider_event_id FROM engagement_events WHERE type = 'opened'"
    )
    assert open_id.startswith("sha256:")  # Postmark opens carry no id: a stable digest
    await tracker.assert_recorded(
        {
            row(e, "bounced", "692560173", source="postmark", bounce_type="hard"),
            row(f, "opened", open_id, source="postmark", machine=False),
        }
    )
    assert await tracker.raw_written() == 4


# -------------------------------------------------------------------- SES via SNS


def ses_notification(name: str, message: EmailSent, *, by: str) -> dict[str, Any]:
    """A documented SES notification about ``message``, naming it ``by`` its
    ``delivery_key`` tag or by SES's own ``messageId`` (the fixture's Message-ID header,
    "custom-message-ID", is not ours)."""
    notification: dict[str, Any] = load("ses_notifications.json")[name]
    mail = notification["mail"]
    if by == "tag":
        mail["tags"] = {"delivery_key": [message.delivery_key]}
    else:
        mail["messageId"] = message.provider_message_id
    kind = notification["notificationType"].lower()
    recipients = notification[kind][
        "bouncedRecipients" if kind == "bounce" else "complainedRecipients"
    ]
    recipients[0]["emailAddress"] = message.to_email
    return notification


async def test_ses_notifications_through_verified_sns(tracker: Tracker) -> None:
    g, h = sent("jane@example.com"), sent("richard@example.com")
    await tracker.register(g, h, follow_up(g), follow_up(h))
    http = tracker.http
    signer = sns_signer()

    # Subscription confirmation: verified, then confirmed at its SubscribeURL.
    confirmation = signer.sign(sns_message("SubscriptionConfirmation"))
    response = await http.post("/webhooks/ses", json=confirmation)
    assert response.status_code == 200, response.text
    assert response.json() == {"confirmed": True}
    assert tracker.confirmed == [confirmation["SubscribeURL"]]
    assert tracker.fetched == [CERT_URL]
    for url in (
        "https://attacker.example/?Action=ConfirmSubscription&Token=x",
        "http://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription&Token=x",
    ):
        foreign = signer.sign(dict(confirmation, SubscribeURL=url))
        response = await http.post("/webhooks/ses", json=foreign)
        assert response.status_code == 400, (url, response.text)
    assert tracker.confirmed == [confirmation["SubscribeURL"]]

    bounce = signer.sign(
        ses_envelope(ses_notification("bounce_with_dsn", g, by="tag")),
        version="2",
    )
    complaint = signer.sign(
        ses_envelope(ses_notification("complaint_with_feedback", h, by="messageId"))
    )

    # Refused: a topic off the allow-list, a certificate off the SNS hosts (never
    # fetched), a tampered message, a signature by another key.
    fetched_before = list(tracker.fetched)
    off_list = signer.sign(
        ses_envelope(
            json.loads(bounce["Message"]), topic="arn:aws:sns:us-west-2:123456789012:NotOurs"
        )
    )
    evil_cert = "https://sns.us-west-2.amazonaws.com.evil.example/SimpleNotificationService-x.pem"
    tampered_message = json.loads(bounce["Message"])
    tampered_message["bounce"]["bounceType"] = "Transient"
    # Correctly signed, by the right certificate, on an allowed topic: but published
    # longer ago than the replay window (a captured notification played again).
    stale = signer.sign(
        ses_envelope(json.loads(bounce["Message"]), age=timedelta(seconds=TOLERANCE + 60)),
        version="2",
    )
    stale_confirmation = signer.sign(
        sns_message("SubscriptionConfirmation", age=timedelta(hours=2))
    )
    refusals: list[tuple[str, dict[str, Any], int]] = [
        ("older than the replay window", stale, 401),
        ("confirmation older than the replay window", stale_confirmation, 401),
        ("topic not allowed", off_list, 403),
        ("certificate off SNS", signer.sign(dict(bounce), cert_url=evil_cert), 401),
        (
            "plain http certificate",
            signer.sign(dict(bounce), cert_url=CERT_URL.replace("https", "http")),
            401,
        ),
        ("tampered", dict(bounce, Message=json.dumps(tampered_message)), 401),
        (
            "other key",
            signer.sign(
                dict(bounce), key=rsa.generate_private_key(public_exponent=65537, key_size=2048)
            ),
            401,
        ),
    ]
    for what, envelope, status in refusals:
        response = await http.post("/webhooks/ses", json=envelope)
        assert response.status_code == status, (what, response.text)
    assert tracker.fetched == fetched_before  # the certificate was cached; nothing else fetched
    assert tracker.confirmed == [confirmation["SubscribeURL"]]
    assert await tracker.raw_written() == 0

    responses = [
        await http.post("/webhooks/ses", json=envelope)
        for envelope in (bounce, complaint, bounce)  # SNS retries the bounce
    ]
    assert [r.status_code for r in responses] == [200] * 3, [r.text for r in responses]
    await tracker.processed(*responses)
    bounce_feedback = "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa068a-000000"
    complaint_feedback = "000001378603177f-18c07c78-fa81-4a58-9dd1-fedc3cb8f49a-000000"
    await tracker.assert_recorded(
        {
            row(g, "bounced", f"{bounce_feedback}:{g.to_email}", source="ses", bounce_type="hard"),
            row(h, "complained", f"{complaint_feedback}:{h.to_email}", source="ses"),
        }
    )
    assert await tracker.raw_written() == 3


# --------------------------------------------------------------------- inbound mail


def sendgrid_parse_reply(parent: EmailSent) -> tuple[bytes, str]:
    """Inbound Parse in raw mode: the documented raw email, answering ``parent``."""
    raw = (FIXTURES / "sendgrid_inbound_raw_email.txt").read_bytes()
    raw = raw.replace(
        b"Message-ID: <CAN_P_JNa25--hzm5=-ES9cnxgWa+h+E49OOAS7sPpV0gsoXCOw@mail.gmail.com>\n",
        b"Message-ID: <sg-parse-reply-1@mail.gmail.com>\n"
        + f"In-Reply-To: {parent.message_id}\nReferences: {parent.message_id}\n".encode(),
    )
    assert parent.message_id.encode() in raw
    return multipart(
        [
            ("dkim", b"{@sendgrid.com : pass}"),
            ("email", raw),
            ("to", parent.from_email.encode()),
            ("from", b"Sender Name <example@example.com>"),
            ("subject", b"Hello"),
            ("SPF", b"pass"),
        ]
    )


def raw_reply(parent: EmailSent) -> bytes:
    return (
        "From: Ada Lovelace <ada@lovelace.example>\r\n"
        f"To: {parent.from_email}\r\n"
        "Subject: Re: Hello\r\n"
        "Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
        "Message-ID: <raw-reply-1@lovelace.example>\r\n"
        f"In-Reply-To: {parent.message_id}\r\n"
        f"References: {parent.message_id}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "Sounds good, let's talk on Tuesday.\r\n"
    ).encode()


def mailgun_route_form(signature: dict[str, str]) -> bytes:
    fields: dict[str, str] = dict(load("mailgun_route_fields.json"), **signature)
    return urlencode(fields).encode()


async def test_inbound_replies_and_oversized_bodies(tracker: Tracker) -> None:
    i = sent("example@example.com")
    j = sent("bob@example.com", message_id=ROUTE_PARENT)
    k = sent("ada@lovelace.example")
    await tracker.register(i, j, k, follow_up(i), follow_up(j), follow_up(k))
    http = tracker.http

    raw = raw_reply(k)
    for what, headers, status in (
        ("wrong token", {"Authorization": "Bearer guess", "Content-Type": "message/rfc822"}, 401),
        ("not a raw email", {"Authorization": f"Bearer {INBOUND_TOKEN}"}, 415),
    ):
        response = await http.post("/webhooks/inbound", content=raw, headers=headers)
        assert response.status_code == status, (what, response.text)
    direct = await http.post(
        "/webhooks/inbound",
        content=raw,
        headers={"Authorization": f"Bearer {INBOUND_TOKEN}", "Content-Type": "message/rfc822"},
    )
    assert direct.status_code == 202, direct.text

    body, content_type = sendgrid_parse_reply(i)
    for what, auth in (("missing", None), ("wrong", basic("parse", "guess"))):
        headers = {"Content-Type": content_type, **({"Authorization": auth} if auth else {})}
        response = await http.post("/webhooks/inbound/sendgrid", content=body, headers=headers)
        assert response.status_code == 401, (what, response.text)
    # Inbound Parse can only put credentials in the URL: basic auth, the token as password.
    parse = await http.post(
        "/webhooks/inbound/sendgrid",
        content=body,
        headers={"Content-Type": content_type, "Authorization": basic("parse", INBOUND_TOKEN)},
    )
    assert parse.status_code == 202, parse.text

    form = {"Content-Type": "application/x-www-form-urlencoded"}
    unsigned = await http.post(
        "/webhooks/inbound/mailgun",
        content=mailgun_route_form(mg_signature(key="key-not-ours")),
        headers=form,
    )
    assert unsigned.status_code == 401, unsigned.text
    route_body = mailgun_route_form(mg_signature())
    route = await http.post("/webhooks/inbound/mailgun", content=route_body, headers=form)
    assert route.status_code == 202, route.text
    replayed = await http.post("/webhooks/inbound/mailgun", content=route_body, headers=form)
    assert replayed.status_code == 403, replayed.text

    # Bodies over max_body_bytes: declared, or streamed without a length.
    big = b"[" + b" " * MAX_BODY + b"]"
    declared = await http.post("/webhooks/sendgrid", content=big, headers=sg_headers(big))
    assert declared.status_code == 413, declared.text

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * (MAX_BODY // 4)

    streamed = await http.post(
        "/webhooks/inbound",
        content=chunks(),
        headers={"Content-Type": "message/rfc822", "Authorization": f"Bearer {INBOUND_TOKEN}"},
    )
    assert streamed.status_code == 413, streamed.text
    assert await tracker.raw_written() == 3

    await tracker.processed(direct, parse, route)
    reply = await tracker.pool.fetch(
        "SELECT message_id, detail->>'reply_message_id' AS reply FROM engagement_events"
        " ORDER BY message_id"
    )
    assert {(r["message_id"], r["reply"]) for r in reply} == {
        (i.message_id, "<sg-parse-reply-1@mail.gmail.com>"),
        (j.message_id, "<CAN_P_JNa25--hzm5=-ES9cnxgWa+h+E49OOAS7sPpV0gsoXCOw@mail.gmail.com>"),
        (k.message_id, "<raw-reply-1@lovelace.example>"),
    }
    await tracker.assert_recorded(
        {
            row(i, "replied", None, source="inbound"),
            row(j, "replied", None, source="inbound"),
            row(k, "replied", None, source="inbound"),
        }
    )


# ------------------------------------------------------------------- configuration


async def test_providers_not_configured_answer_404() -> None:
    """A tracker with no provider credentials: every provider endpoint is absent. (The
    routes decide before touching the database or Kafka, so the app is not started.)"""
    settings = tracker_settings(
        "postgresql://unused@127.0.0.1:1/unused",
        "127.0.0.1:1",
        sendgrid_public_key=None,
        mailgun_signing_key=None,
        postmark_username=None,
        postmark_password=None,
        ses_topic_arns="",
        inbound_token=None,
    )
    service = TrackerService(settings)
    transport = httpx.ASGITransport(app=service.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tracker") as http:
        body = b"[]"
        for path, headers in (
            ("/webhooks/sendgrid", sg_headers(body)),
            ("/webhooks/mailgun", {}),
            ("/webhooks/postmark", {"Authorization": basic(PM_USER, PM_PASSWORD)}),
            ("/webhooks/ses", {}),
            ("/webhooks/inbound", {"Authorization": f"Bearer {INBOUND_TOKEN}"}),
            ("/webhooks/inbound/sendgrid", {"Authorization": f"Bearer {INBOUND_TOKEN}"}),
            ("/webhooks/inbound/mailgun", {}),
        ):
            response = await http.post(path, content=body, headers=headers)
            assert response.status_code == 404, (path, response.text)


# ----------------------------------------------------------------------- known bugs


async def test_sendgrid_event_attributed_by_sg_message_id(tracker: Tracker) -> None:
    """An event without our custom arg or an smtp-id (as SendGrid documents its open
    events) still names the message by sg_message_id, whose first part is the
    X-Message-Id the Mail Send API answered (SendGrid: filter the activity feed with
    ``msg_id LIKE '<X-Message-ID>%'``)."""
    first = sent("alex@example.com", provider_message_id="14c5d75ce93.dfd.64b469")
    await tracker.register(first, follow_up(first))
    opened = next(d for d in load("sendgrid_events.json") if d["event"] == "open")
    assert opened["sg_message_id"].startswith("14c5d75ce93.dfd.64b469.filter")
    assert "smtp-id" not in opened and "delivery_key" not in opened
    opened["timestamp"] = int(time.time())
    body = json.dumps([opened]).encode()
    response = await tracker.http.post("/webhooks/sendgrid", content=body, headers=sg_headers(body))
    assert response.status_code == 200, response.text
    await tracker.processed(response)
    recorded = await tracker.pool.fetch("SELECT message_id FROM engagement_events")
    assert len(recorded) == 1
    assert recorded[0]["message_id"] == first.message_id


# ------------------------------------------------------------------- shared helpers


MAIL_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mail"
#: The Message-ID the Office 365 delay notice fixture reports on.
O365_ORIGINAL = "<1f3a5c7e9b0d2f4a6c8e0a2c4e6a8c0e2a4c6e8a@acme.example.com>"
O365_REPORT_ID = "<c3a9e1f7-0b4d-4e2a-9c6f-8d2b5e1a3f70@DB9PR04MB5678.eurprd04.prod.outlook.com>"
SAFARI = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    " Version/17.1 Safari/605.1.15"
)
INBOUND = {"Authorization": f"Bearer {INBOUND_TOKEN}", "Content-Type": "message/rfc822"}


async def wait_for(pool: asyncpg.Pool, query: str, *args: Any, expected: int) -> None:
    """Wait until ``query`` (a count) reaches ``expected``."""
    value = None
    for _ in range(int(WAIT_SECONDS / 0.05)):
        value = await pool.fetchval(query, *args)
        if value == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{query!r} is {value}, not {expected}")


async def outbox_engagements(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT convert_from(payload, 'UTF8') AS payload FROM outbox"
        " WHERE event_type = 'EngagementReceived' ORDER BY id"
    )
    return [json.loads(r["payload"]) for r in rows]


async def sequence_report(tracker: Tracker, sequence: str = "cold_outreach") -> dict[str, Any]:
    response = await tracker.http.get(f"/analytics/sequences/{sequence}")
    assert response.status_code == 200, response.text
    report: dict[str, Any] = response.json()
    return report


async def daily_totals(tracker: Tracker, sequence: str = "cold_outreach") -> dict[str, int]:
    """The daily series summed over its days (a test may straddle midnight)."""
    response = await tracker.http.get(f"/analytics/sequences/{sequence}/daily?days=2")
    assert response.status_code == 200, response.text
    totals: dict[str, int] = {}
    for day in response.json()["days"]:
        for kind, n in day.items():
            if kind != "day":
                totals[kind] = totals.get(kind, 0) + n
    return totals


def o365_report(message: EmailSent, *, final: bool, report_id: str = O365_REPORT_ID) -> bytes:
    """Office 365's delay notice about ``message`` (as in the fixture), or the failure
    it sends once it gives up: same status code, its own report Message-ID."""
    raw = (MAIL_FIXTURES / "office365-delayed-4.4.7.eml").read_text()
    assert O365_ORIGINAL in raw and O365_REPORT_ID in raw
    raw = raw.replace(O365_ORIGINAL, message.message_id).replace(O365_REPORT_ID, report_id)
    if final:
        raw = raw.replace("Action: delayed", "Action: failed").replace(
            "Subject: Delivery delayed:", "Subject: Undeliverable:"
        )
    return raw.encode()


# ------------------------------------------------------------ delays are not bounces


async def test_delay_notices_are_kept_and_never_bounce(tracker: Tracker) -> None:
    """A DSN ``Action: delayed`` and the providers' deferrals (SendGrid ``deferred``,
    Mailgun ``failed``/``temporary``, Postmark ``Transient``) are kept as ``delayed``
    and emit nothing (the sender would send it again: a double delivery); the final
    failure that follows the delay notice, with the same status code, is a bounce."""
    dsn, grid, gun, mark = (
        sent("sofia.rossi@example.com"),
        sent("alex@example.com"),
        sent("tempfailrecipient@sample.mailgun.com"),
        sent("margareth@nasa.com"),
    )
    await tracker.register(dsn, grid, gun, mark)
    http = tracker.http

    delay = await http.post(
        "/webhooks/inbound", content=o365_report(dsn, final=False), headers=INBOUND
    )
    again = await http.post(
        "/webhooks/inbound", content=o365_report(dsn, final=False), headers=INBOUND
    )
    deferred = next(d for d in load("sendgrid_events.json") if d["event"] == "deferred")
    deferred.update(email=grid.to_email, delivery_key=grid.delivery_key, timestamp=int(time.time()))
    grid_body = json.dumps([deferred]).encode()
    grid_response = await http.post(
        "/webhooks/sendgrid", content=grid_body, headers=sg_headers(grid_body)
    )
    gun_response = await http.post(
        "/webhooks/mailgun",
        content=mailgun_body(
            "failed_temporary",
            mg_signature(),
            timestamp=time.time(),
            **{"user-variables": {"delivery_key": gun.delivery_key}},
        ),
    )
    mark_response = await http.post(
        "/webhooks/postmark",
        content=postmark_body("Bounce", mark, datetime.now(UTC), Type="Transient", TypeCode=2),
        headers={"Authorization": basic(PM_USER, PM_PASSWORD)},
    )
    responses = [delay, again, grid_response, gun_response, mark_response]
    assert [r.status_code for r in responses] == [202, 202, 200, 200, 200]
    await tracker.processed(*responses)

    rows = await tracker.pool.fetch(
        "SELECT message_id, type, source, machine FROM engagement_events ORDER BY source"
    )
    assert {tuple(r.values()) for r in rows} == {
        (dsn.message_id, "delayed", "inbound", False),
        (grid.message_id, "delayed", "sendgrid", False),
        (gun.message_id, "delayed", "mailgun", False),
        (mark.message_id, "delayed", "postmark", False),
    }
    assert len(rows) == 4  # the delay notice delivered twice is kept once
    detail = await tracker.pool.fetchval(
        "SELECT detail FROM engagement_events WHERE message_id = $1", dsn.message_id
    )
    assert (detail["status"], detail["action"]) == ("4.4.7", "delayed")
    assert await outbox_engagements(tracker.pool) == []

    # Office 365 gives up: same message, same 4.4.7, another report. A bounce (soft).
    final = await http.post(
        "/webhooks/inbound",
        content=o365_report(dsn, final=True, report_id="<ndr-final-1@outlook.example>"),
        headers=INBOUND,
    )
    assert final.status_code == 202, final.text
    await tracker.processed(final)
    (bounce,) = await outbox_engagements(tracker.pool)
    assert (bounce["engagement_type"], bounce["bounce_type"], bounce["message_id"]) == (
        "bounced",
        "soft",
        dsn.message_id,
    )
    assert bounce["detail"]["status"] == "4.4.7" and bounce["detail"]["action"] == "failed"

    totals = (await sequence_report(tracker))["totals"]
    assert (totals["sent"], totals["delayed"], totals["bounced"], totals["hard_bounced"]) == (
        4,
        4,
        1,
        0,
    )


# ------------------------------------------------------ synchronous rejections


def rejection(
    of: EmailSent,
    *,
    delivery_key: str,
    to_email: str,
    bounce_type: BounceType | None,
    status: str | None,
    reason: str,
    failure: FailureKind = FailureKind.PERMANENT,
) -> EmailFailed:
    """The sender's EmailFailed for a delivery of ``of``'s step (same sequence and step)."""
    return EmailFailed(
        lead_id=uuid.uuid4(),
        enrollment_id=uuid.uuid4(),
        sequence_id=of.sequence_id,
        step_id=of.step_id,
        step_index=of.step_index,
        delivery_key=delivery_key,
        to_email=to_email,
        failure=failure,
        reason=reason,
        smtp_code=int(reason[:3]) if reason[:3].isdigit() else None,
        enhanced_status=status,
        bounce_type=bounce_type,
    )


async def test_a_hard_rejection_is_a_hard_bounce_and_counts_in_analytics(
    tracker: Tracker,
) -> None:
    accepted = sent("ok@example.com")
    # A soft-bounced message the sender tried again: the retry was refused outright.
    retried = follow_up(accepted).model_copy(
        update={"step_id": accepted.step_id, "step_index": 0, "to_email": "moved@example.com"}
    )
    await tracker.register(accepted, retried)
    hard = rejection(
        accepted,
        delivery_key="dk-hard-1",
        to_email="Gone@Example.com",
        bounce_type=BounceType.HARD,
        status="5.1.1",
        reason="550 5.1.1 <gone@example.com>: Recipient address rejected: User unknown",
    )
    policy = rejection(
        accepted,
        delivery_key="dk-policy-1",
        to_email="blocked@example.com",
        bounce_type=BounceType.POLICY,
        status="5.7.1",
        reason="554 5.7.1 Service unavailable; Client host blocked using zen.spamhaus.org",
    )
    retry_refused = rejection(
        accepted,
        delivery_key=retried.delivery_key,
        to_email=retried.to_email,
        bounce_type=BounceType.HARD,
        status="5.1.6",
        reason="551 5.1.6 Recipient has moved",
    )
    cancelled = rejection(
        accepted,
        delivery_key="dk-cancelled-1",
        to_email="later@example.com",
        bounce_type=None,
        status=None,
        reason="lead replied",
        failure=FailureKind.CANCELLED,
    )
    # The sender's outbox may publish the same failure twice (another event id).
    duplicate = hard.model_copy(update={"event_id": uuid.uuid4()})
    outcomes = [hard, policy, retry_refused, cancelled, duplicate]
    for event in outcomes:
        await tracker.producer.send_and_wait(
            topics.EMAIL_SENT, event.to_bytes(), key=event.kafka_key()
        )
    await wait_for(
        tracker.pool,
        "SELECT count(*) FROM inbox WHERE event_id = ANY($1::uuid[])",
        [e.event_id for e in outcomes],
        expected=len(outcomes),
    )

    rows = await tracker.pool.fetch(
        "SELECT delivery_key, bounce_type, enhanced_status, smtp_code FROM rejections"
    )
    assert {tuple(r.values()) for r in rows} == {
        ("dk-hard-1", "hard", "5.1.1", 550),
        ("dk-policy-1", "policy", "5.7.1", 554),
        (retried.delivery_key, "hard", "5.1.6", 551),
    }
    emitted = await outbox_engagements(tracker.pool)
    assert len(emitted) == 2  # the hard ones, once each: policy and cancelled emit nothing
    by_key = {e["delivery_key"]: e for e in emitted}
    first = by_key["dk-hard-1"]
    assert {
        k: first[k]
        for k in (
            "engagement_type",
            "bounce_type",
            "source",
            "lead_id",
            "enrollment_id",
            "sequence_id",
            "step_id",
            "step_index",
            "email",
            "message_id",
        )
    } == {
        "engagement_type": "bounced",
        "bounce_type": "hard",
        "source": "smtp",
        "lead_id": str(hard.lead_id),
        "enrollment_id": str(hard.enrollment_id),
        "sequence_id": str(hard.sequence_id),
        "step_id": str(hard.step_id),
        "step_index": 0,
        "email": "gone@example.com",
        "message_id": None,  # never accepted, so never given a registered Message-ID
    }
    assert first["detail"]["status"] == "5.1.1" and first["detail"]["smtp_code"] == 550
    assert EngagementReceived.model_validate(first).suppresses_address
    # The refused retry is about a registered message: it says which.
    assert by_key[retried.delivery_key]["message_id"] == retried.message_id
    assert by_key[retried.delivery_key]["sequence_key"] == "cold_outreach"

    (step,) = (await sequence_report(tracker))["steps"]
    counts = step["counts"]
    # Sent: two accepted, two refused outright (the refused retry is one of the accepted).
    assert (
        counts["sent"],
        counts["bounced"],
        counts["hard_bounced"],
        counts["rejected"],
    ) == (4, 3, 2, 3)
    assert step["rates"]["bounce_rate"] == 0.75
    daily = await daily_totals(tracker)
    assert (daily["sent"], daily["bounced"]) == (4, 3)


# --------------------------------------------------------------- Mailgun tokens


async def test_a_mailgun_token_survives_a_failed_publish(
    tracker: Tracker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kafka refuses the write: the request fails (5xx) and Mailgun retries it with the
    same token, which must then be accepted (once), not refused as a replay."""
    from aiokafka.errors import KafkaTimeoutError

    from services.tracker import app as tracker_app

    c = sent("recipient@sample.mailgun.com")
    j = sent("bob@example.com", message_id=ROUTE_PARENT)
    await tracker.register(c, j)
    event_body = mailgun_body(
        "opened",
        mg_signature(),
        timestamp=time.time(),
        **{"user-variables": {"delivery_key": c.delivery_key}},
    )
    route_body = mailgun_route_form(mg_signature())
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    working = tracker_app.publish_all

    async def kafka_down(*args: Any, **kwargs: Any) -> None:
        raise KafkaTimeoutError()

    monkeypatch.setattr(tracker_app, "publish_all", kafka_down)
    lost = await tracker.http.post("/webhooks/mailgun", content=event_body)
    lost_route = await tracker.http.post(
        "/webhooks/inbound/mailgun", content=route_body, headers=form
    )
    assert (lost.status_code, lost_route.status_code) == (500, 500)
    assert await tracker.raw_written() == 0
    assert await tracker.pool.fetchval("SELECT count(*) FROM webhook_tokens") == 0

    monkeypatch.setattr(tracker_app, "publish_all", working)
    retry = await tracker.http.post("/webhooks/mailgun", content=event_body)
    retry_route = await tracker.http.post(
        "/webhooks/inbound/mailgun", content=route_body, headers=form
    )
    assert (retry.status_code, retry_route.status_code) == (200, 202), (
        retry.text,
        retry_route.text,
    )
    replay = await tracker.http.post("/webhooks/mailgun", content=event_body)
    replay_route = await tracker.http.post(
        "/webhooks/inbound/mailgun", content=route_body, headers=form
    )
    assert (replay.status_code, replay_route.status_code) == (403, 403)
    await tracker.processed(retry, retry_route)
    rows = await tracker.pool.fetch("SELECT message_id, type FROM engagement_events")
    assert {tuple(r.values()) for r in rows} == {
        (c.message_id, "opened"),
        (j.message_id, "replied"),
    }


# ------------------------------------------------------------ replies by address


def reply_to(
    sender: str, *, to: str, references: str | None, message_id: str, text: str = "Thanks!"
) -> bytes:
    thread = f"In-Reply-To: {references}\r\nReferences: {references}\r\n" if references else ""
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: Re: Hello\r\n"
        f"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMessage-ID: {message_id}\r\n{thread}"
        f"Content-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n"
    ).encode()


async def test_replies_matching_no_thread_fall_back_to_the_sender_address(
    tracker: Tracker,
) -> None:
    ada = sent("ada@lovelace.example")
    # Two tenants wrote to Bob: acme from ann@acme.example, globex (later) from hank@.
    bob_acme = sent("bob@example.net").model_copy(update={"tenant_id": "acme"})
    bob_globex = follow_up(sent("bob@example.net")).model_copy(
        update={"tenant_id": "globex", "from_email": "hank@globex.example"}
    )
    await tracker.register(ada, bob_acme, bob_globex)
    unknown = "<3f2a9c@mail.elsewhere.example>"  # a thread we never took part in
    replies = {
        # References we do not know (a forwarded thread, a mail client's new thread).
        "ada": reply_to(
            "Ada <ada@lovelace.example>",
            to=ada.from_email,
            references=unknown,
            message_id="<r-ada@lovelace.example>",
        ),
        # Sent to acme's mailbox: acme's message, although globex wrote later.
        "bob-acme": reply_to(
            "bob@example.net",
            to="Ann <ANN@acme.example>",
            references=unknown,
            message_id="<r-bob-1@example.net>",
        ),
        # Sent to neither tenant's mailbox: cannot tell which; kept waiting.
        "bob-unclear": reply_to(
            "bob@example.net",
            to="replies@inbound.example",
            references="<also-unknown@example.net>",
            message_id="<r-bob-2@example.net>",
        ),
        # Nobody we wrote to, answering a message not registered yet.
        "early": reply_to(
            "carol@example.org",
            to="ann@acme.example",
            references="<registered-later@acme.example>",
            message_id="<r-carol@example.org>",
        ),
    }
    responses = [
        await tracker.http.post("/webhooks/inbound", content=raw, headers=INBOUND)
        for raw in replies.values()
    ]
    assert [r.status_code for r in responses] == [202] * 4
    await tracker.processed(*responses)
    rows = await tracker.pool.fetch(
        "SELECT message_id, type, detail->>'matched_by' AS matched_by,"
        " detail->>'reply_message_id' AS reply FROM engagement_events"
    )
    assert {tuple(r.values()) for r in rows} == {
        (ada.message_id, "replied", "address", "<r-ada@lovelace.example>"),
        (bob_acme.message_id, "replied", "address", "<r-bob-1@example.net>"),
    }
    parked = await tracker.pool.fetch("SELECT reply_key FROM parked_replies ORDER BY reply_key")
    assert [r["reply_key"] for r in parked] == ["<r-bob-2@example.net>", "<r-carol@example.org>"]

    # The message Carol answered is registered: her parked reply is attributed to it.
    late = sent("carol@example.org", message_id="<registered-later@acme.example>")
    await tracker.register(late)
    await wait_for(
        tracker.pool,
        "SELECT count(*) FROM engagement_events WHERE message_id = $1 AND type = 'replied'",
        late.message_id,
        expected=1,
    )
    # Bob's unclear reply expires into the unattributed records, text and all.
    async with tracker.pool.acquire() as conn:
        assert await repo.expire_parked_replies(conn, datetime.now(UTC) - PARKED_REPLY_TTL) == 0
        expired = await repo.expire_parked_replies(
            conn, datetime.now(UTC) + PARKED_REPLY_TTL + timedelta(minutes=1)
        )
    assert expired == 1
    assert await tracker.pool.fetchval("SELECT count(*) FROM parked_replies") == 0
    gone = await tracker.pool.fetchrow(
        "SELECT provider, kind, email, detail FROM unattributed WHERE kind = 'reply'"
    )
    assert (gone["provider"], gone["kind"], gone["email"]) == (
        "inbound",
        "reply",
        "bob@example.net",
    )
    assert gone["detail"]["reply_key"] == "<r-bob-2@example.net>"
    assert gone["detail"]["referenced"] == ["<also-unknown@example.net>"]
    assert "Thanks!" in gone["detail"]["body"]


# ------------------------------------------------------------- scanner clicks


def click_url(tracker: Tracker, message: EmailSent, link: int) -> str:
    return "/t/c/" + tokens.sign(
        tracker.service.secret, tokens.TokenClaims("click", message.message_id, link)
    )


async def clicks(tracker: Tracker, message: EmailSent) -> list[tuple[str, bool]]:
    rows = await tracker.pool.fetch(
        "SELECT detail->>'url' AS url, machine FROM engagement_events"
        " WHERE message_id = $1 AND type = 'clicked' ORDER BY occurred_at, url",
        message.message_id,
    )
    return [(r["url"], r["machine"]) for r in rows]


LINKS = ["https://acme.example/a", "https://acme.example/b", "https://acme.example/c"]


async def test_scanner_bursts_are_machine_from_the_first_click(tracker: Tracker) -> None:
    person, walker, parallel = (
        sent(address).model_copy(update={"links": LINKS})
        for address in ("p@example.org", "w@example.org", "s@example.org")
    )
    await tracker.register(person, walker, parallel)
    browser = {"User-Agent": SAFARI}

    # A person clicking the same link twice (a double click, a second look): not a burst.
    for _ in range(2):
        response = await tracker.http.get(click_url(tracker, person, 0), headers=browser)
        assert response.status_code == 302 and response.headers["location"] == LINKS[0]
    assert await clicks(tracker, person) == [(LINKS[0], False)]

    # A scanner with a browser's agent walks the links one after the other: the first
    # click looked human until the second showed the burst; all three are machine.
    for link in range(3):
        response = await tracker.http.get(click_url(tracker, walker, link), headers=browser)
        assert response.status_code == 302
    assert await clicks(tracker, walker) == [(url, True) for url in LINKS]
    reasons = await tracker.pool.fetch(
        "SELECT detail->>'machine_reason' AS reason, detail ? 'reflagged' AS reflagged"
        " FROM engagement_events WHERE message_id = $1 ORDER BY occurred_at",
        walker.message_id,
    )
    assert [(r["reason"], r["reflagged"]) for r in reasons] == [
        ("several links clicked at once", True),
        ("several links clicked at once", False),
        ("several links clicked at once", False),
    ]

    # ... or fires them all at once: each sees the others.
    responses = await asyncio.gather(
        *(
            tracker.http.get(click_url(tracker, parallel, link), headers=browser)
            for link in range(3)
        )
    )
    assert [r.status_code for r in responses] == [302] * 3
    assert sorted(await clicks(tracker, parallel)) == [(url, True) for url in LINKS]

    # The same through a provider's click events (one batch, the same second).
    provider_clicked = sent("g@example.org")
    await tracker.register(provider_clicked)
    documented = next(d for d in load("sendgrid_events.json") if d["event"] == "click")
    now = int(time.time())
    batch = [
        dict(
            documented,
            email=provider_clicked.to_email,
            delivery_key=provider_clicked.delivery_key,
            timestamp=now,
            url=url,
            useragent=SAFARI,
            sg_event_id=f"click-{n}",
        )
        for n, url in enumerate(LINKS[:2])
    ]
    body = json.dumps(batch).encode()
    response = await tracker.http.post("/webhooks/sendgrid", content=body, headers=sg_headers(body))
    assert response.status_code == 200, response.text
    await tracker.processed(response)
    assert sorted(await clicks(tracker, provider_clicked)) == [(url, True) for url in LINKS[:2]]

    (step,) = (await sequence_report(tracker))["steps"]
    assert (step["counts"]["clicked"], step["counts"]["machine_clicked"]) == (1, 3)


# ------------------------------------------------------------------ click redirect


async def test_a_click_redirects_to_the_emails_own_link_only(tracker: Tracker) -> None:
    """`GET /t/c/{token}` answers 302 to the link the email carried, and nothing else:
    the target comes from the registered message, never from the request; a forged or
    altered token, a link index the email does not have, a token of another kind or
    for an unknown message get 404 and record nothing."""
    message = sent("ada@example.com").model_copy(update={"links": LINKS[:2]})
    await tracker.register(message)
    browser = {"User-Agent": SAFARI}

    for link in (0, 1):
        response = await tracker.http.get(click_url(tracker, message, link), headers=browser)
        assert response.status_code == 302
        assert response.headers["location"] == LINKS[link]
    # Whatever the request adds, the redirect goes to the email's link.
    hijack = await tracker.http.get(
        click_url(tracker, message, 0) + "?url=https://evil.example/&next=https://evil.example/",
        headers=browser,
    )
    assert hijack.status_code == 302 and hijack.headers["location"] == LINKS[0]
    recorded = await clicks(tracker, message)
    assert sorted({url for url, _ in recorded}) == LINKS[:2]

    genuine = click_url(tracker, message, 0).removeprefix("/t/c/")
    payload, signature = genuine.split(".")
    altered = ("B" if signature[0] == "A" else "A") + signature[1:]
    tampered = payload[:-2] + ("y" if payload[-2] == "x" else "x") + payload[-1]
    other_secret = tokens.sign(
        b"another-deployment", tokens.TokenClaims("click", message.message_id, 0)
    )
    refused = {
        "altered signature": f"{payload}.{altered}",
        "altered claims": f"{tampered}.{signature}",
        "no signature": payload,
        "another secret": other_secret,
        "link not in the email": click_url(tracker, message, 2).removeprefix("/t/c/"),
        "negative link": click_url(tracker, message, -1).removeprefix("/t/c/"),
        "no link at all": tokens.sign(
            tracker.service.secret, tokens.TokenClaims("click", message.message_id)
        ),
        "an open token": pixel_url(tracker, message).removeprefix("/t/o/"),
        "an unknown message": tokens.sign(
            tracker.service.secret, tokens.TokenClaims("click", "<nobody@acme.example>", 0)
        ),
        "garbage": "not-a-token",
    }
    for what, token in refused.items():
        response = await tracker.http.get(f"/t/c/{token}", headers=browser)
        assert response.status_code == 404, what
        assert "location" not in response.headers, what
    assert await clicks(tracker, message) == recorded  # nothing more recorded


# ------------------------------------------------------------------- analytics


def pixel_url(tracker: Tracker, message: EmailSent) -> str:
    return "/t/o/" + tokens.sign(
        tracker.service.secret, tokens.TokenClaims("open", message.message_id)
    )


async def test_analytics_rates_on_a_known_dataset(tracker: Tracker) -> None:
    """Step 0 of cold_outreach: four messages (variants a and b); step 1: two. Opens by
    people and by Apple's privacy proxy, clicks by people and by a link checker, replies.
    Another sequence's engagement must not leak in."""
    base = sent("m1@example.org")
    step0 = [
        base.model_copy(update={"variant": "a", "links": LINKS}),
        *(
            follow_up(base).model_copy(
                update={
                    "step_id": base.step_id,
                    "step_index": 0,
                    "variant": variant,
                    "to_email": address,
                    "links": LINKS,
                }
            )
            for variant, address in (
                ("a", "m2@example.org"),
                ("b", "m3@example.org"),
                ("b", "m4@example.org"),
            )
        ),
    ]
    step1 = [follow_up(m).model_copy(update={"step_index": 1, "links": LINKS}) for m in step0[:2]]
    other = sent("m1@example.org").model_copy(update={"sequence_key": "nurture", "links": LINKS})
    await tracker.register(*step0, *step1, other)
    m1, m2, m3, _unopened = step0
    apple = {"User-Agent": "Mozilla/5.0"}  # Mail Privacy Protection's bare agent
    browser = {"User-Agent": SAFARI}
    for message, headers in (
        (m1, apple),
        (m1, browser),  # a person too: m1 counts as opened by a person
        (m2, browser),
        (m3, apple),  # only the proxy: a machine open
        (step1[0], browser),
        (other, browser),
    ):
        response = await tracker.http.get(pixel_url(tracker, message), headers=headers)
        assert response.status_code == 200 and response.headers["content-type"] == "image/gif"
    for message, method in ((m1, "GET"), (m3, "HEAD"), (other, "GET")):
        response = await tracker.http.request(
            method, click_url(tracker, message, 1), headers=browser
        )
        assert response.status_code == 302
    replies = [
        await tracker.http.post(
            "/webhooks/inbound",
            content=reply_to(
                message.to_email,
                to=message.from_email,
                references=message.message_id,
                message_id=f"<reply-{n}@example.org>",
                text="Sounds good, let's talk.",
            ),
            headers=INBOUND,
        )
        for n, message in enumerate((m2, step1[1], other))
    ]
    await tracker.processed(*replies)

    report = await sequence_report(tracker)
    assert report["totals"]["sent"] == 6
    first, second = report["steps"]
    assert {k: first["counts"][k] for k in ("sent", "opened", "machine_opened")} == {
        "sent": 4,
        "opened": 2,  # m1, m2
        "machine_opened": 1,  # m3 (m1's proxy fetch is not counted: a person opened it)
    }
    assert {k: first["counts"][k] for k in ("clicked", "machine_clicked", "replied")} == {
        "clicked": 1,  # m1
        "machine_clicked": 1,  # m3's HEAD
        "replied": 1,  # m2
    }
    assert first["rates"]["open_rate"] == 0.5  # 2 of 4 sent
    assert first["rates"]["click_rate"] == 0.5  # 1 of 2 opens
    assert first["rates"]["reply_rate"] == 0.25  # 1 of 4 sent
    variants = {v["variant"]: v for v in first["variants"]}
    assert variants["a"]["rates"]["open_rate"] == 1.0 and variants["b"]["rates"]["open_rate"] == 0
    assert variants["a"]["counts"]["replied"] == 1
    assert (second["counts"]["sent"], second["counts"]["opened"], second["counts"]["replied"]) == (
        2,
        1,
        1,
    )
    assert second["rates"]["open_rate"] == 0.5 and second["rates"]["reply_rate"] == 0.5
    totals = report["totals"]
    assert (totals["opened"], totals["machine_opened"], totals["replied"]) == (3, 1, 2)
    assert report["rates"]["open_rate"] == 0.5  # 3 of 6
    assert report["rates"]["reply_rate"] == round(2 / 6, 4)
    assert report["rates"]["click_rate"] == round(1 / 3, 4)

    daily = await daily_totals(tracker)
    assert {k: daily.get(k) for k in ("sent", "opened", "clicked", "replied")} == {
        "sent": 6,
        "opened": 3,  # people only
        "clicked": 1,
        "replied": 2,
    }
    csv_rows = (await tracker.http.get("/analytics/sequences/cold_outreach/export.csv")).text
    header, *lines = csv_rows.strip().splitlines()
    assert "machine_clicked" in header.split(",") and len(lines) == 3


async def test_a_bounce_ahead_of_its_message_waits_for_it(tracker: Tracker) -> None:
    """A DSN can beat the EmailSent of the message it reports (a fast bounce, or the
    tracker catching up after a restart): it is parked, applied when the message is
    registered, and a bounce of a message never registered expires as a bounce."""
    early = sent("sofia.rossi@example.com")
    response = await tracker.http.post(
        "/webhooks/inbound", content=o365_report(early, final=True), headers=INBOUND
    )
    assert response.status_code == 202
    await tracker.processed(response)
    parked = await tracker.pool.fetch("SELECT kind, referenced FROM parked_replies")
    assert [(r["kind"], r["referenced"]) for r in parked] == [("bounce", [early.message_id])]
    assert await tracker.pool.fetchval("SELECT count(*) FROM engagement_events") == 0

    await tracker.register(early)
    await wait_for(
        tracker.pool,
        "SELECT count(*) FROM engagement_events WHERE message_id = $1 AND type = 'bounced'",
        early.message_id,
        expected=1,
    )
    assert await tracker.pool.fetchval("SELECT count(*) FROM parked_replies") == 0

    # A bounce about someone we never wrote to (no address to fall back on either).
    never = sent("nobody@example.com")
    report = o365_report(never, final=True, report_id="<other-report@example.com>")
    response = await tracker.http.post(
        "/webhooks/inbound",
        content=report.replace(early.to_email.encode(), never.to_email.encode()),
        headers=INBOUND,
    )
    await tracker.processed(response)
    async with tracker.pool.acquire() as conn:
        expired = await repo.expire_parked_replies(
            conn, datetime.now(UTC) + PARKED_REPLY_TTL + timedelta(minutes=1)
        )
    assert expired == 1
    gone = await tracker.pool.fetchrow("SELECT kind, detail FROM unattributed")
    assert gone["kind"] == "bounce"
    assert gone["detail"]["referenced"] == [never.message_id]


async def test_a_provider_event_ahead_of_its_message_waits_for_it(tracker: Tracker) -> None:
    """SendGrid may report a delivery before the tracker has registered the message
    (its EmailSent still on its way, or the tracker catching up): the event names our
    delivery key, so it waits and is applied once the message is registered."""
    early = sent("alex@example.com")
    docs = load("sendgrid_events.json")
    delivered = copy.deepcopy(next(d for d in docs if d["event"] == "delivered"))
    delivered.update(
        email=early.to_email, delivery_key=early.delivery_key, timestamp=int(time.time())
    )
    body = json.dumps([delivered]).encode()
    response = await tracker.http.post("/webhooks/sendgrid", content=body, headers=sg_headers(body))
    assert response.status_code == 200, response.text
    await tracker.processed(response)
    assert await tracker.pool.fetchval("SELECT count(*) FROM engagement_events") == 0
    assert await tracker.pool.fetchval("SELECT count(*) FROM unattributed") == 0
    assert (
        await tracker.pool.fetchval("SELECT delivery_key FROM parked_events") == early.delivery_key
    )

    await tracker.register(early)
    await wait_for(
        tracker.pool,
        "SELECT count(*) FROM engagement_events WHERE message_id = $1 AND type = 'delivered'",
        early.message_id,
        expected=1,
    )
    assert await tracker.pool.fetchval("SELECT count(*) FROM parked_events") == 0
    # One that no message ever claims expires into the unattributed records.
    never = sent("nobody@example.com")
    delivered.update(email=never.to_email, delivery_key=never.delivery_key, sg_event_id="x-1")
    body = json.dumps([delivered]).encode()
    response = await tracker.http.post("/webhooks/sendgrid", content=body, headers=sg_headers(body))
    await tracker.processed(response)
    async with tracker.pool.acquire() as conn:
        expired = await repo.expire_parked_events(
            conn, datetime.now(UTC) + PARKED_REPLY_TTL + timedelta(minutes=1)
        )
    assert expired == 1
    gone = await tracker.pool.fetchrow("SELECT provider, kind, email, detail FROM unattributed")
    assert (gone["provider"], gone["kind"], gone["email"]) == (
        "sendgrid",
        "delivered",
        never.to_email,
    )
    assert gone["detail"]["delivery_key"] == never.delivery_key


async def test_a_reply_arriving_as_its_message_registers_is_not_left_parked(
    tracker: Tracker,
) -> None:
    """The reply's lookup runs while the message's registration is in flight (not
    committed): without the park lock it parks after the registration took what was
    parked, and waits there until it expires."""
    message = sent("ines.moreau@example.com")
    now = datetime.now(UTC)
    registering = await tracker.pool.acquire()
    replying = await tracker.pool.acquire()
    try:
        registration = registering.transaction()
        await registration.start()
        await handlers._register_sent(registering, [message], now)

        async def reply() -> None:
            async with replying.transaction():
                await handlers.process_inbound(replying, raw_reply(message), received_at=now)

        answering = asyncio.create_task(reply())
        await asyncio.sleep(0.5)
        assert not answering.done()  # it waits for the registration to commit
        await registration.commit()
        await asyncio.wait_for(answering, 10)
    finally:
        await tracker.pool.release(registering)
        await tracker.pool.release(replying)
    assert await tracker.pool.fetchval("SELECT count(*) FROM parked_replies") == 0
    assert (
        await tracker.pool.fetchval(
            "SELECT count(*) FROM engagement_events WHERE message_id = $1 AND type = 'replied'",
            message.message_id,
        )
        == 1
    )
