"""Handing messages to an SMTP server (aiosmtplib), one reused connection."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Protocol

import aiosmtplib

from services.sender.mime import BuiltMessage

log = logging.getLogger(__name__)


class SendError(Exception):
    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientSendError(SendError):
    """Try again later: 4xx, throttling, connection trouble."""


class PermanentSendError(SendError):
    """The server refused this message for good (5xx)."""


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
    (4xx, throttling, HTTP 429/5xx, network trouble: try later or elsewhere) or
    PermanentSendError (5xx SMTP, provider rejection of this message: do not retry).
    """

    name: str

    async def send(self, message: BuiltMessage) -> Accepted: ...

    async def close(self) -> None: ...


#: 5xx replies about our session, not the message: TLS or authentication required,
#: credentials rejected. Another transport, or a fixed configuration, can deliver.
SESSION_CODES = frozenset({523, 530, 534, 535, 538})


def _classify(code: int | None, message: str) -> SendError:
    if code is not None and 500 <= code < 600 and code not in SESSION_CODES:
        return PermanentSendError(message, code)
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

    async def send(self, message: BuiltMessage) -> Accepted:
        return await self.send_raw(message.from_email, message.to_email, message.data)

    async def send_raw(self, sender: str, recipient: str, data: bytes) -> Accepted:
        async with self._lock:
            for attempt in (1, 2):
                try:
                    if self._client is None or not self._client.is_connected:
                        self._client = await self._connect()
                    _refused, response = await self._client.sendmail(sender, [recipient], data)
                    return Accepted(250, response)
                except aiosmtplib.SMTPRecipientsRefused as exc:
                    refusal = exc.recipients[0] if exc.recipients else None
                    code = refusal.code if refusal is not None else None
                    text = refusal.message if refusal is not None else str(exc)
                    await self._reset()
                    raise _classify(code, f"recipient refused: {code} {text}") from exc
                except aiosmtplib.SMTPAuthenticationError as exc:
                    # Our credentials, not this message: try another transport, or later.
                    await self.close()
                    raise TransientSendError(
                        f"authentication failed: {exc.code} {exc.message}", exc.code
                    ) from exc
                except aiosmtplib.SMTPServerDisconnected as exc:
                    self._client = None
                    if attempt == 2:
                        raise TransientSendError(f"server disconnected: {exc}") from exc
                except aiosmtplib.SMTPResponseException as exc:
                    await self._reset()
                    raise _classify(exc.code, f"{exc.code} {exc.message}") from exc
                except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
                    await self.close()
                    raise TransientSendError(f"smtp unavailable: {exc!r}") from exc
        raise TransientSendError("unreachable")  # pragma: no cover

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
