"""A whole deployment for an end-to-end test: the four services as separate
processes on the real stack (PostgreSQL, a Kafka-protocol broker, an SMTP sink),
with a fast clock. Assertions look at what reached the SMTP sink and at the
tables, never at log lines."""

from __future__ import annotations

import asyncio
import email
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from email.message import Message
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import topics
from schemas.events import LeadData, LeadReceived
from services.runtime.devstack import SERVICES, Stack, base_env, free_port, wait_for_port
from services.runtime.kafka import create_topics

T = TypeVar("T")


class Deployment:
    def __init__(
        self,
        stack: Stack,
        *,
        database_url: str,
        kafka: str,
        smtp: tuple[str, int] | None,
        clock_speed: float,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.stack = stack
        self.database_url = database_url
        self.kafka = kafka
        if smtp is None:
            smtp = stack.start_smtp()
            self.mail_dir: Path | None = stack.mail_dir
        else:
            self.mail_dir = None
        self.ports = {name: free_port() for name in SERVICES}
        self.env = base_env(
            database_url=database_url,
            kafka=kafka,
            smtp_host=smtp[0],
            smtp_port=smtp[1],
            clock_speed=clock_speed,
            http_ports=self.ports,
            extra={
                "KAFKA_SESSION_TIMEOUT_MS": "3000",
                "SENDER_LEASE_SECONDS": "3",
                "TOUCHSTREAM_LOG_LEVEL": "INFO",
                **(extra_env or {}),
            },
        )
        self._producer: AIOKafkaProducer | None = None
        self.replicas: dict[str, str] = {}

    # ------------------------------------------------------------------ lifecycle

    async def start(self, services: tuple[str, ...] = SERVICES) -> None:
        await create_topics(self.kafka, int(self.env["TOUCHSTREAM_TOPIC_PARTITIONS"]))
        for name in services:
            self.stack.start_service(name, self.env, wait=False)
        for name in services:
            await self.wait_ready(name)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.kafka, acks="all")
        await self._producer.start()

    async def wait_ready(self, name: str, timeout: float = 60) -> None:
        record = self.stack.processes[name]
        await asyncio.to_thread(
            wait_for_port, "127.0.0.1", self.ports[name], timeout, None, name, Path(record.log)
        )
        await self.eventually(lambda: self._ready(name), timeout=timeout, what=f"{name} ready")

    async def start_replica(self, service: str, name: str) -> None:
        """Another process of ``service``, labelled ``name``, on its own HTTP port."""
        self.ports[name] = free_port()
        self.replicas[name] = service
        self.stack.start_service(
            name,
            {**self.env, f"{service.upper()}_HTTP_PORT": str(self.ports[name])},
            wait=False,
            service=service,
        )
        await self.wait_ready(name)

    async def _ready(self, name: str) -> bool:
        try:
            async with httpx.AsyncClient() as client:
                response = await client.get(self.url(name, "/readyz"), timeout=2)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    async def close(self) -> None:
        """Stop the producer and every service process (before the database goes)."""
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        for name in [*SERVICES, *self.replicas]:
            if name in self.stack.processes:
                await asyncio.to_thread(self.stack.stop, name)

    def kill(self, name: str) -> None:
        """SIGKILL a service, as a crash would."""
        self.stack.kill(name)

    async def restart(self, name: str) -> None:
        self.stack.processes.pop(name, None)
        service = self.replicas.get(name, name)
        env = {**self.env, f"{service.upper()}_HTTP_PORT": str(self.ports[name])}
        self.stack.start_service(name, env, wait=False, service=service)
        await self.wait_ready(name)

    # ------------------------------------------------------------------- helpers

    def url(self, service: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}{path}"

    async def publish(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        assert self._producer is not None
        await self._producer.send_and_wait(topic, value, key=key)

    async def publish_lead(
        self, email_address: str, sequence: str | None = "aggressive_close", **fields: Any
    ) -> LeadReceived:
        event = LeadReceived(lead=LeadData(email=email_address, **fields), sequence=sequence)
        await self.publish(topics.LEADS, event.to_bytes(), event.kafka_key())
        return event

    def mail(self) -> list[Message]:
        assert self.mail_dir is not None, "the SMTP server is external: mail cannot be read"
        return [
            email.message_from_bytes(p.read_bytes()) for p in sorted(self.mail_dir.glob("*.eml"))
        ]

    def mail_to(self, address: str) -> list[Message]:
        return [m for m in self.mail() if address in str(m["To"])]

    async def eventually(
        self,
        check: Callable[[], Awaitable[T] | T],
        *,
        timeout: float = 30,
        interval: float = 0.1,
        what: str = "condition",
    ) -> T:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(interval)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()

    async def fetchval(self, query: str, *args: Any) -> Any:
        rows = await self.fetch(query, *args)
        return rows[0][0] if rows else None

    async def get(self, service: str, path: str, **params: Any) -> Any:
        async with httpx.AsyncClient() as client:
            response = await client.get(self.url(service, path), params=params, timeout=10)
        response.raise_for_status()
        return response.json()

    async def sequence_known(self, key: str, tenant_id: str = "default") -> None:
        """Wait until the router's catalog has ``key`` active (nurture announces its
        sequences through the `sequences` topic: the router learns of them a moment
        after they change, and refuses leads for sequences it does not know yet)."""

        async def active() -> bool:
            catalog = await self.get("router", "/sequences", tenant_id=tenant_id)
            return any(s["key"] == key and s["status"] == "active" for s in catalog["items"])

        await self.eventually(active, what=f"the router to know sequence {key!r}")

    async def lead(self, address: str) -> dict[str, Any] | None:
        items = (await self.get("router", "/leads", email=address))["items"]
        return items[0] if items else None

    async def enrollments(self, address: str) -> list[dict[str, Any]]:
        lead = await self.lead(address)
        if lead is None:
            return []
        return list((await self.get("nurture", "/enrollments", lead_id=lead["id"]))["items"])

    async def dead_letters(self, topic: str, expect: int, timeout: float = 20) -> list[Any]:
        """Read ``expect`` records from ``<topic>-dlq`` (fails if they do not come)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.kafka,
            group_id=f"test-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            dlq = topics.dlq(topic)
            partitions = consumer.partitions_for_topic(dlq) or set()
            consumer.assign([TopicPartition(dlq, p) for p in partitions])
            await consumer.seek_to_beginning()
            records: list[Any] = []
            deadline = time.monotonic() + timeout
            while len(records) < expect and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=300)
                for items in batch.values():
                    records.extend(items)
            return records
        finally:
            await consumer.stop()

    def reply_to(self, message: Message, body: str = "Yes, let's talk.") -> bytes:
        return (
            f"From: {message['To']}\r\nTo: {message['From']}\r\n"
            f"Subject: Re: {message['Subject']}\r\n"
            f"Message-ID: <{uuid.uuid4()}@reply.example>\r\n"
            f"In-Reply-To: {message['Message-ID']}\r\nReferences: {message['Message-ID']}\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
        ).encode()

    async def post_reply(self, message: Message) -> httpx.Response:
        async with httpx.AsyncClient() as client:
            return await client.post(
                self.url("tracker", "/webhooks/inbound"),
                content=self.reply_to(message),
                headers={
                    "Content-Type": "message/rfc822",
                    "Authorization": f"Bearer {self.env['TRACKER_INBOUND_TOKEN']}",
                },
                timeout=10,
            )

    def log_tail(self, name: str, chars: int = 3000) -> str:
        return Path(self.stack.root / "logs" / f"{name}.log").read_text()[-chars:]

    def dump_logs(self) -> str:
        return "\n".join(
            f"===== {name}\n{self.log_tail(name)}"
            for name in SERVICES
            if name in self.stack.processes
        )


def body_text(message: Message) -> str:
    for part in message.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return payload.decode(part.get_content_charset() or "utf-8")
    raise AssertionError("no text/plain part")


def as_json(value: Any) -> str:
    return json.dumps(value, default=str, indent=2)
