"""Kafka plumbing: the broker, publishing, topic administration."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from faststream.kafka import KafkaBroker

from schemas import topics

log = logging.getLogger(__name__)


class KafkaUnavailable(RuntimeError):
    """The Kafka cluster cannot be reached, or lacks the topics a service needs."""


@dataclass(frozen=True, slots=True)
class OutgoingRecord:
    topic: str
    key: bytes
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)


def new_broker(bootstrap_servers: str, client_id: str) -> KafkaBroker:
    """A broker whose producer waits for every in-sync replica (acks=all)."""
    return KafkaBroker(
        bootstrap_servers,
        client_id=client_id,
        acks="all",
        linger_ms=2,
        max_batch_size=1024 * 1024,
        logger=logging.getLogger(f"touchstream.kafka.{client_id}"),
    )


async def publish_all(broker: KafkaBroker, records: Sequence[OutgoingRecord]) -> None:
    """Publish records in order without awaiting each send, then wait for them all."""
    futures: list[asyncio.Future[Any]] = []
    for record in records:
        future = await broker.publish(
            record.value,
            record.topic,
            key=record.key,
            headers=record.headers,
            no_confirm=True,
        )
        futures.append(future)
    if futures:
        await asyncio.gather(*futures)


async def _admin(bootstrap_servers: str, timeout: float) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=int(timeout * 1000)
    )
    try:
        await asyncio.wait_for(admin.start(), timeout)
    except (KafkaError, OSError, TimeoutError) as exc:
        await admin.close()
        raise KafkaUnavailable(f"cannot reach Kafka at {bootstrap_servers}: {exc!r}") from exc
    return admin


async def create_topics(
    bootstrap_servers: str,
    partitions: int,
    replication: int = 1,
    names: Iterable[str] | None = None,
    timeout: float = 10.0,
) -> list[str]:
    """Create the topics that do not exist yet; return the names created."""
    wanted = list(names) if names is not None else topics.all_topics()
    admin = await _admin(bootstrap_servers, timeout)
    try:
        existing = set(await admin.list_topics())
        missing = [name for name in wanted if name not in existing]
        if missing:
            # Another process may win the race; that is the goal anyway.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(
                    [
                        NewTopic(
                            name,
                            partitions,
                            replication,
                            topic_configs=dict(topics.CONFIGS.get(name, {})),
                        )
                        for name in missing
                    ]
                )
        return missing
    finally:
        await admin.close()


async def missing_topics(
    bootstrap_servers: str, names: Iterable[str], timeout: float = 10.0
) -> list[str]:
    admin = await _admin(bootstrap_servers, timeout)
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    return [name for name in names if name not in existing]
