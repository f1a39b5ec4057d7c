"""An SMTP sink for the embedded stack and the tests: it accepts every message and
keeps each one as an ``.eml`` file a person can open.

Each file starts with ``X-Sink-*`` headers (envelope sender and recipients, wall
time of receipt) followed by the message exactly as received (dot-stuffing undone,
RFC 5321 section 4.5.2).

    python -m services.runtime.smtp_sink --port 1025 --dir .touchstream/mail

The server is a small RFC 5321 state machine on an asyncio protocol: EHLO/HELO, MAIL,
RCPT, DATA, RSET, NOOP, VRFY, HELP and QUIT, with PIPELINING (RFC 2920), 8BITMIME,
SMTPUTF8 and SIZE. It neither relays nor authenticates. It is lean on purpose: the
benchmarks run it on the same cores as the pipeline they measure, and a receiving
server's CPU is not something a sender pays for in production.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

HOSTNAME = "touchstream-sink"
DATA_SIZE_LIMIT = 50 * 1024 * 1024
COMMAND_LINE_LIMIT = 4096  # RFC 5321 asks for at least 512 octets; extensions add more
MAX_RECIPIENTS = 1000

_MESSAGE_ID = re.compile(rb"^Message-ID:\s*<([^>]+)>", re.IGNORECASE | re.MULTILINE)
_PATH = re.compile(r"^\s*<([^<>]*)>\s*(.*)$")
_SIZE = re.compile(r"(?:^|\s)SIZE=(\d+)(?:\s|$)", re.IGNORECASE)


class Mailbox:
    """Where accepted messages go: one ``.eml`` file each, written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = len(list(self.directory.glob("*.eml")))
        self._counter = itertools.count(existing + 1)

    def store(self, mail_from: str, rcpt_tos: list[str], content: bytes) -> str:
        match = _MESSAGE_ID.search(content)
        label = (
            re.sub(r"[^A-Za-z0-9.-]", "_", match.group(1).decode(errors="replace"))[:60]
            if match
            else "no-id"
        )
        number = next(self._counter)
        header = (
            f"X-Sink-Mail-From: {mail_from}\r\n"
            f"X-Sink-Rcpt-To: {', '.join(rcpt_tos)}\r\n"
            f"X-Sink-Received-At: {time.time():.6f}\r\n"
        ).encode()
        target = self.directory / f"{number:07d}-{label}.eml"
        temporary = self.directory / f".{number:07d}.tmp"
        temporary.write_bytes(header + content)
        os.replace(temporary, target)
        return f"{number:07d}"


@dataclass
class _Envelope:
    mail_from: str | None = None
    rcpt_tos: list[str] = field(default_factory=list)


