"""The HTTP email-provider transports (services/sender/providers.py) against local
servers that follow each provider's documented contract (tests/providers.py)."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime

import httpx
import pytest

from schemas.events import BounceType
from services.runtime.devstack import free_port
from services.sender.mime import (
    BuiltMessage,
    DkimKey,
    OutgoingEmail,
    TrackingConfig,
    build_message,
)
from services.sender.providers import (
    MailgunTransport,
    PostmarkTransport,
    ProviderPermanentError,
    ProviderTransientError,
    SendGridTransport,
    parse_retry_after,
)
from services.sender.transport import (
    HandOffRefused,
    HandOffUncertain,
    PermanentSendError,
    TransientSendError,
)
from tests.providers import (
    CARRIED_HEADERS,
    PROVIDERS,
    SENDGRID_CONTENT_ORDER,
    ContractServer,
    provider_server,
)

pytestmark = pytest.mark.integration

NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CONFIG = TrackingConfig(
    base_url="https://track.example.net",
    secret=b"provider-test-secret",
    unsubscribe_mailto="unsubscribe@example.com",
)
FOLLOW_UP = OutgoingEmail(
    delivery_key="enr-7:1",
    from_email="sales@example.com",
    from_name="Sam Sales",
    to_email="ada@example.org",
    to_name="Ada Lovelace",
    subject="Quick follow-up",
    text="Hi Ada,\n\nFollowing up on https://acme.example/pricing.\n\nBest,\nSam\n",
    html=None,
    thread_delivery_key="enr-7:0",
    tracking=True,
)
SUCCESS_CODE = {"sendgrid": 202, "mailgun": 200, "postmark": 200}

Transport = SendGridTransport | MailgunTransport | PostmarkTransport


def build(dkim_key: DkimKey | None = None, **changes: object) -> BuiltMessage:
    email = dataclasses.replace(FOLLOW_UP, **changes)  # type: ignore[arg-type]
    return build_message(email, CONFIG, NOW, dkim_key)


@pytest.fixture(params=PROVIDERS)
async def server(request: pytest.FixtureRequest) -> AsyncIterator[ContractServer]:
    async with provider_server(request.param) as running:
        yield running


@pytest.fixture
async def transport(server: ContractServer) -> AsyncIterator[Transport]:
    client = server.transport()
    try:
        yield client
    finally:
        await client.close()


# ------------------------------------------------------------------ accepted


async def test_message_is_accepted_with_the_provider_id(
    server: ContractServer, transport: Transport
) -> None:
    message = build()
    accepted = await transport.send(message)

    assert len(server.received) == 1
    got = server.received[0]
    assert accepted.code == SUCCESS_CODE[server.provider]
    assert accepted.provider_message_id == got.provider_message_id
    assert transport.name == server.provider
    assert got.credential == server.api_key
    assert (got.from_email, got.from_name) == ("sales@example.com", "Sam Sales")
    assert (got.to_email, got.to_name) == ("ada@example.org", "Ada Lovelace")
    assert got.subject == "Quick follow-up"
    assert got.text == message.text
    assert got.html == message.html
    assert message.html is not None and "/t/o/" in message.html  # our own tracking pixel
    for name in CARRIED_HEADERS:
        assert got.headers[name] == message.headers[name], name
    assert got.headers["In-Reply-To"] != got.headers["Message-ID"]
    assert got.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got.metadata["delivery_key"] == "enr-7:1"
    assert server.rejections == []


async def test_names_with_punctuation_and_non_ascii_survive(
    server: ContractServer, transport: Transport
) -> None:
    message = build(from_name="Zoë O'Brien, Sales", to_name='Ada "Countess" Lovelace')
    await transport.send(message)
    got = server.received[0]
    assert got.from_name == "Zoë O'Brien, Sales"
    assert got.to_name == 'Ada "Countess" Lovelace'
    assert got.to_email == "ada@example.org"


async def test_connection_is_reused(server: ContractServer, transport: Transport) -> None:
    for index in range(3):
        await transport.send(build(delivery_key=f"enr-7:{index + 1}"))
    assert [m.metadata["delivery_key"] for m in server.received] == [
        "enr-7:1",
        "enr-7:2",
        "enr-7:3",
    ]
    assert len({m.provider_message_id for m in server.received}) == 3


async def test_sendgrid_request_follows_the_v3_contract() -> None:
    async with provider_server("sendgrid") as server:
        transport = server.transport()
        try:
            accepted = await transport.send(build())
        finally:
            await transport.close()
    body = server.received[0].body
    assert accepted.provider_message_id == server.received[0].provider_message_id
    assert [c["type"] for c in body["content"]] == ["text/plain", "text/html"]
    assert body["personalizations"] == [
        {
            "to": [{"email": "ada@example.org", "name": "Ada Lovelace"}],
            "custom_args": {"delivery_key": "enr-7:1"},
        }
    ]
    assert body["from"] == {"email": "sales@example.com", "name": "Sam Sales"}
    assert set(body["headers"]) == set(CARRIED_HEADERS)
    assert body["tracking_settings"]["click_tracking"]["enable"] is False
    assert body["tracking_settings"]["open_tracking"]["enable"] is False


async def test_sendgrid_text_only_message_has_one_content_part() -> None:
    async with provider_server("sendgrid") as server:
        transport = server.transport()
        try:
            await transport.send(build(tracking=False))
        finally:
            await transport.close()
    got = server.received[0]
    assert [c["type"] for c in got.body["content"]] == ["text/plain"]
    assert got.html is None


def _dkim_key() -> DkimKey:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    pem = subprocess.run(
        [openssl, "genrsa", "-traditional", "1024"], check=True, capture_output=True, timeout=30
    ).stdout
    return DkimKey("example.com", "ts1", pem)


async def test_mailgun_sends_our_own_mime_unchanged() -> None:
    message = build(_dkim_key())
    assert message.data.startswith(b"DKIM-Signature:")
    async with provider_server("mailgun") as server:
        transport = server.transport()
        try:
            accepted = await transport.send(message)
        finally:
            await transport.close()
    got = server.received[0]
    assert got.raw == message.data  # our MIME, Message-ID and DKIM signature, byte for byte
    assert got.envelope_to == ["ada@example.org"]
    assert got.body["v:delivery_key"] == "enr-7:1"
    assert got.body["o:tracking"] == "no"
    assert accepted.response == "Queued. Thank you."
    assert accepted.provider_message_id is not None
    assert accepted.provider_message_id.startswith("<")


async def test_postmark_request_follows_the_email_api_contract() -> None:
    async with provider_server("postmark") as server:
        transport = server.transport(message_stream="broadcast")
        try:
            accepted = await transport.send(build())
        finally:
            await transport.close()
    body = server.received[0].body
    assert accepted.response == "OK"
    assert body["From"] == '"Sam Sales" <sales@example.com>'
    assert body["To"] == '"Ada Lovelace" <ada@example.org>'
    assert body["MessageStream"] == "broadcast"
    assert body["Metadata"] == {"delivery_key": "enr-7:1"}
    assert [h["Name"] for h in body["Headers"]] == list(CARRIED_HEADERS)
    assert (body["TrackOpens"], body["TrackLinks"]) == (False, "None")


# ------------------------------------------------------------------ failures


async def test_wrong_key_is_transient_401(server: ContractServer) -> None:
    transport = server.transport(api_key="not-the-key")
    try:
        with pytest.raises(TransientSendError) as caught:
            await transport.send(build())
    finally:
        await transport.close()
    assert caught.value.code == 401
    assert not isinstance(caught.value, PermanentSendError)
    assert server.received == []


async def test_throttling_carries_retry_after(server: ContractServer, transport: Transport) -> None:
    server.fail_next(429, retry_after=2)
    with pytest.raises(ProviderTransientError) as caught:
        await transport.send(build())
    assert caught.value.code == 429
    assert caught.value.retry_after == pytest.approx(2.0)
    assert server.received == []

    accepted = await transport.send(build())  # the throttling was for one request
    assert accepted.provider_message_id == server.received[0].provider_message_id


async def test_server_errors_are_transient(server: ContractServer, transport: Transport) -> None:
    server.fail_next(500)
    server.fail_next(503, retry_after=7)
    with pytest.raises(ProviderTransientError) as first:
        await transport.send(build())
    with pytest.raises(ProviderTransientError) as second:
        await transport.send(build())
    assert (first.value.code, first.value.retry_after) == (500, None)
    assert (second.value.code, second.value.retry_after) == (503, pytest.approx(7.0))


async def test_sendgrid_rate_limit_reset_is_used_without_retry_after() -> None:
    async with provider_server("sendgrid") as server:
        transport = server.transport()
        server.fail_next(429)
        try:
            with pytest.raises(ProviderTransientError) as caught:
                await transport.send(build())
        finally:
            await transport.close()
    assert caught.value.retry_after is not None
    assert 0.0 <= caught.value.retry_after <= 2.0


REJECTIONS = {
    "sendgrid": (400, {"message": "Does not contain a valid address."}, "valid address"),
    "mailgun": (400, {"message": "from parameter is missing"}, "from parameter"),
    "postmark": (422, {"error_code": 402, "message": "Invalid JSON"}, "Invalid JSON"),
}


async def test_rejection_of_the_message_is_permanent(
    server: ContractServer, transport: Transport
) -> None:
    """A rejection that does not blame the recipient's address is about our message:
    permanent, classified policy, never a suppression."""
    status, options, text = REJECTIONS[server.provider]
    server.fail_next(status, **options)  # type: ignore[arg-type]
    with pytest.raises(ProviderPermanentError) as caught:
        await transport.send(build())
    assert caught.value.code == status
    assert text in str(caught.value)
    assert caught.value.suppress is False
    assert caught.value.rejection.bounce_type is BounceType.POLICY
    assert caught.value.rejection.enhanced_status is None


RECIPIENT_REJECTIONS = {
    "sendgrid": (
        400,
        {"message": "Does not contain a valid address.", "field": "personalizations.0.to.0.email"},
    ),
    "mailgun": (
        400,
        {"message": "'to' parameter is not a valid address. please check documentation"},
    ),
    "postmark": (422, {"error_code": 300, "message": "Error parsing 'To': Illegal email address"}),
}


async def test_rejection_of_the_recipients_address_is_hard(
    server: ContractServer, transport: Transport
) -> None:
    """Each provider's own way of saying the To address is invalid: hard, suppressed."""
    status, options = RECIPIENT_REJECTIONS[server.provider]
    server.fail_next(status, **options)  # type: ignore[arg-type]
    with pytest.raises(ProviderPermanentError) as caught:
        await transport.send(build())
    assert caught.value.code == status
    assert caught.value.rejection.bounce_type is BounceType.HARD
    assert caught.value.suppress is True


