"""The operator's commands: fail fast, idempotent topic creation, DLQ replay."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import topics
from services.runtime.devstack import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def touchstream(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.runtime.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_run_fails_fast_when_the_database_is_unreachable() -> None:
    started = time.monotonic()
    result = touchstream(
        "run",
        "router",
        env={
            "DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none",
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
        },
    )
    assert result.returncode == 2, result.stderr
    assert "cannot reach PostgreSQL" in result.stderr
    assert time.monotonic() - started < 30


def test_run_fails_fast_when_kafka_is_unreachable(database_url: str) -> None:
    result = touchstream(
        "run",
        "router",
        env={"DATABASE_URL": database_url, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"},
    )
    assert result.returncode == 2, result.stderr
    assert "cannot reach Kafka" in result.stderr


def test_run_names_missing_topics_and_topics_create_is_idempotent(
    database_url: str, kafka_bootstrap: str
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "TOUCHSTREAM_TOPIC_PARTITIONS": "3",
    }
    result = touchstream("run", "nurture", env=env)
    assert result.returncode == 2
    assert "topics missing" in result.stderr and "touchstream topics create" in result.stderr

    first = touchstream("topics", "create", env=env)
    assert first.returncode == 0, first.stderr
    assert f"created {len(topics.all_topics())} topic(s)" in first.stdout
    second = touchstream("topics", "create", env=env)
    assert second.returncode == 0 and "all existed" in second.stdout


def test_migrate_applies_each_schema_once(database_url: str) -> None:
    env = {"DATABASE_URL": database_url}
    first = touchstream("migrate", env=env)
    assert first.returncode == 0, first.stderr
    router_files = 1 + len(list((ROOT / "services/router/migrations").glob("*.sql")))
    assert f"router: {router_files} migration(s) applied" in first.stdout
    second = touchstream("migrate", "router", "sender", env=env)
    assert second.returncode == 0
    assert "router: 0 migration(s) applied" in second.stdout
    assert "sender: 0 migration(s) applied" in second.stdout


async def test_dlq_replay_puts_dead_letters_back_once(kafka_bootstrap: str) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "KAFKA_SESSION_TIMEOUT_MS": "3000"}
    assert (await asyncio.to_thread(touchstream, "topics", "create", env=env)).returncode == 0
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await producer.start()
    marker = uuid.uuid4().hex.encode()
    try:
        for n in range(2):
            await producer.send_and_wait(
                topics.dlq(topics.LEADS),
                marker + b"-%d" % n,
                key=b"k%d" % n,
                headers=[("dlq-reason", b"invalid event: test"), ("event_type", b"LeadReceived")],
            )
    finally:
        await producer.stop()

    first = await asyncio.to_thread(touchstream, "dlq", "replay", "leads", env=env)
    assert first.returncode == 0, first.stderr
    assert "replayed 2 dead letter(s) from leads-dlq to leads" in first.stdout
    second = await asyncio.to_thread(touchstream, "dlq", "replay", "leads", env=env)
    assert "replayed 0 dead letter(s)" in second.stdout

    consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topics.LEADS) or set()
        consumer.assign([TopicPartition(topics.LEADS, p) for p in partitions])
        await consumer.seek_to_beginning()
        found = []
        deadline = time.monotonic() + 10
        while len(found) < 2 and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=300)).values():
                found += [r for r in records if r.value.startswith(marker)]
    finally:
        await consumer.stop()
    assert sorted(r.value for r in found) == [marker + b"-0", marker + b"-1"]
    for record in found:
        headers = dict(record.headers)
        assert "dlq-reason" not in headers
        assert headers["event_type"] == b"LeadReceived"
        assert headers["dlq-replayed-from"].startswith(b"leads-dlq:")


def test_replay_of_an_unknown_topic_is_refused(kafka_bootstrap: str) -> None:
    result = touchstream("dlq", "replay", "nope", env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    assert result.returncode == 2
    assert "unknown topic 'nope'" in result.stderr


def test_sigterm_shuts_a_service_down_gracefully(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    import signal

    from services.runtime.devstack import wait_for_port

    env = {
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "ROUTER_HTTP_PORT": str(free_port()),
        "KAFKA_SESSION_TIMEOUT_MS": "3000",
    }
    assert touchstream("topics", "create", env=env).returncode == 0
    log = tmp_path / "router.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.runtime.cli", "run", "router"],
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        wait_for_port("127.0.0.1", int(env["ROUTER_HTTP_PORT"]), 60, proc, "router", log)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        assert time.monotonic() - started < 20
        assert "router stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
