"""Handing messages to an SMTP server (aiosmtplib), one reused connection; with a
server that offers PIPELINING, the envelope and DATA go out in one round trip."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

from schemas.events import BounceType
from services.sender.domain import RejectionClass, classify_smtp_rejection
from services.sender.mime import BuiltMessage
from services.sender.pipelining import PipelinedSession

log = logging.getLogger(__name__)


class SendError(Exception):
    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientSendError(SendError):
    """Try again later: 4xx, throttling, connection trouble."""


class PermanentSendError(SendError):
    """The server refused this message for good (5xx); ``rejection`` says how the
    refusal reads (hard: the address is bad; soft; policy) and its enhanced code."""

    def __init__(
        self, message: str, code: int | None = None, *, rejection: RejectionClass | None = None
    ) -> None:
        super().__init__(message, code)
        self.rejection = rejection or RejectionClass(BounceType.POLICY)

    @property
    def suppress(self) -> bool:
        """The address itself is bad: it belongs on the suppression list."""
        return self.rejection.suppresses


class HandOffUncertain(SendError):
    """The message went out in full but the server's answer never came (the
    connection dropped, or timed out, after the end of the message): it may have been
    accepted. Sending it again could deliver it twice, so it is not retried anywhere:
    the delivery is flagged uncertain."""


class HandOffRefused(Exception):
    """The hand-off gate said no (the delivery is no longer ours to send): nothing of
    the message was handed over, and the envelope was reset."""


#: Awaited once the transport is ready to let the message itself go (SMTP: envelope
#: accepted, right before DATA; HTTP: right before the request). True: go ahead, the
#: caller has recorded the point of no return. False: abandon (HandOffRefused).
HandOffGate = Callable[[], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    starttls: bool = False
    tls: bool = False
    timeout: float = 30.0
    validate_certs: bool = True
    #: A CA bundle to verify the server's certificate with (a private CA, tests).
    ca_file: str | None = None
    #: Pipeline the envelope and DATA (RFC 2920) when the server offers PIPELINING.
    pipelining: bool = True


@dataclass(frozen=True, slots=True)
class Accepted:
    code: int
    response: str
    #: The provider's own id for the message, when it gives one.
    provider_message_id: str | None = None


class Transport(Protocol):
    """Hands a built message to a mail server or an email API.

    ``send`` returns when the message is accepted; it raises TransientSendError
    (4xx, throttling, HTTP 429/5xx, network trouble: try later or elsewhere),
    PermanentSendError (5xx SMTP, provider rejection of this message: do not retry)
    or HandOffRefused (``gate`` said no). Whatever is raised before ``gate`` is
    awaited happened before any of the message left.
    """

    name: str

    async def send(
        self,
        message: BuiltMessage,
        gate: HandOffGate | None = None,
        ahead: BuiltMessage | None = None,
    ) -> Accepted:
        """``ahead``: the message this transport is asked to send next, when known
        (an SMTP session with PIPELINING writes its envelope after this message)."""
        ...

    async def close(self) -> None: ...


#: 5xx replies about our session, not the message: TLS or authentication required,
#: credentials rejected. Another transport, or a fixed configuration, can deliver.
SESSION_CODES = frozenset({523, 530, 534, 535, 538})


def _classify(code: int | None, text: str, message: str) -> SendError:
    """The error for a server's reply ``code`` ``text``; ``message`` describes it."""
    if code is not None and 500 <= code < 600 and code not in SESSION_CODES:
        return PermanentSendError(message, code, rejection=classify_smtp_rejection(code, text))
    return TransientSendError(message, code)