async def test_sendgrid_error_on_another_field_is_not_the_recipients_fault() -> None:
    async with provider_server("sendgrid") as server:
        transport = server.transport()
        server.fail_next(400, message="Does not contain a valid address.", field="from.email")
        try:
            with pytest.raises(ProviderPermanentError) as caught:
                await transport.send(build())
        finally:
            await transport.close()
    assert "from.email" in str(caught.value)
    assert caught.value.rejection.bounce_type is BounceType.POLICY


async def test_the_gate_is_awaited_right_before_the_request(
    server: ContractServer, transport: Transport
) -> None:
    """The request is the hand-off: the gate runs before it, and a gate that says no
    keeps the message from reaching the provider at all."""
    seen: list[int] = []

    async def gate() -> bool:
        seen.append(len(server.received))
        return True

    await transport.send(build(), gate)
    assert seen == [0] and len(server.received) == 1

    async def refuse() -> bool:
        return False

    with pytest.raises(HandOffRefused):
        await transport.send(build(), refuse)
    assert len(server.received) == 1


async def test_sendgrid_joins_the_error_messages() -> None:
    async with provider_server("sendgrid") as server:
        transport = server.transport()
        try:
            server.fail_next(413)
            with pytest.raises(PermanentSendError) as too_large:
                await transport.send(build())
            server.fail_next(403, message="The from address does not match a verified Sender")
            with pytest.raises(TransientSendError) as unverified:
                await transport.send(build())
        finally:
            await transport.close()
    assert too_large.value.code == 413 and "content too large" in str(too_large.value)
    assert unverified.value.code == 403  # configuration: fail over, not drop the message


