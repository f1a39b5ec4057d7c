"""``touchstream demo``: publish a handful of leads to the running dev stack and show
a person what happened: emails at the SMTP sink, enrollments stopped by a reply and
an unsubscribe, lead statuses, a malformed lead in the dead-letter topic."""

from __future__ import annotations

import asyncio
import email
import email.utils
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from email.message import Message
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from schemas import topics
from schemas.events import LeadData, LeadReceived
from services.runtime.devstack import DEFAULT_HTTP_PORTS, Stack

DEMO_LEADS = [
    (
        "ada",
        LeadData(
            email="ada@example.com",
            first_name="Ada",
            last_name="Lovelace",
            company="Analytical Engines",
            title="CTO",
            timezone="Europe/London",
            external_id="crm-ada",
        ),
        "aggressive_close",
    ),
    (
        "grace",
        LeadData(
            email="grace@example.com",
            first_name="Grace",
            last_name="Hopper",
            company="Compilers Inc",
            title="VP Engineering",
            timezone="America/New_York",
            external_id="crm-grace",
        ),
        "aggressive_close",
    ),
    (
        "alan",
        LeadData(
            email="alan@example.org",
            first_name="Alan",
            last_name="Turing",
            company="Bletchley Labs",
            title="Head of Research",
            external_id="crm-alan",
        ),
        "regular_nurture",
    ),
    (
        "edsger",
        LeadData(
            email="EDSGER@Example.NET ",
            first_name=" Edsger ",
            company=None,
            external_id="crm-edsger",
        ),
        None,
    ),
]


def _get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
        return json.loads(response.read())


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _sink_messages(mail_dir: Path) -> list[Message]:
    return [email.message_from_bytes(p.read_bytes()) for p in sorted(mail_dir.glob("*.eml"))]


def _to(message: Message) -> str:
    return email.utils.parseaddr(str(message["To"]))[1]


def _reply_to(message: Message, text: str) -> bytes:
    return (
        f"From: {message['To']}\r\nTo: {message['From']}\r\n"
        f"Subject: Re: {message['Subject']}\r\nMessage-ID: <{uuid.uuid4()}@reply.example>\r\n"
        f"In-Reply-To: {message['Message-ID']}\r\nReferences: {message['Message-ID']}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n\r\n" + text + "\r\n"
    ).encode()


async def _publish(bootstrap: str) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for _name, lead, sequence in DEMO_LEADS:
            event = LeadReceived(lead=lead, sequence=sequence)
            await producer.send_and_wait(topics.LEADS, event.to_bytes(), key=event.kafka_key())
        await producer.send_and_wait(
            topics.LEADS,
            b'{"event_type": "LeadReceived", "lead": {"email": "not-an-address"}}',
            key=b"broken",
        )
    finally:
        await producer.stop()