class SmtpTransport:
    """A persistent SMTP connection, reopened when the server drops it.

    With a server that offers PIPELINING (and ``pipelining`` on) the session is
    handed to :class:`PipelinedSession` once aiosmtplib has opened it: MAIL FROM,
    RCPT TO and DATA go out together, then the gate, then the message. Otherwise
    each command waits for its reply, and the gate runs before DATA."""

    def __init__(self, config: SmtpConfig, name: str = "smtp") -> None:
        self.name = name
        self.config = config
        self._client: aiosmtplib.SMTP | None = None
        self._session: PipelinedSession | None = None
        self._lock = asyncio.Lock()

    async def _connect(self) -> aiosmtplib.SMTP:
        c = self.config
        client = aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            use_tls=c.tls,
            start_tls=c.starttls if not c.tls else False,
            timeout=c.timeout,
            validate_certs=c.validate_certs,
            cert_bundle=c.ca_file,
        )
        await client.connect()
        try:
            if c.username:
                await client.login(c.username, c.password or "")
            if client.is_ehlo_or_helo_needed:
                # The server's extensions (PIPELINING) decide how the session goes on.
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    if not client.is_connected:
                        raise
                    await client.helo()
        except BaseException:
            client.close()
            raise
        return client

    async def _open(self) -> aiosmtplib.SMTP | PipelinedSession:
        """The live connection, opened if needed. Raises SMTPServerDisconnected (the
        caller tries once more) or TransientSendError."""
        if self._session is not None and self._session.is_connected:
            return self._session
        if self._client is not None and self._client.is_connected:
            return self._client
        self._session = self._client = None
        try:
            client = await self._connect()
        except aiosmtplib.SMTPServerDisconnected:
            raise
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Our credentials, not this message: try another transport, or later.
            raise TransientSendError(
                f"authentication failed: {exc.code} {exc.message}", exc.code
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify(exc.code, exc.message, f"{exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise TransientSendError(f"smtp unavailable: {exc!r}") from exc
        if self.config.pipelining and client.supports_extension("pipelining"):
            self._session = PipelinedSession(client, self.config.timeout)
            return self._session
        self._client = client
        return client

    async def send(
        self,
        message: BuiltMessage,
        gate: HandOffGate | None = None,
        ahead: BuiltMessage | None = None,
    ) -> Accepted:
        return await self.send_raw(
            message.from_email,
            message.to_email,
            message.data,
            gate,
            ahead=(ahead.from_email, ahead.to_email, len(ahead.data)) if ahead else None,
        )

    async def send_raw(
        self,
        sender: str,
        recipient: str,
        data: bytes,
        gate: HandOffGate | None = None,
        *,
        ahead: tuple[str, str, int] | None = None,
    ) -> Accepted:
        """MAIL FROM and RCPT TO first; then ``gate``; then the message. A refusal of
        the envelope (e.g. 550 5.1.1 at RCPT) is raised before the gate: nothing left.
        ``ahead`` (sender, recipient, size of the next message): with PIPELINING, its
        envelope follows this message in the same write."""
        async with self._lock:
            for attempt in (1, 2):
                try:
                    connection = await self._open()
                    if isinstance(connection, PipelinedSession):
                        return await self._send_pipelined(
                            connection, sender, recipient, data, gate, ahead
                        )
                    client = await self._envelope(connection, sender, recipient, len(data))
                except aiosmtplib.SMTPServerDisconnected as exc:
                    # A pooled connection the server had closed: once more, afresh.
                    await self.close()
                    if attempt == 2:
                        raise TransientSendError(f"server disconnected: {exc}") from exc
                    continue
                if gate is not None:
                    try:
                        go = await gate()
                    except BaseException:
                        await self._reset()
                        raise
                    if not go:
                        await self._reset()
                        raise HandOffRefused(f"{self.name}: the hand-off was called off")
                try:
                    response = await self._data(client, data)
                    return Accepted(response.code, response.message)
                except HandOffUncertain:
                    await self.close()
                    raise
                except aiosmtplib.SMTPServerDisconnected as exc:
                    self._client = None
                    if attempt == 2:
                        raise TransientSendError(f"server disconnected: {exc}") from exc
                except aiosmtplib.SMTPResponseException as exc:
                    await self._reset()
                    raise _classify(exc.code, exc.message, f"{exc.code} {exc.message}") from exc
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    await self.close()
                    raise TransientSendError(f"smtp unavailable: {exc!r}") from exc
        raise TransientSendError("unreachable")  # pragma: no cover

    async def _send_pipelined(
        self,
        session: PipelinedSession,
        sender: str,
        recipient: str,
        data: bytes,
        gate: HandOffGate | None,
        ahead: tuple[str, str, int] | None,
    ) -> Accepted:
        """MAIL FROM, RCPT TO and DATA in one round trip (or none, if they went out
        after the previous message); the gate once the server asked for the message;
        then the message, followed by the next one's envelope if ``ahead``.
        SMTPServerDisconnected before the message went out passes through (the caller
        reconnects once)."""

        def options(size: int) -> list[str]:
            return [f"SIZE={size}"] if session.supports_extension("size") else []

        next_envelope: bytes | None = None
        if ahead is not None:
            sender_ahead, recipient_ahead, size_ahead = ahead
            try:
                next_envelope = session.envelope_lines(
                    sender_ahead, recipient_ahead, options(size_ahead)
                )
            except ValueError:
                next_envelope = None  # its own send refuses it, alone
        try:
            mail, rcpt, start = await session.envelope(sender, recipient, options(len(data)))
        except aiosmtplib.SMTPServerDisconnected:
            raise
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise TransientSendError(f"smtp unavailable: {exc!r}") from exc
        refusal: SendError | None = None
        if mail.code != 250:
            refusal = _classify(mail.code, mail.message, f"{mail.code} {mail.message}")
        elif rcpt.code not in (250, 251):
            refusal = _classify(
                rcpt.code, rcpt.message, f"recipient refused: {rcpt.code} {rcpt.message}"
            )
        elif start.code != 354:
            refusal = _classify(start.code, start.message, f"{start.code} {start.message}")
        if refusal is not None:
            if start.code == 354:
                self._abort()  # it asked for a message all the same: only a drop gets out
            else:
                await self._reset()
            raise refusal
        if gate is not None:
            try:
                go = await gate()
            except BaseException:
                self._abort()
                raise
            if not go:
                self._abort()
                raise HandOffRefused(f"{self.name}: the hand-off was called off")
        try:
            response = await session.message(data, next_envelope)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            await self.close()
            raise HandOffUncertain(
                f"{self.name}: no answer after the end of the message: {exc}"
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await self.close()  # a garbled answer: whether it took the message is unknown
            raise HandOffUncertain(f"{self.name}: unreadable answer to the message: {exc}") from exc
        if response.code != 250:
            # The end of the message ends the transaction either way (RFC 5321 4.1.1.4):
            # no reset needed, and the envelope written ahead stays usable.
            raise _classify(response.code, response.message, f"{response.code} {response.message}")
        return Accepted(response.code, response.message)

    async def _data(self, client: aiosmtplib.SMTP, data: bytes) -> aiosmtplib.SMTPResponse:
        """DATA, then the message. A connection lost (or a timeout) before the server
        asked for the message is a plain failure, safe to retry; once the end of the
        message went out, only the server knows whether it took it: HandOffUncertain."""
        start = await client.execute_command(b"DATA")
        if start.code != 354:
            raise aiosmtplib.SMTPDataError(start.code, start.message)
        protocol = client.protocol
        if protocol is None:
            raise aiosmtplib.SMTPServerDisconnected("connection lost after DATA")
        payload = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data))
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        try:
            # read_response marks the reply as awaited before yielding: nothing
            # arrives unheard between the write and it.
            protocol.write(payload + b".\r\n")
            response = await protocol.read_response(timeout=self.config.timeout)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
            raise HandOffUncertain(
                f"{self.name}: no answer after the end of the message: {exc}"
            ) from exc
        if response.code != 250:
            raise aiosmtplib.SMTPDataError(response.code, response.message)
        return response

    async def _envelope(
        self, client: aiosmtplib.SMTP, sender: str, recipient: str, size: int
    ) -> aiosmtplib.SMTP:
        """MAIL FROM and RCPT TO, one after the other; the client.
        SMTPServerDisconnected passes through (the caller reconnects once)."""
        try:
            options = [f"SIZE={size}"] if client.supports_extension("size") else []
            await client.mail(sender, options=options)
            await client.rcpt(recipient)
            return client
        except aiosmtplib.SMTPServerDisconnected:
            raise
        except aiosmtplib.SMTPRecipientRefused as exc:
            await self._reset()
            raise _classify(
                exc.code, exc.message, f"recipient refused: {exc.code} {exc.message}"
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset()
            raise _classify(exc.code, exc.message, f"{exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise TransientSendError(f"smtp unavailable: {exc!r}") from exc

    async def _reset(self) -> None:
        """After a refused transaction, RSET so the connection can be reused."""
        try:
            if self._session is not None and self._session.is_connected:
                reply = await self._session.command(b"RSET")
                if reply.code != 250:
                    await self.close()
            elif self._client is not None and self._client.is_connected:
                await self._client.rset()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            await self.close()

    def _abort(self) -> None:
        """Drop a pipelined session that is inside DATA (see PipelinedSession.abort)."""
        session, self._session = self._session, None
        if session is not None:
            session.abort()

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.quit()
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
