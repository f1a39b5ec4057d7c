"""Handing messages to an SMTP server (aiosmtplib), one reused connection."""

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

    async def send(self, message: BuiltMessage, gate: HandOffGate | None = None) -> Accepted: ...

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
    """A persistent SMTP connection, reopened when the server drops it."""

    def __init__(self, config: SmtpConfig, name: str = "smtp") -> None:
        self.name = name
        self.config = config
        self._client: aiosmtplib.SMTP | None = None
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
        if c.username:
            await client.login(c.username, c.password or "")
        return client

    async def send(self, message: BuiltMessage, gate: HandOffGate | None = None) -> Accepted:
        return await self.send_raw(message.from_email, message.to_email, message.data, gate)

    async def send_raw(
        self, sender: str, recipient: str, data: bytes, gate: HandOffGate | None = None
    ) -> Accepted:
        """MAIL FROM and RCPT TO first; then ``gate``; then DATA. A refusal of the
        envelope (e.g. 550 5.1.1 at RCPT) is raised before the gate: nothing left."""
        async with self._lock:
            for attempt in (1, 2):
                try:
                    client = await self._envelope(sender, recipient, len(data))
                except aiosmtplib.SMTPServerDisconnected as exc:
                    # A pooled connection the server had closed: once more, afresh.
                    self._client = None
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

    async def _envelope(self, sender: str, recipient: str, size: int) -> aiosmtplib.SMTP:
        """Connect if needed, then MAIL FROM and RCPT TO; the connected client.
        SMTPServerDisconnected passes through (the caller reconnects once)."""
        try:
            if self._client is None or not self._client.is_connected:
                self._client = await self._connect()
            client = self._client
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
        except aiosmtplib.SMTPAuthenticationError as exc:
            # Our credentials, not this message: try another transport, or later.
            await self.close()
            raise TransientSendError(
                f"authentication failed: {exc.code} {exc.message}", exc.code
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            await self._reset()
            raise _classify(exc.code, exc.message, f"{exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await self.close()
            raise TransientSendError(f"smtp unavailable: {exc!r}") from exc

    async def _reset(self) -> None:
        """After a refused transaction, RSET so the connection can be reused."""
        if self._client is not None and self._client.is_connected:
            try:
                await self._client.rset()
            except (aiosmtplib.SMTPException, OSError):
                await self.close()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
