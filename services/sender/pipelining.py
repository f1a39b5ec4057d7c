"""SMTP command pipelining (RFC 2920) for the transaction phase of a session.

aiosmtplib opens the session: the greeting, EHLO, STARTTLS or implicit TLS, AUTH.
Its protocol reads one reply per command written, and drops a reply that arrives
before the next read is armed, so it cannot pipeline. When the server offers
PIPELINING, the session's transport is handed to :class:`PipelinedSession`, which
writes MAIL FROM, RCPT TO and DATA together and reads their replies in order: one
round trip for the envelope instead of three, and one write each way.

The next message's envelope may follow a message in the same write (RFC 2920 3.1:
the message content may begin a group, DATA ends one). Its replies arrive with the
message's and are read when that envelope is asked for: with a run of messages on
one connection, one round trip per message.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

#: Longest reply line (RFC 5321 4.5.3.1.5: 512 octets) we tolerate, with room to
#: spare; a longer one, or a reply of too many lines, is a broken server.
MAX_LINE = 8192
MAX_REPLY = 64 * 1024
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class _Replies(asyncio.Protocol):
    """Collects the server's replies, whole and in order, however they arrive."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport: asyncio.Transport | None = transport
        self._buffer = bytearray()
        self._replies: deque[aiosmtplib.SMTPResponse] = deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (reply := self._parse()) is not None:
                self._replies.append(reply)
        except aiosmtplib.SMTPResponseException as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.abort()
            return
        if self._replies:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("the server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(aiosmtplib.SMTPServerDisconnected(f"connection lost: {exc or 'closed'}"))

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> aiosmtplib.SMTPResponse | None:
        """One complete reply off the buffer (RFC 5321 4.2: "250-..." lines, then
        "250 ..."), or None while it is incomplete."""
        lines: list[bytes] = []
        offset = 0
        while True:
            end = self._buffer.find(b"\n", offset)
            if end < 0:
                if len(self._buffer) - offset > MAX_LINE or len(self._buffer) > MAX_REPLY:
                    raise aiosmtplib.SMTPResponseException(-1, "reply too long")
                return None
            line = bytes(self._buffer[offset : end + 1])
            offset = end + 1
            if len(line) > MAX_LINE or offset > MAX_REPLY:
                raise aiosmtplib.SMTPResponseException(-1, "reply too long")
            if not line[:3].isdigit():
                text = line.decode("utf-8", "replace").strip()
                raise aiosmtplib.SMTPResponseException(-1, f"malformed reply line: {text!r}")
            lines.append(line)
            if line[3:4] != b"-":
                break
        del self._buffer[:offset]
        code = int(lines[-1][:3])
        text = "\n".join(
            line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape") for line in lines
        )
        return aiosmtplib.SMTPResponse(code, text)

    async def read(self, count: int, timeout: float) -> list[aiosmtplib.SMTPResponse]:
        """The next ``count`` replies. SMTPServerDisconnected if the connection ends
        first; SMTPReadTimeoutError if they take longer than ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._replies) < count:
            if self._error is not None:
                raise self._error
            self._waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, max(0.0, deadline - loop.time()))
            except TimeoutError as exc:
                raise aiosmtplib.SMTPReadTimeoutError("timed out waiting for the server") from exc
            finally:
                self._waiter = None
        return [self._replies.popleft() for _ in range(count)]

    def pending(self) -> bool:
        """Unread replies: a server that says more than it was asked is out of step."""
        return bool(self._replies or self._buffer)


class PipelinedSession:
    """An SMTP session, past EHLO (and TLS and AUTH), that pipelines its transactions.

    Takes the connection over from ``client``; the client must not be used again."""

    def __init__(self, client: aiosmtplib.SMTP, timeout: float) -> None:
        protocol = client.protocol
        transport = protocol.transport if protocol is not None else None
        if not isinstance(transport, asyncio.Transport) or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost before pipelining")
        self._replies = _Replies(transport)
        transport.set_protocol(self._replies)
        self.timeout = timeout
        self.extensions = {name.lower() for name in client.esmtp_extensions}
        #: An envelope written after the last message: its three replies are unread.
        self._ahead: bytes | None = None

    @property
    def is_connected(self) -> bool:
        transport = self._replies.transport
        return transport is not None and not transport.is_closing() and not self._failed

    @property
    def _failed(self) -> bool:
        return self._replies._error is not None

    def supports_extension(self, name: str) -> bool:
        return name.lower() in self.extensions

    def _write(self, data: bytes) -> None:
        transport = self._replies.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        transport.write(data)

    @staticmethod
    def envelope_lines(sender: str, recipient: str, options: list[str]) -> bytes:
        """MAIL FROM, RCPT TO and DATA as written; ValueError for a control character."""
        mail = b"MAIL FROM:" + quote_address(sender).encode("ascii")
        if options:
            mail += b" " + " ".join(options).encode("ascii")
        rcpt = b"RCPT TO:" + quote_address(recipient).encode("ascii")
        for line in (mail, rcpt):
            if _CONTROL.search(line):
                raise ValueError("an address holds a control character")
        return mail + b"\r\n" + rcpt + b"\r\nDATA\r\n"

    async def envelope(
        self, sender: str, recipient: str, options: list[str]
    ) -> tuple[aiosmtplib.SMTPResponse, aiosmtplib.SMTPResponse, aiosmtplib.SMTPResponse]:
        """MAIL FROM, RCPT TO and DATA in one write: their three replies. A server
        refusing MAIL or RCPT refuses DATA too (RFC 2920 3.1); should it answer DATA
        with 354 all the same, the caller must not send a message (see ``abort``).

        If this very envelope was written ahead (``message``), only its replies are
        read. One written ahead for another message leaves the session in a
        transaction it cannot take back: the connection is dropped
        (SMTPServerDisconnected: the caller reconnects)."""
        lines = self.envelope_lines(sender, recipient, options)
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead != lines:
            self.abort()
            raise aiosmtplib.SMTPServerDisconnected(
                "an envelope written ahead was not used: reconnecting"
            )
        if ahead is None:
            if self._replies.pending():
                raise aiosmtplib.SMTPServerDisconnected("the server is out of step: reconnecting")
            self._write(lines)
        first, second, third = await self._replies.read(3, self.timeout)
        return first, second, third

    async def message(self, data: bytes, ahead: bytes | None = None) -> aiosmtplib.SMTPResponse:
        """After DATA's 354: the message, dot-stuffed, and the server's reply. With
        ``ahead`` (``envelope_lines`` of the next message), that envelope goes out in
        the same write; ``envelope`` for the same message reads its replies."""
        payload = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data))
        if not payload.endswith(b"\r\n"):
            payload += b"\r\n"
        payload += b".\r\n"
        self._write(payload + ahead if ahead is not None else payload)
        self._ahead = ahead
        (reply,) = await self._replies.read(1, self.timeout)
        return reply

    async def command(self, line: bytes) -> aiosmtplib.SMTPResponse:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            # An envelope written ahead, never used: a server that took it waits for
            # a message now (354), and only a drop gets out of that.
            *_, start = await self._replies.read(3, self.timeout)
            if start.code == 354:
                self.abort()
                raise aiosmtplib.SMTPServerDisconnected("left inside DATA: dropped")
        self._write(line + b"\r\n")
        (reply,) = await self._replies.read(1, self.timeout)
        return reply

    def abort(self) -> None:
        """Drop the connection: the only way out of DATA without sending a message (a
        server discards a message whose end never came)."""
        transport = self._replies.transport
        if transport is not None:
            transport.abort()

    async def quit(self) -> None:
        try:
            if self.is_connected:
                await asyncio.wait_for(self.command(b"QUIT"), min(self.timeout, 5.0))
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            transport = self._replies.transport
            if transport is not None:
                transport.close()
