"""The operator's commands: fail fast, idempotent topic creation, DLQ replay."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import topics
from services.runtime.devstack import SERVICES, ProcessRecord, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def touchstream(
    *args: str, env: dict[str, str], timeout: float = 60, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.runtime.cli", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
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


def test_dev_up_starts_the_stack_and_dev_down_stops_exactly_it(tmp_path: Path) -> None:
    """`touchstream dev up` in a fresh folder: PostgreSQL, the broker, the SMTP sink and
    the four services as background processes on a fast clock; a lead goes through to
    the sink; `dev down` stops exactly the recorded processes and keeps the mail."""
    ports = {name: free_port() for name in SERVICES}
    env = {f"{name.upper()}_HTTP_PORT": str(port) for name, port in ports.items()}
    env["TOUCHSTREAM_CLOCK_SPEED"] = "86400"
    dev_dir = tmp_path / ".touchstream" / "dev"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    stopped = False
    try:
        up = touchstream("dev", "up", env=env, cwd=tmp_path, timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        for port in ports.values():
            assert f"http://127.0.0.1:{port}" in up.stdout, up.stdout
        state = json.loads((dev_dir / "state.json").read_text())
        records = [ProcessRecord(**record) for record in state["processes"].values()]
        embedded = {
            "postgres": "DATABASE_URL",
            "kafka": "KAFKA_BOOTSTRAP_SERVERS",
            "smtp": "SMTP_HOST",
        }
        expected = set(SERVICES) | {n for n, var in embedded.items() if not os.environ.get(var)}
        assert {r.name for r in records} == expected
        assert all(r.alive() for r in records)
        assert state["env"]["TOUCHSTREAM_CLOCK_SPEED"] == "86400.0"
        assert state["env"]["TOUCHSTREAM_CLOCK_ORIGIN"]

        for name, port in ports.items():
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert health.status_code == 200
            assert health.json() == {"status": "ok", "service": name}
        assert touchstream("dev", "status", env=env, cwd=tmp_path).returncode == 0

        mail_dir = dev_dir / "mail"
        if "smtp" in expected:
            posted = httpx.post(
                f"http://127.0.0.1:{ports['router']}/leads",
                json={"lead": {"email": "ada@example.com", "first_name": "Ada"}},
                timeout=10,
            )
            assert posted.status_code == 201, posted.text
            deadline = time.monotonic() + 60
            while not list(mail_dir.glob("*.eml")):
                assert time.monotonic() < deadline, "no email reached the sink"
                time.sleep(0.2)

        down = touchstream("dev", "down", env=env, cwd=tmp_path)
        stopped = True
        assert down.returncode == 0, down.stderr
        assert f"stopped: {', '.join(r.name for r in records)}" in down.stdout
        for record in records:
            assert not record.alive(), f"{record.name} (pid {record.pid}) still runs"
        assert bystander.poll() is None, "dev down stopped a process it did not start"
        assert json.loads((dev_dir / "state.json").read_text())["processes"] == {}
        if "smtp" in expected:
            # The mail stays for a person to read after the stack is gone.
            assert list(mail_dir.glob("*.eml"))
            assert str(mail_dir) in down.stdout
        again = touchstream("dev", "status", env=env, cwd=tmp_path)
        assert again.returncode == 1 and "not running" in again.stdout
    finally:
        if not stopped:
            touchstream("dev", "down", env=env, cwd=tmp_path)
        bystander.kill()
        bystander.wait()
