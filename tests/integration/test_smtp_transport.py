"""SmtpTransport (services/sender/transport.py) against real aiosmtpd servers on loopback.

Every test runs twice: against a server that offers PIPELINING (the envelope and DATA
go out together, services/sender/pipelining.py) and against one that does not (each
command waits for its reply)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiosmtplib
import dkim
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

import tests.smtp_server as smtp_server_module
from schemas.events import BounceType
from services.runtime.devstack import free_port
from services.sender.mime import DkimKey, OutgoingEmail, TrackingConfig, build_message
from services.sender.transport import (
    Accepted,
    HandOffRefused,
    HandOffUncertain,
    PermanentSendError,
    SmtpConfig,
    SmtpTransport,
    TransientSendError,
)
from tests.smtp_server import ScriptedSmtp, smtp_server

pytestmark = pytest.mark.integration

SENDER = "sales@example.com"
RECIPIENT = "ada@example.org"
NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
AUTH_SERVER: dict[str, object] = {"username": "mailer", "password": "s3cret", "starttls": True}
TRACKING = TrackingConfig(base_url="https://track.example.net", secret=b"transport-secret")


@dataclass
class CountingSmtp(ScriptedSmtp):
    """ScriptedSmtp that also remembers every connection (one aiosmtpd session each)
    that reached RCPT, and can drop the connection when DATA arrives."""

    sessions: list[Session] = field(default_factory=list)
    protocols: list[SMTP] = field(default_factory=list)
    #: How many of the next messages are kept by the server, which then closes the
    #: connection before answering (after the end of the message).
    drop_data: int = 0
    #: How many of the next DATA commands are answered by closing the connection
    #: before the server asks for the message (no 354).
    drop_data_command: int = 0
    #: Close the connection right after replying 421 (as RFC 5321 servers do).
    close_after_421: bool = False
    #: DATA commands the server has read (answered 354 or not).
    data_commands: int = 0

    @property
    def connections(self) -> int:
        return len(self.sessions)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not any(known is session for known in self.sessions):
            self.sessions.append(session)
            self.protocols.append(server)
            original = server._smtp_methods["DATA"]

            async def data_command(arg: str) -> None:
                self.data_commands += 1
                if self.drop_data_command > 0:
                    self.drop_data_command -= 1
                    assert isinstance(server.transport, asyncio.Transport)
                    server.transport.abort()
                    return
                await original(arg)

            # aiosmtpd dispatches commands through this table (built when it starts).
            server._smtp_methods["DATA"] = data_command
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.drop_data > 0:
            self.drop_data -= 1
            for recipient in envelope.rcpt_tos:
                self.attempts[recipient.lower()] += 1
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "451 4.3.0 dropped"  # never reaches the client
        reply = await super().handle_DATA(server, session, envelope)
        if reply.startswith("421") and self.close_after_421:
            transport = server.transport
            assert transport is not None
            # Runs once aiosmtpd has written the reply: close() flushes it, then hangs up.
            asyncio.get_running_loop().call_soon(transport.close)
        return reply

    def drop_connections(self) -> None:
        """Close every open connection from the server side (an idle timeout, a restart)."""
        for protocol in self.protocols:
            if isinstance(protocol.transport, asyncio.Transport):
                protocol.transport.abort()


@pytest.fixture(autouse=True, params=[False, True], ids=["stepwise", "pipelined"])
def counting_handler(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """smtp_server() builds its handler from the module global: make it a CountingSmtp,
    offering PIPELINING or not."""
    monkeypatch.setattr(
        smtp_server_module,
        "ScriptedSmtp",
        functools.partial(CountingSmtp, pipelining=request.param),
    )
    yield


@asynccontextmanager
async def counting_server(**options: object) -> AsyncIterator[tuple[CountingSmtp, Path | None]]:
    async with smtp_server(**options) as (server, ca_file):  # type: ignore[arg-type]
        assert isinstance(server, CountingSmtp)
        yield server, ca_file


def config_for(server: ScriptedSmtp, **changes: object) -> SmtpConfig:
    options: dict[str, object] = {"host": server.host, "port": server.port, "timeout": 5.0}
    options.update(changes)
    return SmtpConfig(**options)  # type: ignore[arg-type]


@asynccontextmanager
async def transport_for(server: ScriptedSmtp, **changes: object) -> AsyncIterator[SmtpTransport]:
    transport = SmtpTransport(config_for(server, **changes))
    try:
        yield transport
    finally:
        await transport.close()


def raw_message(n: int = 0, to: str = RECIPIENT) -> bytes:
    return (
        f"From: Sam <{SENDER}>\r\n"
        f"To: <{to}>\r\n"
        f"Subject: message {n}\r\n"
        f"Message-ID: <m{n}@example.com>\r\n"
        "\r\n"
        f"Hello number {n}.\r\n"
        ".leading dot must survive dot-stuffing\r\n"
        "..two dots too\r\n"
        "\r\n"
        "-- \r\n"
        "Sam\r\n"
    ).encode()


# ----------------------------------------------------------------- plain delivery


async def test_plain_send_is_accepted_and_bytes_arrive_unchanged() -> None:
    built = build_message(
        OutgoingEmail(
            delivery_key="enr-1:0",
            from_email=SENDER,
            from_name="Sam Sales",
            to_email=RECIPIENT,
            to_name="Ada Lovelace",
            subject="Quick question",
            text="Hi Ada,\n\nSee https://acme.example/pricing\n.a line with a dot\n\nSam",
            html=None,
            thread_delivery_key=None,
            tracking=True,
        ),
        TRACKING,
        NOW,
    )
    async with counting_server() as (server, _), transport_for(server) as transport:
        accepted = await transport.send(built)

    assert isinstance(accepted, Accepted)
    assert accepted.code == 250
    assert "OK queued" in accepted.response
    assert len(server.received) == 1
    got = server.received[0]
    assert got.mail_from == SENDER
    assert got.rcpt_tos == [RECIPIENT]
    assert got.data == built.data
    assert got.authenticated_as is None
    assert got.message["Message-ID"] == built.message_id


async def test_send_raw_keeps_dot_lines_and_crlf() -> None:
    data = raw_message(7)
    async with counting_server() as (server, _), transport_for(server) as transport:
        await transport.send_raw(SENDER, RECIPIENT, data)

    assert [r.data for r in server.received] == [data]


# ----------------------------------------------------------------- AUTH and TLS


async def test_auth_over_starttls_with_test_ca(tmp_path: Path) -> None:
    async with (
        counting_server(**AUTH_SERVER, cert_dir=tmp_path) as (server, ca_file),
        transport_for(
            server,
            username="mailer",
            password="s3cret",
            starttls=True,
            validate_certs=True,
            ca_file=str(ca_file),
        ) as transport,
    ):
        accepted = await transport.send_raw(SENDER, RECIPIENT, raw_message())
        session = server.sessions[0]

    assert accepted.code == 250
    assert len(server.received) == 1
    assert server.received[0].authenticated_as == "mailer"
    assert session.ssl is not None, "the message did not travel over TLS"
    assert session.authenticated


async def test_wrong_password_is_transient_with_code_535(tmp_path: Path) -> None:
    async with (
        counting_server(**AUTH_SERVER, cert_dir=tmp_path) as (server, ca_file),
        transport_for(
            server,
            username="mailer",
            password="wrong",
            starttls=True,
            ca_file=str(ca_file),
        ) as transport,
    ):
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message())

    assert not isinstance(caught.value, PermanentSendError)
    assert caught.value.code == 535
    assert "authentication failed" in str(caught.value)
    assert server.received == []


async def test_server_requiring_starttls_refuses_a_client_without_it(tmp_path: Path) -> None:
    """The server demands STARTTLS (530 on MAIL): a problem of our session, not of the
    message, so it is transient (another transport, or a fixed configuration, can
    deliver). Nothing is delivered in the clear."""
    async with (
        counting_server(starttls=True, cert_dir=tmp_path) as (server, ca_file),
        transport_for(server, starttls=False, ca_file=str(ca_file)) as transport,
    ):
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message())

    assert caught.value.code == 530
    assert server.received == []
    assert server.connections == 0, "RCPT should never have been reached"


async def test_credentials_without_starttls_fail_transiently_before_auth(tmp_path: Path) -> None:
    """With AUTH only offered after STARTTLS, a client that skips STARTTLS cannot log in
    (and must not send the password in the clear): a config problem, transient."""
    async with (
        counting_server(**AUTH_SERVER, cert_dir=tmp_path) as (server, ca_file),
        transport_for(
            server, username="mailer", password="s3cret", starttls=False, ca_file=str(ca_file)
        ) as transport,
    ):
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message())

    assert not isinstance(caught.value, PermanentSendError)
    assert server.received == []


async def test_untrusted_certificate_over_starttls_is_transient(tmp_path: Path) -> None:
    async with (
        counting_server(starttls=True, cert_dir=tmp_path) as (server, _),
        transport_for(server, starttls=True, validate_certs=True, ca_file=None) as transport,
    ):
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message())

    assert not isinstance(caught.value, PermanentSendError)
    assert (
        "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        or "certificate" in str(caught.value).lower()
    )
    assert server.received == []
    assert server.connections == 0


async def test_untrusted_certificate_with_implicit_tls_is_transient(tmp_path: Path) -> None:
    async with (
        counting_server(implicit_tls=True, cert_dir=tmp_path) as (server, _),
        transport_for(server, tls=True, validate_certs=True) as transport,
    ):
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message())

    assert not isinstance(caught.value, PermanentSendError)
    assert server.received == []


async def test_implicit_tls_delivers(tmp_path: Path) -> None:
    async with (
        counting_server(implicit_tls=True, cert_dir=tmp_path) as (server, ca_file),
        transport_for(server, tls=True, validate_certs=True, ca_file=str(ca_file)) as transport,
    ):
        first = await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
        second = await transport.send_raw(SENDER, RECIPIENT, raw_message(2))

    assert first.code == second.code == 250
    assert [r.data for r in server.received] == [raw_message(1), raw_message(2)]
    assert server.connections == 1


async def test_implicit_tls_ignores_the_starttls_flag(tmp_path: Path) -> None:
    """tls=True with starttls=True must not try STARTTLS inside the TLS session."""
    async with (
        counting_server(implicit_tls=True, cert_dir=tmp_path) as (server, ca_file),
        transport_for(server, tls=True, starttls=True, ca_file=str(ca_file)) as transport,
    ):
        await transport.send_raw(SENDER, RECIPIENT, raw_message())

    assert len(server.received) == 1


# ----------------------------------------------------------------- scripted replies


@pytest.mark.parametrize(("server_closes", "connections"), [(False, 1), (True, 2)])
async def test_421_is_transient_and_the_next_attempt_is_accepted(
    server_closes: bool, connections: int
) -> None:
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.close_after_421 = server_closes
        server.reply(RECIPIENT, "421 4.7.0 Try again later")
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
        assert caught.value.code == 421
        assert server.received == []

        accepted = await transport.send_raw(SENDER, RECIPIENT, raw_message(2))

    assert accepted.code == 250
    assert [r.data for r in server.received] == [raw_message(2)]
    assert server.attempts[RECIPIENT] == 2
    # Either the connection survived (RSET accepted) or a fresh one was opened.
    assert server.connections == connections


@pytest.mark.parametrize(
    "reply",
    [
        "450 4.2.1 Mailbox busy",
        "451 4.3.0 Local error in processing",
        "452 4.2.2 Insufficient storage",
    ],
)
async def test_4xx_is_transient_and_the_connection_is_reused(reply: str) -> None:
    code = int(reply[:3])
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.reply(RECIPIENT, reply)
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
        assert not isinstance(caught.value, PermanentSendError)
        assert caught.value.code == code
        assert str(code) in str(caught.value)

        await transport.send_raw(SENDER, RECIPIENT, raw_message(2))

    assert [r.data for r in server.received] == [raw_message(2)]
    assert server.connections == 1


HARD, SOFT, POLICY = BounceType.HARD, BounceType.SOFT, BounceType.POLICY


@pytest.mark.parametrize(
    ("reply", "kind", "status"),
    [
        ("550 5.1.1 User unknown", HARD, "5.1.1"),
        ("551 5.1.6 User not local", HARD, "5.1.6"),
        ("553 5.1.3 Mailbox name not allowed", HARD, "5.1.3"),
        ("554 5.7.1 Message rejected as spam", POLICY, "5.7.1"),
        ("550 5.7.1 Service unavailable, client host blocked", POLICY, "5.7.1"),
        ("550 5.7.26 Unauthenticated email is not accepted due to DMARC policy", POLICY, "5.7.26"),
        ("552 5.2.2 Mailbox full", SOFT, "5.2.2"),
        ("550 No such user here", HARD, None),
        ("554 Transaction failed", POLICY, None),
    ],
)
async def test_5xx_is_permanent_with_its_code_and_classification(
    reply: str, kind: BounceType, status: str | None
) -> None:
    code = int(reply[:3])
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.reply(RECIPIENT, reply)
        with pytest.raises(PermanentSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1))

    assert caught.value.code == code
    assert reply[4:] in str(caught.value)
    assert caught.value.rejection.bounce_type is kind
    assert caught.value.rejection.enhanced_status == status
    assert caught.value.suppress is (kind is HARD)
    assert server.received == []
    assert server.attempts[RECIPIENT] == 1, "a permanent refusal must not be retried"


# ----------------------------------------------------------------- the hand-off gate


class Gate:
    """Records when the transport asks to let the message go, and what the server had
    seen by then."""

    def __init__(self, server: ScriptedSmtp, answer: bool = True) -> None:
        self.server = server
        self.answer = answer
        self.calls: list[tuple[int, int]] = []

    async def __call__(self) -> bool:
        self.calls.append((self.server.rcpt_attempts[RECIPIENT], self.server.attempts[RECIPIENT]))
        return self.answer


async def test_the_gate_runs_after_rcpt_and_before_data() -> None:
    async with counting_server() as (server, _), transport_for(server) as transport:
        seen: list[int] = []
        gate = Gate(server)

        async def watching() -> bool:
            seen.append(server.data_commands)
            return await gate()

        accepted = await transport.send_raw(SENDER, RECIPIENT, raw_message(1), watching)

    assert accepted.code == 250
    assert gate.calls == [(1, 0)], "one RCPT accepted, no message yet"
    # Pipelined, DATA went out with the envelope and the server asked for the message;
    # stepwise, DATA waits for the gate.
    assert seen == [1 if server.pipelining else 0]
    assert [r.data for r in server.received] == [raw_message(1)]


async def test_pipelining_is_used_only_when_offered_and_wanted() -> None:
    async with counting_server() as (server, _):
        async with transport_for(server) as transport:
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
            assert (transport._session is not None) is server.pipelining
        async with transport_for(server, pipelining=False) as transport:
            seen: list[int] = []

            async def watching() -> bool:
                seen.append(server.data_commands)
                return True

            await transport.send_raw(SENDER, RECIPIENT, raw_message(2), watching)
            assert transport._session is None
    assert seen == [1], "with pipelining off, DATA waits for the gate"
    assert [r.data for r in server.received] == [raw_message(1), raw_message(2)]


@pytest.mark.parametrize(
    ("reply", "error", "kind"),
    [
        ("550 5.1.1 <ada@example.org>: Recipient address rejected: User unknown", None, HARD),
        ("550 5.7.1 Recipient address rejected: Access denied by policy", None, POLICY),
        ("450 4.2.1 Mailbox temporarily unavailable", TransientSendError, None),
    ],
)
async def test_a_refusal_at_rcpt_comes_before_the_gate(
    reply: str, error: type[Exception] | None, kind: BounceType | None
) -> None:
    """The envelope is refused before anything of the message left: the delivery never
    reaches its point of no return, and the connection serves the next message."""
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.reply_rcpt(RECIPIENT, reply)
        gate = Gate(server)
        with pytest.raises(error or PermanentSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1), gate)
        assert gate.calls == []
        await transport.send_raw(SENDER, RECIPIENT, raw_message(2), gate)

    if kind is not None:
        assert isinstance(caught.value, PermanentSendError)
        assert caught.value.rejection.bounce_type is kind
    else:
        assert not isinstance(caught.value, PermanentSendError)
    assert caught.value.code == int(reply[:3])  # type: ignore[attr-defined]
    assert gate.calls == [(2, 0)]
    assert [r.data for r in server.received] == [raw_message(2)]
    assert server.connections == 1


async def test_a_gate_that_says_no_hands_nothing_over() -> None:
    """Stepwise, the envelope is reset and the connection carries the next message;
    pipelined, the server already asked for the message (354), and only dropping the
    connection gets out of DATA without one: the next message goes on a new one."""
    async with counting_server() as (server, _), transport_for(server) as transport:
        with pytest.raises(HandOffRefused):
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1), Gate(server, False))
        assert server.attempts[RECIPIENT] == 0 and server.received == []
        other = "grace@example.org"
        await transport.send_raw(SENDER, other, raw_message(2, other))

    assert [(r.rcpt_tos, r.data) for r in server.received] == [([other], raw_message(2, other))]
    assert server.connections == (2 if server.pipelining else 1)


async def test_a_failing_gate_propagates_and_leaves_the_connection_usable() -> None:
    async def broken() -> bool:
        raise ConnectionResetError("database went away")

    async with counting_server() as (server, _), transport_for(server) as transport:
        with pytest.raises(ConnectionResetError):
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1), broken)
        await transport.send_raw(SENDER, RECIPIENT, raw_message(2))

    assert [r.data for r in server.received] == [raw_message(2)]
    # Pipelined, the way out of DATA is a new connection (see the test above).
    assert server.connections == (2 if server.pipelining else 1)


async def test_after_a_refusal_the_same_connection_sends_the_next_message() -> None:
    other = "grace@example.org"
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.reply(RECIPIENT, "550 5.1.1 User unknown")
        with pytest.raises(PermanentSendError):
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1, RECIPIENT))
        # RSET cleared the envelope: the refused recipient does not leak into this one.
        await transport.send_raw(SENDER, other, raw_message(2, other))
        await transport.send_raw(SENDER, RECIPIENT, raw_message(3, RECIPIENT))

    assert [(r.rcpt_tos, r.data) for r in server.received] == [
        ([other], raw_message(2, other)),
        ([RECIPIENT], raw_message(3, RECIPIENT)),
    ]
    assert server.connections == 1


# ----------------------------------------------------------------- envelope written ahead

OTHER = "grace@example.org"


def ahead_of(n: int, to: str = OTHER) -> tuple[str, str, int]:
    return (SENDER, to, len(raw_message(n, to)))


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether ``condition`` holds within ``timeout`` seconds (the server's side runs
    on this loop, after the client has its reply)."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


async def test_the_next_envelope_goes_out_with_the_message() -> None:
    """Pipelined, the next message's MAIL FROM, RCPT TO and DATA follow the message in
    the same write: its send reads their replies and writes only the message. A
    server without PIPELINING gets one command at a time, as always."""
    async with counting_server() as (server, _), transport_for(server) as transport:
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1), ahead=ahead_of(2))
        if server.pipelining:
            assert await until(lambda: server.data_commands == 2)
            assert server.rcpt_attempts[OTHER] == 1
        else:
            await asyncio.sleep(0.1)
            assert server.rcpt_attempts[OTHER] == 0 and server.data_commands == 1
        await transport.send_raw(SENDER, OTHER, raw_message(2, OTHER))
        await transport.send_raw(SENDER, RECIPIENT, raw_message(3))

    assert server.rcpt_attempts[OTHER] == 1
    assert [(r.mail_from, r.rcpt_tos, r.data) for r in server.received] == [
        (SENDER, [RECIPIENT], raw_message(1)),
        (SENDER, [OTHER], raw_message(2, OTHER)),
        (SENDER, [RECIPIENT], raw_message(3)),
    ]
    assert server.connections == 1


async def test_the_gate_for_a_message_whose_envelope_went_ahead_comes_before_it() -> None:
    async with counting_server() as (server, _), transport_for(server) as transport:
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1), ahead=ahead_of(2))
        seen: list[int] = []

        async def watching() -> bool:
            seen.append(len(server.received))
            return True

        await transport.send_raw(SENDER, OTHER, raw_message(2, OTHER), watching)

    assert seen == [1], "the second message had not left when its gate ran"
    assert len(server.received) == 2


async def test_an_envelope_written_ahead_for_another_message_is_never_completed() -> None:
    """The lane changed its mind (the next message went elsewhere, or was given back):
    the session sits inside a transaction it cannot take back, so it is dropped and
    the message goes out on a new connection; nothing reaches the other recipient."""
    async with counting_server() as (server, _), transport_for(server) as transport:
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1), ahead=ahead_of(2))
        third = "lin@example.org"
        await transport.send_raw(SENDER, third, raw_message(3, third))

    assert [(r.rcpt_tos, r.data) for r in server.received] == [
        ([RECIPIENT], raw_message(1)),
        ([third], raw_message(3, third)),
    ]
    assert server.attempts[OTHER] == 0
    assert server.connections == (2 if server.pipelining else 1)


async def test_closing_with_an_envelope_written_ahead_sends_no_message() -> None:
    async with counting_server() as (server, _):
        transport = SmtpTransport(config_for(server))
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1), ahead=ahead_of(2))
        await transport.close()
        await asyncio.sleep(0.1)

    assert [r.data for r in server.received] == [raw_message(1)]
    assert server.attempts[OTHER] == 0


async def test_a_refused_message_leaves_the_envelope_written_ahead_usable() -> None:
    """The end of a message ends its transaction, accepted or not: the next message,
    whose envelope followed it, goes out on the same connection."""
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.reply(RECIPIENT, "550 5.7.1 Message content rejected")
        with pytest.raises(PermanentSendError):
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1), ahead=ahead_of(2))
        await transport.send_raw(SENDER, OTHER, raw_message(2, OTHER))

    assert [(r.rcpt_tos, r.data) for r in server.received] == [([OTHER], raw_message(2, OTHER))]
    assert server.connections == 1


async def test_a_refusal_of_an_envelope_written_ahead_comes_before_its_gate() -> None:
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.reply_rcpt(OTHER, "550 5.1.1 <grace@example.org>: User unknown")
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1), ahead=ahead_of(2))
        gate = Gate(server)
        with pytest.raises(PermanentSendError) as caught:
            await transport.send_raw(SENDER, OTHER, raw_message(2, OTHER), gate)
        await transport.send_raw(SENDER, RECIPIENT, raw_message(3))

    assert caught.value.code == 550 and caught.value.rejection.bounce_type is HARD
    assert gate.calls == []
    assert [r.data for r in server.received] == [raw_message(1), raw_message(3)]
    assert server.connections == 1


async def test_an_address_cannot_smuggle_a_command_into_an_envelope_written_ahead() -> None:
    smuggled = "eve@example.org\r\nRCPT TO:<x@example.org>"
    async with counting_server() as (server, _), transport_for(server) as transport:
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1), ahead=(SENDER, smuggled, 10))
        with contextlib.suppress(ValueError, PermanentSendError, TransientSendError):
            await transport.send_raw(SENDER, smuggled, raw_message(2))
        await transport.send_raw(SENDER, RECIPIENT, raw_message(3))

    assert server.rcpt_attempts.get("x@example.org", 0) == 0
    assert all(r.rcpt_tos != ["x@example.org"] for r in server.received)
    assert [r.data for r in server.received if r.rcpt_tos == [RECIPIENT]] == [
        raw_message(1),
        raw_message(3),
    ]


# ----------------------------------------------------------------- dropped connections


async def test_unused_port_is_transient() -> None:
    transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=free_port(), timeout=2.0))
    try:
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message())
    finally:
        await transport.close()
    assert not isinstance(caught.value, PermanentSendError)


async def test_connection_dropped_during_data_with_server_gone_is_transient() -> None:
    async with counting_server() as (server, _):
        transport = SmtpTransport(config_for(server, timeout=2.0))
        try:
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
            # Every DATA from now on kills the connection (the server is going away).
            server.drop_data_command = 10
            with pytest.raises(TransientSendError) as caught:
                await transport.send_raw(SENDER, RECIPIENT, raw_message(2))
        finally:
            await transport.close()

    assert not isinstance(caught.value, PermanentSendError)
    assert [r.data for r in server.received] == [raw_message(1)]


async def test_server_restart_between_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server goes away (idle connection dropped, listener closed): transient; once it
    is back on the same port, the same transport object reconnects and delivers."""
    async with counting_server() as (server, _):
        port = server.port
        transport = SmtpTransport(config_for(server, timeout=2.0))
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
        server.drop_connections()
    try:
        await asyncio.sleep(0.05)
        with pytest.raises(TransientSendError) as caught:
            await transport.send_raw(SENDER, RECIPIENT, raw_message(2))
        assert not isinstance(caught.value, PermanentSendError)

        monkeypatch.setattr(smtp_server_module, "free_port", lambda: port)
        async with counting_server() as (restarted, _):
            assert restarted.port == port
            accepted = await transport.send_raw(SENDER, RECIPIENT, raw_message(3))
    finally:
        await transport.close()

    assert accepted.code == 250
    assert [r.data for r in server.received] == [raw_message(1)]
    assert [r.data for r in restarted.received] == [raw_message(3)]


