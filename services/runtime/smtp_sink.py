"""An SMTP sink for the embedded stack and the tests: it accepts every message and
keeps each one as an ``.eml`` file a person can open.

Each file starts with ``X-Sink-*`` headers (envelope sender and recipients, wall
time of receipt) followed by the message exactly as received.

    python -m services.runtime.smtp_sink --port 1025 --dir .touchstream/mail
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class MaildirHandler:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = len(list(self.directory.glob("*.eml")))
        self._counter = itertools.count(existing + 1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        match = re.search(rb"^Message-ID:\s*<([^>]+)>", content, re.IGNORECASE | re.MULTILINE)
        label = (
            re.sub(r"[^A-Za-z0-9.-]", "_", match.group(1).decode(errors="replace"))[:60]
            if (match)
            else "no-id"
        )
        number = next(self._counter)
        header = (
            f"X-Sink-Mail-From: {envelope.mail_from}\r\n"
            f"X-Sink-Rcpt-To: {', '.join(envelope.rcpt_tos)}\r\n"
            f"X-Sink-Received-At: {time.time():.6f}\r\n"
        ).encode()
        target = self.directory / f"{number:07d}-{label}.eml"
        temporary = self.directory / f".{number:07d}.tmp"
        temporary.write_bytes(header + content)
        os.replace(temporary, target)
        return "250 2.0.0 OK: queued as " + f"{number:07d}"


async def serve(host: str, port: int, directory: Path, ready: asyncio.Event | None = None) -> None:
    handler = MaildirHandler(directory)
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return SMTP(handler, hostname="touchstream-sink", data_size_limit=50 * 1024 * 1024)

    server = await loop.create_server(factory, host, port, reuse_address=True)
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
