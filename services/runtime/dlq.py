"""Replaying dead letters: after a fix, put ``<topic>-dlq`` records back on ``<topic>``."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from schemas import topics
from services.runtime.kafka import KafkaUnavailable

log = logging.getLogger(__name__)


async def replay(
    bootstrap_servers: str,
    topic: str,
    *,
    limit: int | None = None,
    session_timeout_ms: int = 10_000,
    timeout: float = 60.0,
) -> int:
    """Re-publish the dead letters present now (key, value and original headers) and
    commit, so each dead letter is replayed once. Returns how many were replayed."""
    if topic not in topics.ALL:
        raise ValueError(f"unknown topic {topic!r}; topics: {', '.join(topics.ALL)}")
    dlq_topic = topics.dlq(topic)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers,
        group_id=f"touchstream-dlq-replay-{topic}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=session_timeout_ms,
        heartbeat_interval_ms=max(session_timeout_ms // 3, 300),
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    try:
        await consumer.start()
        await producer.start()
    except (KafkaError, OSError) as exc:
        await consumer.stop()
        await producer.stop()
        raise KafkaUnavailable(f"cannot reach Kafka at {bootstrap_servers}: {exc!r}") from exc
    replayed = 0
    try:
        partitions = consumer.partitions_for_topic(dlq_topic) or set()
        if not partitions:
            raise ValueError(f"topic {dlq_topic} does not exist")
        assigned = [TopicPartition(dlq_topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        for tp in assigned:
            committed = await consumer.committed(tp)
            if committed is not None:
                consumer.seek(tp, committed)
            else:
                await consumer.seek_to_beginning(tp)
        remaining = {tp for tp in assigned if await consumer.position(tp) < ends[tp]}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while remaining and (limit is None or replayed < limit):
            if loop.time() > deadline:
                raise TimeoutError(f"replay of {dlq_topic} did not finish in {timeout:.0f}s")
            batches = await consumer.getmany(timeout_ms=500, max_records=500)
            for tp, records in batches.items():
                for record in records:
                    if record.offset >= ends[tp] or (limit is not None and replayed >= limit):
                        continue
                    headers = [
                        (k, v) for k, v in (record.headers or ()) if not k.startswith("dlq-")
                    ]
                    headers.append(
                        (
                            "dlq-replayed-from",
                            f"{dlq_topic}:{tp.partition}:{record.offset}".encode(),
                        )
                    )
                    await producer.send_and_wait(
                        topic, record.value, key=record.key, headers=headers
                    )
                    replayed += 1
                    await consumer.commit({tp: record.offset + 1})
            remaining = {tp for tp in remaining if await consumer.position(tp) < ends[tp]}
    finally:
        await consumer.stop()
        await producer.stop()
    log.info("replayed %d record(s) from %s", replayed, dlq_topic)
    return replayed
