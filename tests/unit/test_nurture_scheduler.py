"""The nurture scheduler's round sizes: small after an idle round, doubling up to
NURTURE_SCHEDULER_BATCH while rounds come back full (the rounds' SQL is covered by
the integration tests; here the database is a stand-in that counts due rows)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.nurture import app as nurture_app
from services.nurture.app import NurtureService
from services.runtime.settings import NurtureSettings


class _Conn:
    def transaction(self) -> contextlib.AbstractAsyncContextManager[None]:
        return contextlib.nullcontext()


class _Pool:
    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_Conn]:
        yield _Conn()


async def test_rounds_start_small_after_idle_and_double_up_to_the_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = NurtureService(NurtureSettings(scheduler_batch=800, scheduler_idle_seconds=0.05))
    service._pool = _Pool()
    due = [3000]
    limits: list[int] = []
    stop = asyncio.Event()

    async def run_due(conn: Any, *, now: Any, limit: int, steps: Any) -> int:
        limits.append(limit)
        claimed = min(limit, due[0])
        due[0] -= claimed
        if len(limits) == 8:  # the launch is over, then one more is due: a new launch
            due[0] = 150
        if len(limits) == 12:
            stop.set()
        return claimed

    monkeypatch.setattr(nurture_app.handlers, "run_due", run_due)
    await asyncio.wait_for(service.scheduler(stop), 10)
    # 3000 due: 100, 200, 400, then full batches; the round that takes the last 700
    # ends the run, and the rounds after it start small again (150 due later: 100,
    # then 200 of which 50 came).
    assert limits == [100, 200, 400, 800, 800, 800, 100, 100, 100, 200, 100, 100]