async def test_postmark_inactive_recipient_is_suppressed() -> None:
    async with provider_server("postmark") as server:
        transport = server.transport()
        server.fail_next(422, error_code=406)
        try:
            with pytest.raises(ProviderPermanentError) as caught:
                await transport.send(build())
        finally:
            await transport.close()
    assert caught.value.code == 422
    assert caught.value.provider_code == 406
    assert caught.value.suppress is True
    assert caught.value.rejection.bounce_type is BounceType.HARD
    assert "inactive" in str(caught.value)


async def test_postmark_invalid_email_request_depends_on_the_field() -> None:
    async with provider_server("postmark") as server:
        transport = server.transport()
        try:
            server.fail_next(
                422, error_code=300, message="Error parsing 'To': Illegal email address 'ada'."
            )
            with pytest.raises(ProviderPermanentError) as bad_to:
                await transport.send(build())
            server.fail_next(
                422,
                error_code=300,
                message="Invalid 'From' address: 'sales@example.com' is not a verified sender.",
            )
            with pytest.raises(ProviderTransientError) as bad_from:
                await transport.send(build())
            server.fail_next(422, error_code=412)
            with pytest.raises(ProviderTransientError) as pending:
                await transport.send(build())
        finally:
            await transport.close()
    assert (bad_to.value.provider_code, bad_to.value.suppress) == (300, True)
    assert bad_from.value.provider_code == 300
    assert (pending.value.code, pending.value.provider_code) == (422, 412)


