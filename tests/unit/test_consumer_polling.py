"""How soon an idle consumer sees a record: the settings reach the Kafka client."""

from __future__ import annotations

from typing import Any

import pytest

from services.runtime.consumer import EventConsumer
from services.runtime.kafka import new_broker
from services.runtime.settings import NurtureSettings, SenderSettings, TrackerSettings


async def _ignore(conn: Any, events: list[Any]) -> None:
    del conn, events


def _consumer(**kwargs: Any) -> EventConsumer:
    return EventConsumer(
        service="svc",
        pool=None,  # never used: the consumer is not started
        broker=new_broker("127.0.0.1:1", "test"),
        handlers={"leads": _ignore},
        **kwargs,
    )


def test_an_idle_consumer_polls_every_20_ms_by_default_not_every_100() -> None:
    # faststream pauses as long as the poll's timeout after an empty poll: with its
    # 100 ms, a record reaching an idle consumer waited up to 200 ms more.
    subscriber: Any = _consumer().subscriber
    assert subscriber.batch_timeout_ms == 20
    assert subscriber._connection_args["fetch_max_wait_ms"] == 500


def test_the_sender_waits_less_on_the_brokers_long_poll_than_the_others() -> None:
    # StepDue is a send's last hop; the other consumers prefer larger batches.
    assert SenderSettings().kafka_fetch_max_wait_ms == 100
    assert NurtureSettings().kafka_fetch_max_wait_ms == 500
    assert TrackerSettings().kafka_fetch_max_wait_ms == 500


def test_the_poll_and_fetch_waits_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_POLL_TIMEOUT_MS", "5")
    monkeypatch.setenv("KAFKA_FETCH_MAX_WAIT_MS", "50")
    settings = SenderSettings()
    subscriber: Any = _consumer(
        poll_timeout_ms=settings.kafka_poll_timeout_ms,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    ).subscriber
    assert subscriber.batch_timeout_ms == 5
    assert subscriber._connection_args["fetch_max_wait_ms"] == 50


def test_a_poll_timeout_of_zero_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # Zero would make an idle consumer spin on empty polls.
    monkeypatch.setenv("KAFKA_POLL_TIMEOUT_MS", "0")
    with pytest.raises(ValueError, match="KAFKA_POLL_TIMEOUT_MS"):
        SenderSettings()