def run(root: Path) -> int:
    stack = Stack.load(root)
    if not stack.processes or not stack.env:
        print("the dev stack is not running: start it with `touchstream dev up`")
        return 2
    env = stack.env
    speed = float(env.get("TOUCHSTREAM_CLOCK_SPEED", "1"))
    if speed < 3600:
        print(
            f"the dev stack runs at clock speed x{speed:g}; the demo needs a fast clock:"
            " TOUCHSTREAM_CLOCK_SPEED=86400 touchstream dev up"
        )
        return 2
    mail_dir = stack.mail_dir
    inbound_token = env["TRACKER_INBOUND_TOKEN"]
    tracker = f"http://127.0.0.1:{DEFAULT_HTTP_PORTS['tracker']}"
    already = len(list(mail_dir.glob("*.eml")))
    print(f"publishing {len(DEMO_LEADS)} leads and one malformed message to `leads` ...")
    asyncio.run(_publish(env["KAFKA_BOOTSTRAP_SERVERS"]))

    replied = unsubscribed = False
    deadline = time.monotonic() + 90
    ada_done = False
    while time.monotonic() < deadline and not (replied and unsubscribed and ada_done):
        messages = _sink_messages(mail_dir)[already:]
        for message in messages:
            if _to(message) == "grace@example.com" and not replied:
                status = _post(
                    f"{tracker}/webhooks/inbound",
                    _reply_to(message, "Sounds good, let's talk Tuesday."),
                    {"Content-Type": "message/rfc822", "Authorization": f"Bearer {inbound_token}"},
                )
                print(f"  grace replied to {message['Subject']!r} -> HTTP {status}")
                replied = True
            if _to(message) == "alan@example.org" and not unsubscribed:
                url = str(message["List-Unsubscribe"]).split(",")[0].strip().strip("<>")
                status = _post(
                    url,
                    b"List-Unsubscribe=One-Click",
                    {"Content-Type": "application/x-www-form-urlencoded"},
                )
                print(f"  alan clicked one-click unsubscribe -> HTTP {status}")
                unsubscribed = True
        ada = _lead("ada@example.com")
        if ada is not None:
            enrollments = _get(DEFAULT_HTTP_PORTS["nurture"], f"/enrollments?lead_id={ada['id']}")
            ada_done = any(e["status"] == "completed" for e in enrollments["items"])
        time.sleep(0.3)
    time.sleep(2)  # let the last engagement events land
    _report(mail_dir, already)
    letters = asyncio.run(_dead_letters(env["KAFKA_BOOTSTRAP_SERVERS"]))
    broken = [reason for key, reason in letters if key == b"broken"]
    if broken:
        print(f"\nthe malformed lead went to the dead-letter topic `leads-dlq`: {broken[-1]}")
        print("`touchstream dlq replay leads` puts dead letters back after a fix.")
    else:
        print("\nthe malformed lead is not in `leads-dlq` (yet): check the router's log")
    return 0 if (replied and unsubscribed and ada_done and broken) else 1


async def _dead_letters(bootstrap: str, timeout: float = 10.0) -> list[tuple[bytes, str]]:
    """(key, reason) of every record on ``leads-dlq``, read from the beginning."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        dlq = topics.dlq(topics.LEADS)
        partitions = [TopicPartition(dlq, p) for p in consumer.partitions_for_topic(dlq) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        letters: list[tuple[bytes, str]] = []
        deadline = time.monotonic() + timeout

        async def behind() -> bool:
            return any([await consumer.position(tp) < end for tp, end in ends.items()])

        while time.monotonic() < deadline and await behind():
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for record in records:
                    headers = dict(record.headers or ())
                    reason = headers.get("dlq-reason", b"").decode(errors="replace")
                    letters.append((record.key or b"", reason))
        return letters
    finally:
        await consumer.stop()


def _lead(address: str) -> dict[str, Any] | None:
    query = urllib.parse.urlencode({"email": address})
    items = _get(DEFAULT_HTTP_PORTS["router"], f"/leads?{query}")["items"]
    return items[0] if items else None


def _report(mail_dir: Path, already: int) -> None:
    print("\nemails at the SMTP sink (" + str(mail_dir) + "):")
    for message in _sink_messages(mail_dir)[already:]:
        threaded = " (threaded)" if message["In-Reply-To"] else ""
        print(f"  {_to(message):<22} {message['Subject']}{threaded}")
    print("\nleads and their enrollments:")
    for _name, lead, _sequence in DEMO_LEADS:
        stored = _lead(lead.email.strip().lower())
        if stored is None:
            print(f"  {lead.email}: not stored")
            continue
        enrollments = _get(DEFAULT_HTTP_PORTS["nurture"], f"/enrollments?lead_id={stored['id']}")
        for e in enrollments["items"]:
            stop = f", stop reason: {e['stop_reason']}" if e["stop_reason"] else ""
            print(
                f"  {stored['email']:<22} lead status {stored['status']:<10}"
                f" {e['sequence']:<17} {e['status']}{stop}"
            )
