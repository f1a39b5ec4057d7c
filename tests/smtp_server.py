"""A real SMTP server for tests (aiosmtpd on loopback): optional AUTH, STARTTLS or
implicit TLS with a throwaway certificate, and scripted replies ("421 for the
first try, then 250") per recipient, at DATA or at RCPT TO."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from services.runtime.devstack import free_port


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert.pem, key.pem)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    authenticated_as: str | None
    #: Wall-clock time (time.time()) at which the server accepted it.
    at: float = 0.0

    @property
    def message(self) -> Message:
        return message_from_bytes(self.data)


@dataclass
class ScriptedSmtp:
    """What the server does: replies queued per recipient ("*" for anyone)."""

    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    #: DATA commands per recipient (accepted or not).
    attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: RCPT TO commands per recipient (accepted or not).
    rcpt_attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: Seconds the server takes over each message before answering DATA.
    data_delay: float = 0.0
    #: Offer PIPELINING (RFC 2920) in the EHLO reply; aiosmtpd reads commands in
    #: order as they arrive, so it serves pipelined commands either way.
    pipelining: bool = False
    _stalls: deque[float] = field(default_factory=deque)
    _script: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))
    _rcpt_script: dict[str, deque[str]] = field(default_factory=lambda: defaultdict(deque))

    def reply(self, recipient: str, *replies: str) -> None:
        """Queue replies for the next DATA commands to ``recipient``, e.g. "421 4.7.0
        Try again later", or "DROP" (keep the message, then close the connection before
        answering); once the queue is empty, messages are accepted."""
        self._script[recipient.lower()].extend(replies)

    def stall_next(self, seconds: float, times: int = 1) -> None:
        """Take ``seconds`` (instead of ``data_delay``) over the next ``times`` messages."""
        self._stalls.extend([seconds] * times)

    def reply_rcpt(self, recipient: str, *replies: str) -> None:
        """Queue replies for the next RCPT TO commands naming ``recipient`` ("*" for
        anyone), e.g. "550 5.1.1 No such user"; once the queue is empty, the
        recipient is accepted."""
        self._rcpt_script[recipient.lower()].extend(replies)

    async def handle_EHLO(  # aiosmtpd hook
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            return [responses[0], "250-PIPELINING", *responses[1:]]
        return responses

    async def handle_RCPT(  # aiosmtpd hook
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        self.rcpt_attempts[address.lower()] += 1
        for key in (address.lower(), "*"):
            if self._rcpt_script[key]:
                return self._rcpt_script[key].popleft()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        delay = self._stalls.popleft() if self._stalls else self.data_delay
        if delay:
            await asyncio.sleep(delay)
        dropped = False
        for recipient in envelope.rcpt_tos:
            self.attempts[recipient.lower()] += 1
            for key in (recipient.lower(), "*"):
                if self._script[key]:
                    reply = self._script[key].popleft()
                    if reply != "DROP":
                        return reply
                    dropped = True
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        self.received.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""),
                login.decode() if isinstance(login, bytes) else None,
                time.time(),
            )
        )
        if dropped:
            # "DROP": the server keeps the message but the connection dies before its
            # answer goes out (the client cannot know whether it was taken).
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "250 2.0.0 OK queued (never heard)"
        return "250 2.0.0 OK queued"


class _Authenticator:
    def __init__(self, username: str, password: str) -> None:
        self.username, self.password = username.encode(), password.encode()

    def __call__(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == self.username
            and auth_data.password == self.password
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data)


@asynccontextmanager
async def smtp_server(
    *,
    username: str | None = None,
    password: str | None = None,
    starttls: bool = False,
    implicit_tls: bool = False,
    cert_dir: Path | None = None,
    pipelining: bool | None = None,
) -> AsyncIterator[tuple[ScriptedSmtp, Path | None]]:
    """Run a scripted SMTP server on the running loop; yields (server, CA file)."""
    handler = ScriptedSmtp(port=free_port())
    if pipelining is not None:  # else the handler's own default (see test_smtp_transport)
        handler.pipelining = pipelining
    context: ssl.SSLContext | None = None
    ca_file: Path | None = None
    if starttls or implicit_tls:
        assert cert_dir is not None, "TLS needs a folder for the test certificate"
        ca_file, key_file = make_certificate(cert_dir)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(ca_file, key_file)
    authenticator = _Authenticator(username, password or "") if username else None

    def factory() -> SMTP:
        return SMTP(
            handler,
            hostname="test-smtp",
            tls_context=context if starttls else None,
            require_starttls=starttls,
            authenticator=authenticator,
            auth_required=authenticator is not None,
            auth_require_tls=starttls or implicit_tls,
        )

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, handler.host, handler.port, ssl=context if implicit_tls else None
    )
    try:
        yield handler, ca_file
    finally:
        server.close()
        await server.wait_closed()
