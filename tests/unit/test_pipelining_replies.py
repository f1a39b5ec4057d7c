"""The pipelined session's reply reader: replies whole and in order, however the
bytes arrive; a broken server is an error, never a misread reply."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from services.sender.pipelining import MAX_LINE, _Replies


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


REPLIES = (
    b"250 2.1.0 Ok\r\n"
    b"250-first line\r\n250-second line\r\n250 2.1.5 last\r\n"
    b"354 End data with <CR><LF>.<CR><LF>\r\n"
)


@pytest.mark.parametrize("chunk", [1, 2, 7, len(REPLIES)])
async def test_replies_come_whole_and_in_order_however_they_arrive(chunk: int) -> None:
    reader = _Replies(_Transport())
    for at in range(0, len(REPLIES), chunk):
        reader.data_received(REPLIES[at : at + chunk])
    mail, rcpt, data = await reader.read(3, 1.0)
    assert mail == aiosmtplib.SMTPResponse(250, "2.1.0 Ok")
    assert rcpt == aiosmtplib.SMTPResponse(250, "first line\nsecond line\n2.1.5 last")
    assert data.code == 354
    assert not reader.pending()


async def test_a_reader_waits_for_replies_still_on_their_way() -> None:
    reader = _Replies(_Transport())
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, reader.data_received, b"250 Ok\r\n")
    loop.call_later(0.02, reader.data_received, b"354 Go ahead\r\n")
    replies = await reader.read(2, 1.0)
    assert [r.code for r in replies] == [250, 354]


async def test_a_missing_reply_times_out() -> None:
    reader = _Replies(_Transport())
    reader.data_received(b"250 Ok\r\n")
    with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
        await reader.read(2, 0.05)


async def test_replies_that_came_before_the_connection_ended_are_still_read() -> None:
    """A server may answer the message and hang up at once: its 250 counts."""
    reader = _Replies(_Transport())
    reader.data_received(b"250 2.0.0 queued\r\n")
    reader.eof_received()
    reader.connection_lost(None)
    assert [r.code for r in await reader.read(1, 1.0)] == [250]
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await reader.read(1, 1.0)


async def test_a_connection_lost_before_all_replies_fails_the_read() -> None:
    reader = _Replies(_Transport())
    reader.data_received(b"250 Ok\r\n")
    reader.connection_lost(None)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await reader.read(2, 1.0)


@pytest.mark.parametrize(
    "garbage",
    [b"hello there\r\n", b"2" * (MAX_LINE + 10), b"250-y\r\n" * 12000],
)
async def test_a_broken_server_is_an_error_and_the_connection_is_dropped(garbage: bytes) -> None:
    transport = _Transport()
    reader = _Replies(transport)
    reader.data_received(garbage)
    with pytest.raises(aiosmtplib.SMTPResponseException):
        await reader.read(1, 1.0)
    assert transport.aborted


async def test_extra_replies_show_as_pending() -> None:
    reader = _Replies(_Transport())
    reader.data_received(b"250 Ok\r\n250 unasked\r\n")
    await reader.read(1, 1.0)
    assert reader.pending()