class SmtpSession(asyncio.Protocol):
    """One client connection. Commands are answered in order as their lines arrive,
    so a pipelining client gets its replies in the order it sent the commands; the
    replies to what arrived together go out together (RFC 2920 3.2)."""

    def __init__(self, mailbox: Mailbox) -> None:
        self.mailbox = mailbox
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.greeted = False
        self.envelope = _Envelope()
        self.in_data = False
        self.data_too_big = False
        self.scanned = 0  # how far the buffer holds no end of DATA
        self.overlong = False  # inside a command line too long to keep
        self.replies: list[bytes] = []  # written when what arrived is taken

    # ----------------------------------------------------------------- transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._reply(f"220 {HOSTNAME} ESMTP touchstream sink")
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.buffer.clear()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        try:
            while self.transport is not None and self.buffer:
                if self.in_data:
                    if not self._take_message():
                        return
                elif not self._take_command():
                    return
        finally:
            self._flush()

    def _reply(self, text: str) -> None:
        self.replies.append(text.encode() + b"\r\n")

    def _flush(self) -> None:
        replies, self.replies = self.replies, []
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))

    # ---------------------------------------------------------------------- DATA

    def _take_message(self) -> bool:
        """Consume a whole message from the buffer when its end has arrived."""
        buffer = self.buffer
        if buffer.startswith(b".\r\n") and not self.data_too_big:
            end, content = 3, b""
        else:
            at = buffer.find(b"\r\n.\r\n", self.scanned)
            if at < 0:
                if len(buffer) > DATA_SIZE_LIMIT:
                    # Keep only what may hold the start of the terminator.
                    self.data_too_big = True
                    del buffer[:-4]
                self.scanned = max(0, len(buffer) - 4)  # a large message: scan once
                return False
            end, content = at + 5, bytes(buffer[: at + 2])
        del buffer[:end]
        self.in_data, self.scanned = False, 0
        envelope, self.envelope = self.envelope, _Envelope()
        if self.data_too_big or len(content) > DATA_SIZE_LIMIT:
            self.data_too_big = False
            self._reply("552 5.3.4 Error: too much mail data")
            return True
        # RFC 5321 4.5.2: a line's leading dot is removed.
        if content.startswith(b"."):
            content = content[1:]
        content = content.replace(b"\r\n.", b"\r\n")
        assert envelope.mail_from is not None
        queued = self.mailbox.store(envelope.mail_from, envelope.rcpt_tos, content)
        self._reply(f"250 2.0.0 OK: queued as {queued}")
        return True

    # ------------------------------------------------------------------ commands

    def _take_command(self) -> bool:
        at = self.buffer.find(b"\r\n")
        if at < 0:
            if len(self.buffer) > COMMAND_LINE_LIMIT:
                # Drop it as it comes; one reply when the line ends.
                self.overlong = True
                self.buffer.clear()
            return False
        line = bytes(self.buffer[:at]).decode("utf-8", errors="replace")
        del self.buffer[: at + 2]
        if self.overlong or at > COMMAND_LINE_LIMIT:
            self.overlong = False
            self._reply("500 5.5.2 Error: line too long")
            return True
        verb, _, arg = line.partition(" ")
        handler = getattr(self, f"_smtp_{verb.upper()}", None) if verb.isalpha() else None
        if handler is None:
            self._reply(f'500 5.5.1 Error: command "{verb.upper()[:20]}" not recognized')
        else:
            handler(arg.strip())
        return True

    def _smtp_EHLO(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 Syntax: EHLO hostname")
            return
        self.greeted, self.envelope = True, _Envelope()
        self._reply(
            f"250-{HOSTNAME}\r\n250-SIZE {DATA_SIZE_LIMIT}\r\n250-8BITMIME\r\n"
            "250-SMTPUTF8\r\n250-PIPELINING\r\n250 HELP"
        )

    def _smtp_HELO(self, arg: str) -> None:
        if not arg:
            self._reply("501 5.5.4 Syntax: HELO hostname")
            return
        self.greeted, self.envelope = True, _Envelope()
        self._reply(f"250 {HOSTNAME}")

    def _smtp_MAIL(self, arg: str) -> None:
        if not self.greeted:
            self._reply("503 5.5.1 Error: send HELO first")
            return
        if self.envelope.mail_from is not None:
            self._reply("503 5.5.1 Error: nested MAIL command")
            return
        path = self._path(arg, "FROM:")
        if path is None:
            self._reply("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        address, params = path
        size = _SIZE.search(params)
        if size and int(size.group(1)) > DATA_SIZE_LIMIT:
            self._reply("552 5.3.4 Error: message size exceeds fixed maximum message size")
            return
        self.envelope.mail_from = address
        self._reply("250 2.1.0 OK")

    def _smtp_RCPT(self, arg: str) -> None:
        if self.envelope.mail_from is None:
            self._reply("503 5.5.1 Error: need MAIL command")
            return
        path = self._path(arg, "TO:")
        if path is None or not path[0]:
            self._reply("501 5.5.4 Syntax: RCPT TO:<address>")
            return
        if len(self.envelope.rcpt_tos) >= MAX_RECIPIENTS:
            self._reply("452 4.5.3 Error: too many recipients")
            return
        self.envelope.rcpt_tos.append(path[0])
        self._reply("250 2.1.5 OK")

    def _smtp_DATA(self, arg: str) -> None:
        if not self.envelope.rcpt_tos:
            self._reply("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            self._reply("501 5.5.4 Syntax: DATA")
            return
        self.in_data = True
        self._reply("354 End data with <CR><LF>.<CR><LF>")

    def _smtp_RSET(self, arg: str) -> None:
        self.envelope = _Envelope()
        self._reply("250 2.0.0 OK")

    def _smtp_NOOP(self, arg: str) -> None:
        self._reply("250 2.0.0 OK")

    def _smtp_VRFY(self, arg: str) -> None:
        self._reply("252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery")

    def _smtp_HELP(self, arg: str) -> None:
        self._reply("250 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY")

    def _smtp_QUIT(self, arg: str) -> None:
        self._reply("221 2.0.0 Bye")
        self._flush()
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    @staticmethod
    def _path(arg: str, keyword: str) -> tuple[str, str] | None:
        """``FROM:<address> params`` -> (address, params); None when malformed."""
        if arg[: len(keyword)].upper() != keyword:
            return None
        match = _PATH.match(arg[len(keyword) :])
        return (match.group(1), match.group(2)) if match else None


async def serve(host: str, port: int, directory: Path, ready: asyncio.Event | None = None) -> None:
    mailbox = Mailbox(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SmtpSession(mailbox), host, port, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.dir))


if __name__ == "__main__":
    main()