@pytest.mark.parametrize("noticed", [False, True], ids=["unnoticed", "noticed"])
async def test_idle_connection_dropped_by_server_is_reopened_transparently(
    noticed: bool,
) -> None:
    """Whether or not the client has seen the EOF yet, the next send reconnects."""
    async with counting_server() as (server, _), transport_for(server) as transport:
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
        server.drop_connections()
        if noticed:
            await asyncio.sleep(0.05)
        await transport.send_raw(SENDER, RECIPIENT, raw_message(2))

    assert [r.data for r in server.received] == [raw_message(1), raw_message(2)]
    assert server.connections == 2


async def test_a_drop_before_the_server_asks_for_the_message_is_retried_afresh() -> None:
    """The connection dies at the DATA command (no 354): nothing of the message went
    out, so it is sent again on a fresh connection, once."""
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.drop_data_command = 1
        accepted = await transport.send_raw(SENDER, RECIPIENT, raw_message(1))

    assert accepted.code == 250
    assert [r.data for r in server.received] == [raw_message(1)]
    assert server.attempts[RECIPIENT] == 1
    assert server.connections == 2


async def test_a_drop_after_the_end_of_the_message_is_uncertain_and_not_resent() -> None:
    """The server got the whole message, then the connection died before its answer:
    it may have been accepted, so it is not sent again (HandOffUncertain); the next
    message goes out on a fresh connection."""
    async with counting_server() as (server, _), transport_for(server) as transport:
        server.drop_data = 1
        with pytest.raises(HandOffUncertain):
            await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
        assert server.attempts[RECIPIENT] == 1
        accepted = await transport.send_raw(SENDER, RECIPIENT, raw_message(2))

    assert accepted.code == 250
    assert [r.data for r in server.received] == [raw_message(2)]
    assert server.attempts[RECIPIENT] == 2
    assert server.connections == 2


