"""The embedded stack's SMTP sink (services/runtime/smtp_sink.py) over real sockets:
what it accepts, how it answers out-of-order commands, and what it writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from email import message_from_bytes
from pathlib import Path

import aiosmtplib
import pytest

from services.runtime import smtp_sink
from services.runtime.devstack import free_port

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def sink(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    port, mail = free_port(), tmp_path / "mail"
    ready = asyncio.Event()
    task = asyncio.create_task(smtp_sink.serve("127.0.0.1", port, mail, ready))
    await asyncio.wait_for(ready.wait(), 10)
    yield port, mail
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def stored(mail: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(mail.glob("*.eml"))]


async def converse(port: int, payload: bytes, replies: int) -> list[bytes]:
    """Write ``payload`` at once (pipelined) and read ``replies`` final reply lines."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines: list[bytes] = []
        greeting = await reader.readline()
        assert greeting.startswith(b"220 ")
        writer.write(payload)
        await writer.drain()
        while len(lines) < replies:
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line, f"connection closed after {lines}"
            if line[3:4] != b"-":
                lines.append(line.rstrip(b"\r\n"))
        return lines
    finally:
        writer.close()


async def test_messages_over_one_connection_are_kept_exactly(sink: tuple[int, Path]) -> None:
    port, mail = sink
    body = (
        b"Message-ID: <one@touchstream.test>\r\nSubject: Hello\r\n\r\n"
        b".a line that starts with a dot\r\n..two dots\r\n.\r\nend\r\n"
    )
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    await client.connect()
    assert client.supports_extension("pipelining") and client.supports_extension("8bitmime")
    await client.sendmail("from@acme.example", ["a@example.org", "b@example.org"], body)
    await client.sendmail("from@acme.example", ["c@example.org"], b"Subject: No id\r\n\r\nhi")
    await client.quit()

    first, second = stored(mail)
    head, _, content = first.partition(b"X-Sink-Received-At: ")
    assert head == (
        b"X-Sink-Mail-From: from@acme.example\r\nX-Sink-Rcpt-To: a@example.org, b@example.org\r\n"
    )
    assert content.split(b"\r\n", 1)[1] == body  # dot-stuffing undone, byte for byte
    assert message_from_bytes(second)["X-Sink-Rcpt-To"] == "c@example.org"
    assert second.endswith(b"Subject: No id\r\n\r\nhi\r\n")
    names = sorted(p.name for p in mail.glob("*.eml"))
    assert names[0] == "0000001-one_touchstream.test.eml" and names[1] == "0000002-no-id.eml"
    assert not list(mail.glob(".*.tmp"))


async def test_pipelined_commands_are_answered_in_order(sink: tuple[int, Path]) -> None:
    port, mail = sink
    replies = await converse(
        port,
        b"EHLO client.example\r\nMAIL FROM:<s@acme.example> SIZE=40 BODY=8BITMIME\r\n"
        b"RCPT TO:<r@example.org>\r\nDATA\r\nSubject: piped\r\n\r\nbody\r\n.\r\n"
        b"MAIL FROM:<>\r\nRCPT TO:<r2@example.org>\r\nDATA\r\n.\r\nQUIT\r\n",
        10,
    )
    assert [r[:3] for r in replies] == [
        b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221",
    ]  # fmt: skip
    first, empty = stored(mail)
    assert first.endswith(b"\r\nSubject: piped\r\n\r\nbody\r\n")
    assert b"X-Sink-Mail-From: \r\n" in empty  # the null reverse-path of a bounce
    _, _, received = empty.partition(b"X-Sink-Received-At: ")
    assert received.count(b"\r\n") == 1 and received.endswith(b"\r\n")  # an empty message


async def test_commands_out_of_order_or_malformed_are_refused(sink: tuple[int, Path]) -> None:
    port, mail = sink
    replies = await converse(
        port,
        b"MAIL FROM:<a@b.example>\r\n"  # before HELO
        b"HELO client.example\r\n"
        b"RCPT TO:<r@example.org>\r\n"  # before MAIL
        b"DATA\r\n"  # before RCPT
        b"MAIL TO:<a@b.example>\r\n"  # wrong keyword
        b"MAIL FROM:<a@b.example> SIZE=999999999999\r\n"  # over the size limit
        b"MAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n"  # nested
        b"RSET\r\nRCPT TO:<r@example.org>\r\n"  # RSET ends the transaction
        b"FROB\r\nEHLO\r\nNOOP\r\nQUIT\r\n",
        14,
    )
    assert [r[:3] for r in replies] == [
        b"503", b"250", b"503", b"503", b"501", b"552", b"250", b"503",
        b"250", b"503", b"500", b"501", b"250", b"221",
    ]  # fmt: skip
    assert stored(mail) == []


async def test_a_message_arriving_byte_by_byte_is_whole(sink: tuple[int, Path]) -> None:
    port, mail = sink
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    script = b"HELO x\r\nMAIL FROM:<s@a.example>\r\nRCPT TO:<r@b.example>\r\nDATA\r\n"
    body = b"Subject: slow\r\n\r\n" + b"x" * 3000 + b"\r\n..\r\n"
    for byte in script + body + b".\r\n":
        writer.write(bytes([byte]))
        await writer.drain()
    for _ in range(4):
        await reader.readline()
    assert (await reader.readline()).startswith(b"250 2.0.0 OK: queued as 0000001")
    writer.close()
    (message,) = stored(mail)
    assert message.endswith(b"Subject: slow\r\n\r\n" + b"x" * 3000 + b"\r\n.\r\n")


async def test_an_overlong_command_line_is_refused_and_the_session_goes_on(
    sink: tuple[int, Path],
) -> None:
    port, _ = sink
    replies = await converse(port, b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n", 2)
    assert [r[:3] for r in replies] == [b"500", b"250"]


async def test_an_overlong_line_arriving_in_pieces_gets_one_reply(sink: tuple[int, Path]) -> None:
    port, _ = sink
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    writer.write(b"NOOP " + b"x" * 6000)
    await writer.drain()
    await asyncio.sleep(0.05)  # the first piece is read on its own
    writer.write(b"y" * 3000 + b"\r\nNOOP\r\nQUIT\r\n")
    await writer.drain()
    replies = [await asyncio.wait_for(reader.readline(), 5) for _ in range(3)]
    writer.close()
    assert [r[:3] for r in replies] == [b"500", b"250", b"221"]