async def test_connection_refused_is_transient() -> None:
    for provider in PROVIDERS:
        async with provider_server(provider) as server:
            transport = server.transport()
        try:  # the server has stopped: its port refuses connections
            with pytest.raises(ProviderTransientError) as caught:
                await transport.send(build())
        finally:
            await transport.close()
        assert caught.value.code is None

    unused = SendGridTransport("key", base_url=f"http://127.0.0.1:{free_port()}", timeout=2)
    try:
        with pytest.raises(TransientSendError):
            await unused.send(build())
    finally:
        await unused.close()


async def test_no_answer_to_a_sent_request_is_uncertain_not_transient() -> None:
    """The request went out and the provider did not answer in time: it may have taken
    the message, so it is not retried, here or through another transport."""
    async with provider_server("postmark") as server:
        transport = server.transport(timeout=0.2)
        server.stall_next(1.0)
        try:
            with pytest.raises(HandOffUncertain) as caught:
                await transport.send(build())
        finally:
            await transport.close()
    assert not isinstance(caught.value, TransientSendError)
    assert "no answer to the request" in str(caught.value)


# ------------------------------------------------------------------ the contract servers


async def test_contract_servers_refuse_what_the_providers_refuse() -> None:
    async with (
        provider_server("sendgrid") as sendgrid,
        provider_server("mailgun") as mailgun,
        provider_server("postmark") as postmark,
        httpx.AsyncClient(timeout=5) as client,
    ):
        bearer = {"Authorization": f"Bearer {sendgrid.api_key}"}
        mail = {
            "personalizations": [{"to": [{"email": "ada@example.org"}]}],
            "from": {"email": "sales@example.com"},
            "subject": "Hi",
            "content": [
                {"type": "text/html", "value": "<p>Hi</p>"},
                {"type": "text/plain", "value": "Hi"},
            ],
        }
        answer = await client.post(f"{sendgrid.base_url}/v3/mail/send", json=mail, headers=bearer)
        assert answer.status_code == 400
        assert answer.json()["errors"][0] == {
            "message": SENDGRID_CONTENT_ORDER,
            "field": "content",
            "help": None,
        }
        mail["content"] = [{"type": "text/plain", "value": "Hi"}]
        mail["headers"] = {"From": "someone@example.net"}
        answer = await client.post(f"{sendgrid.base_url}/v3/mail/send", json=mail, headers=bearer)
        assert answer.status_code == 400
        answer = await client.post(f"{sendgrid.base_url}/v3/mail/send", json=mail)
        assert answer.status_code == 401
        assert answer.json()["errors"][0]["message"] == "authorization required"

        auth = httpx.BasicAuth("api", mailgun.api_key)
        url = f"{mailgun.base_url}/v3/{mailgun.domain}/messages.mime"
        answer = await client.post(
            url, auth=auth, data={"to": "ada@example.org", "message": "From: a@b.c\r\n\r\nhi"}
        )
        assert (answer.status_code, answer.json()["message"]) == (
            400,
            "'message' parameter is not a file",
        )
        answer = await client.post(
            url, auth=auth, data={"v:x": "1"}, files={"message": ("m.eml", b"From: a@b.c\r\n\r\n")}
        )
        assert (answer.status_code, answer.json()["message"]) == (400, "to parameter is missing")
        answer = await client.post(
            url,
            auth=httpx.BasicAuth("api", "wrong"),
            data={"to": "ada@example.org"},
            files={"message": ("m.eml", b"From: a@b.c\r\n\r\nhi")},
        )
        assert (answer.status_code, answer.text) == (401, "Forbidden")

        token = {"X-Postmark-Server-Token": postmark.token, "Accept": "application/json"}
        email = {"From": "sales@example.com", "To": "ada@example.org", "Subject": "Hi"}
        answer = await client.post(f"{postmark.base_url}/email", json=email, headers=token)
        assert answer.status_code == 422
        assert answer.json()["ErrorCode"] == 300
        email["TextBody"] = "Hi"
        answer = await client.post(
            f"{postmark.base_url}/email",
            json=email,
            headers={"X-Postmark-Server-Token": postmark.token},
        )
        assert (answer.status_code, answer.json()["ErrorCode"]) == (422, 409)  # no Accept
        answer = await client.post(f"{postmark.base_url}/email", json=email, headers=token)
        assert answer.status_code == 200
        assert answer.json()["ErrorCode"] == 0

    assert [m.to_email for m in postmark.received] == ["ada@example.org"]
    assert sendgrid.received == [] and mailgun.received == []


async def test_scripted_failure_waits_for_a_well_formed_request() -> None:
    async with provider_server("sendgrid") as server, httpx.AsyncClient(timeout=5) as client:
        server.fail_next(500)
        answer = await client.post(
            f"{server.base_url}/v3/mail/send",
            json={"personalizations": []},
            headers={"Authorization": f"Bearer {server.api_key}"},
        )
        assert answer.status_code == 400  # the malformed request is refused as such
        transport = server.transport()
        try:
            with pytest.raises(TransientSendError) as caught:
                await transport.send(build())
        finally:
            await transport.close()
    assert caught.value.code == 500


def test_retry_after_values() -> None:
    now = time.time()
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after("-3") == 0.0
    date = format_datetime(datetime.fromtimestamp(now + 30, UTC), usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(30.0, abs=1.0)
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