# ----------------------------------------------------------------- connection reuse


async def test_twenty_messages_share_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    connects = 0
    original = aiosmtplib.SMTP.connect

    async def counting_connect(self: aiosmtplib.SMTP, *args: object, **kwargs: object) -> object:
        nonlocal connects
        connects += 1
        return await original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(aiosmtplib.SMTP, "connect", counting_connect)
    started = time.monotonic()
    async with counting_server() as (server, _), transport_for(server) as transport:
        for n in range(20):
            accepted = await transport.send_raw(SENDER, RECIPIENT, raw_message(n))
            assert accepted.code == 250

    assert [r.data for r in server.received] == [raw_message(n) for n in range(20)]
    assert connects == 1
    assert server.connections == 1
    assert time.monotonic() - started < 10


async def test_concurrent_sends_share_one_connection() -> None:
    async with counting_server() as (server, _), transport_for(server) as transport:
        results = await asyncio.gather(
            *(transport.send_raw(SENDER, RECIPIENT, raw_message(n)) for n in range(10))
        )

    assert all(r.code == 250 for r in results)
    assert sorted(r.data for r in server.received) == sorted(raw_message(n) for n in range(10))
    assert server.connections == 1


async def test_close_then_send_reconnects() -> None:
    async with counting_server() as (server, _), transport_for(server) as transport:
        await transport.send_raw(SENDER, RECIPIENT, raw_message(1))
        await transport.close()
        await transport.close()  # idempotent
        await transport.send_raw(SENDER, RECIPIENT, raw_message(2))

    assert len(server.received) == 2
    assert server.connections == 2


# ----------------------------------------------------------------- DKIM end to end


async def test_dkim_signature_survives_the_smtp_hop() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)
    built = build_message(
        OutgoingEmail(
            delivery_key="enr-2:0",
            from_email=SENDER,
            from_name="Sam",
            to_email=RECIPIENT,
            to_name=None,
            subject="Signed",
            text="Hi,\n.dot line\n\nhttps://acme.example/x\n",
            html=None,
            thread_delivery_key=None,
            tracking=True,
        ),
        TRACKING,
        NOW,
        dkim_key=DkimKey("example.com", "sel1", pem),
    )

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return record if name == b"sel1._domainkey.example.com." else None

    async with counting_server() as (server, _), transport_for(server) as transport:
        await transport.send(built)

    assert len(server.received) == 1
    assert dkim.verify(server.received[0].data, dnsfunc=dnsfunc) is True
