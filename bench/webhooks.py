"""Webhook ingest: signed SendGrid event batches posted to a tracker process at a
steady rate; every request is verified (ECDSA P-256) and written to `webhooks-raw`
before it is answered. Prints events/s sustained and request latency percentiles.
Baseline in the same run: the same requests to the tracker's /healthz (the HTTP
floor of the machine), so the figure says what verification and publishing cost.

    python -m bench.webhooks [--rate 2000] [--seconds 15] [--batch 10]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from schemas import topics
from services.runtime.devstack import Stack, base_env, free_port, wait_for_port
from services.runtime.kafka import create_topics


def _keys() -> tuple[ec.EllipticCurvePrivateKey, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return key, base64.b64encode(public).decode()


def _batch(size: int) -> bytes:
    now = int(time.time())
    return json.dumps(
        [
            {
                "email": f"lead{uuid.uuid4().hex[:8]}@example.com",
                "timestamp": now,
                "event": "open",
                "sg_event_id": uuid.uuid4().hex,
                "sg_message_id": uuid.uuid4().hex,
                "useragent": "Mozilla/5.0 (Windows NT 10.0)",
                "ip": "203.0.113.9",
                "delivery_key": f"{uuid.uuid4()}:0",
            }
            for _ in range(size)
        ]
    ).encode()


async def _drive(
    url: str, key: ec.EllipticCurvePrivateKey | None, rate: float, seconds: float, batch: int
) -> tuple[list[float], int, float, list[float]]:
    """Post at ``rate`` events/s for ``seconds``; latencies (s), failures, elapsed, and
    the latencies counted from each request's scheduled time (so a client that falls
    behind does not hide the server's queueing)."""
    requests_per_second = rate / batch
    total = int(requests_per_second * seconds)
    latencies: list[float] = []
    scheduled: list[float] = []
    failures = 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:

        async def one(body: bytes, due: float) -> None:
            nonlocal failures
            headers = {"Content-Type": "application/json"}
            if key is not None:
                ts = str(int(time.time()))
                signature = key.sign(ts.encode() + body, ec.ECDSA(hashes.SHA256()))
                headers["X-Twilio-Email-Event-Webhook-Signature"] = base64.b64encode(
                    signature
                ).decode()
                headers["X-Twilio-Email-Event-Webhook-Timestamp"] = ts
            started = time.perf_counter()
            try:
                response = await (
                    client.post(url, content=body, headers=headers) if key else client.get(url)
                )
                if response.status_code >= 300:
                    failures += 1
            except httpx.HTTPError:
                failures += 1
            finished = time.perf_counter()
            latencies.append(finished - started)
            scheduled.append(finished - due)

        bodies = [_batch(batch) for _ in range(min(total, 2000))]
        tasks = []
        start = time.perf_counter()
        for n in range(total):
            target = start + n / requests_per_second
            delay = target - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(bodies[n % len(bodies)], target)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return latencies, failures, elapsed, scheduled


async def _records_on(kafka: str, topic: str) -> int:
    """Records on ``topic`` (the sum of its partitions' end offsets)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else 0.0


async def run(rate: float, seconds: float, batch: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="touchstream-bench-"))
    stack = Stack(root)
    try:
        database_url = await asyncio.to_thread(stack.start_postgres)
        kafka = await asyncio.to_thread(stack.start_kafka)
        await create_topics(kafka, 4)
        key, public = _keys()
        port = free_port()
        env = base_env(
            database_url=database_url,
            kafka=kafka,
            smtp_host="127.0.0.1",
            smtp_port=free_port(),
            clock_speed=1,
            http_ports={
                "router": free_port(),
                "nurture": free_port(),
                "sender": free_port(),
                "tracker": port,
            },
            extra={"TRACKER_SENDGRID_PUBLIC_KEY": public, "TOUCHSTREAM_LOG_LEVEL": "WARNING"},
        )
        stack.start_service("tracker", env, wait=False)
        await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 60, None, "tracker", None)
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:
            for _ in range(300):
                if (await client.get(f"{base}/readyz")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
        warm, warm_failures, _, _ = await _drive(f"{base}/webhooks/sendgrid", key, rate, 2, batch)
        floor, floor_failures, _, _ = await _drive(
            f"{base}/healthz", None, rate, seconds / 3, batch
        )
        latencies, failures, elapsed, scheduled = await _drive(
            f"{base}/webhooks/sendgrid", key, rate, seconds, batch
        )
        written = await _records_on(kafka, topics.WEBHOOKS_RAW)
        events = len(latencies) * batch
        result = {
            "events_per_second": events / elapsed,
            "requests_per_second": len(latencies) / elapsed,
            "p50_ms": _pct(latencies, 0.5) * 1000,
            "p99_ms": _pct(latencies, 0.99) * 1000,
            "p99_scheduled_ms": _pct(scheduled, 0.99) * 1000,
            "posted": len(warm) - warm_failures + len(latencies) - failures,
            "written": written,
            "max_ms": max(latencies) * 1000,
            "failures": failures,
            "floor_p99_ms": _pct(floor, 0.99) * 1000,
            "floor_failures": floor_failures,
        }
        return result
    finally:
        stack.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, default=2000, help="events per second")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--batch", type=int, default=10, help="events per request")
    args = parser.parse_args()
    r = asyncio.run(run(args.rate, args.seconds, args.batch))
    print(
        f"webhook ingest (SendGrid, ECDSA-verified, {args.batch} events/request,"
        f" target {args.rate:.0f} events/s for {args.seconds:.0f} s):"
    )
    print(
        f"  sustained       : {r['events_per_second']:8.0f} events/s"
        f" ({r['requests_per_second']:.0f} requests/s), failures {r['failures']:.0f}"
    )
    print(
        f"  latency         : p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms,"
        f" max {r['max_ms']:.1f} ms; p99 from the scheduled send {r['p99_scheduled_ms']:.1f} ms"
    )
    print(
        f"  webhooks-raw    : {r['written']:.0f} records for {r['posted']:.0f} accepted requests"
        + (" (all written)" if r["written"] == r["posted"] else " (MISSING records)")
    )
    print(f"  baseline /healthz at the same request rate: p99 {r['floor_p99_ms']:.1f} ms")
    print(
        f"  ratio           : p99 {r['p99_ms'] / max(r['floor_p99_ms'], 0.001):.1f}x the"
        " HTTP floor; target p99 < 50 ms"
    )


if __name__ == "__main__":
    main()
