"""Fixtures for tests that run one service in-process on the real stack."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from aiokafka import AIOKafkaProducer

from schemas.events import Event
from services.nurture.app import NurtureService
from services.runtime.devstack import free_port
from services.runtime.kafka import create_topics
from services.runtime.settings import NurtureSettings

Publish = Callable[[str, Event], Awaitable[None]]


@pytest.fixture
async def nurture(
    database_url: str, kafka_bootstrap: str, nurture_settings: dict[str, Any]
) -> AsyncIterator[NurtureService]:
    await create_topics(kafka_bootstrap, 2)
    port = free_port()
    service = NurtureService(
        NurtureSettings(
            database_url=database_url,
            kafka_bootstrap_servers=kafka_bootstrap,
            kafka_session_timeout_ms=3000,
            http_port=port,
            http_host="127.0.0.1",
            **nurture_settings,
        )
    )
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


@pytest.fixture
async def client(nurture: NurtureService) -> AsyncIterator[httpx.AsyncClient]:
    port = nurture.settings.http_port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        yield c


@pytest.fixture
def nurture_settings() -> dict[str, Any]:
    """Extra NurtureSettings for a test module to override."""
    return {}


@pytest.fixture
async def publish(kafka_bootstrap: str) -> AsyncIterator[Publish]:
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()

    async def send(topic: str, event: Event) -> None:
        await producer.send_and_wait(topic, event.to_bytes(), key=event.kafka_key())

    try:
        yield send
    finally:
        await producer.stop()
