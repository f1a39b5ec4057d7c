"""``touchstream dev up | down | status``: the embedded stack for a laptop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from services.runtime.devstack import (
    DEFAULT_HTTP_PORTS,
    SERVICES,
    Stack,
    StackError,
    base_env,
    port_bindable,
    port_open,
)

T = TypeVar("T")

PREFERRED_PORTS = {"postgres": 55432, "kafka": 19092, "smtp": 1025}


def _start_on_port(name: str, start: Callable[[int | None], T]) -> T:
    """Start a part on its preferred port when that is free, else on any free port.

    The port can be taken between the probe and the server's bind (by a listener or a
    client connection using it as its local end); then the part starts again elsewhere.
    """
    preferred = PREFERRED_PORTS[name]
    if port_bindable(preferred):
        try:
            return start(preferred)
        except StackError as exc:
            if "already in use" not in str(exc).lower():
                raise
            print(f"touchstream: {name} port {preferred} was taken; starting on another")
    return start(None)  # a free port


def _http_ports() -> dict[str, int]:
    """Each service's HTTP port: the default, or ``<SERVICE>_HTTP_PORT`` when set."""
    ports: dict[str, int] = {}
    for name in SERVICES:
        variable = f"{name.upper()}_HTTP_PORT"
        value = os.environ.get(variable) or str(DEFAULT_HTTP_PORTS[name])
        if not value.isdigit() or not 0 < int(value) < 65536:
            raise ValueError(f"{variable} must be a port number, not {value!r}")
        ports[name] = int(value)
    return ports


def wait_ready(ports: dict[str, int], timeout: float = 60.0) -> dict[str, bool]:
    deadline = time.monotonic() + timeout
    ready = dict.fromkeys(ports, False)
    while time.monotonic() < deadline and not all(ready.values()):
        for name, port in ports.items():
            if ready[name]:
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    ready[name] = r.status == 200
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.2)
    return ready


def up(root: Path, clock_speed: float = 1.0) -> int:
    existing = Stack.load(root)
    if any(p.alive() for p in existing.processes.values()):
        print("the dev stack is already running (touchstream dev down stops it)")
        return status(root)
    if existing.processes:
        existing.stop_all()
    stack = Stack(root)
    root.mkdir(parents=True, exist_ok=True)
    try:
        http_ports = _http_ports()
    except ValueError as exc:
        print(f"touchstream: {exc}")
        return 2
    busy = [f"{n} ({p})" for n, p in http_ports.items() if port_open("127.0.0.1", p)]
    if busy:
        print(
            f"touchstream: HTTP ports in use: {', '.join(busy)}; stop what holds them"
            " or choose others (ROUTER_HTTP_PORT, NURTURE_HTTP_PORT, ...)"
        )
        return 2
    try:
        database_url = os.environ.get("DATABASE_URL") or _start_on_port(
            "postgres", stack.start_postgres
        )
        kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS") or _start_on_port(
            "kafka", stack.start_kafka
        )
        if os.environ.get("SMTP_HOST"):
            smtp_host, smtp_port = os.environ["SMTP_HOST"], int(os.environ.get("SMTP_PORT", "25"))
        else:
            # A fresh folder per run: `dev down` keeps the last run's mail to read.
            shutil.rmtree(stack.mail_dir, ignore_errors=True)
            smtp_host, smtp_port = _start_on_port("smtp", stack.start_smtp)
        env = base_env(
            database_url=database_url,
            kafka=kafka,
            smtp_host=smtp_host,
            smtp_port=smtp_port,
            clock_speed=clock_speed,
            http_ports=http_ports,
        )
        # Whatever the operator set wins over generated values.
        for key in (
            "TOUCHSTREAM_TRACKING_SECRET",
            "TRACKER_INBOUND_TOKEN",
            "NURTURE_WEBHOOK_SECRET",
            "TOUCHSTREAM_CLOCK_ORIGIN",
            "TOUCHSTREAM_TOPIC_PARTITIONS",
            "TRACKER_PUBLIC_URL",
        ):
            if os.environ.get(key):
                env[key] = os.environ[key]
        stack.env = env
        stack.save()
        from services.runtime.kafka import create_topics

        asyncio.run(create_topics(kafka, int(env["TOUCHSTREAM_TOPIC_PARTITIONS"])))
        for name in SERVICES:
            stack.start_service(name, env)
    except (StackError, OSError) as exc:
        print(f"touchstream: {exc}")
        stack.stop_all()
        return 2
    ready = wait_ready(http_ports)
    (root / "env").write_text("".join(f"export {k}={v!r}\n" for k, v in sorted(env.items())))
    _print_summary(stack, env)
    if not all(ready.values()):
        print(
            "not ready: "
            + ", ".join(n for n, ok in ready.items() if not ok)
            + f" (see {root}/logs)"
        )
        return 1
    return 0


def _print_summary(stack: Stack, env: dict[str, str]) -> None:
    print("touchstream dev stack is up")
    print(f"  PostgreSQL   {env['DATABASE_URL']}")
    print(f"  Kafka        {env['KAFKA_BOOTSTRAP_SERVERS']}")
    print(
        f"  SMTP sink    {env['SMTP_HOST']}:{env['SMTP_PORT']}"
        + (f"  (mail lands in {stack.mail_dir})" if "smtp" in stack.processes else "")
    )
    print(
        f"  clock        x{env['TOUCHSTREAM_CLOCK_SPEED']} from {env['TOUCHSTREAM_CLOCK_ORIGIN']}"
    )
    for name in SERVICES:
        port = env[f"{name.upper()}_HTTP_PORT"]
        print(f"  {name:<12} http://127.0.0.1:{port}  (/healthz, /readyz)")
    print(f"  logs         {stack.root / 'logs'}")
    print(f"  environment  source {stack.root / 'env'}")


def down(root: Path) -> int:
    stack = Stack.load(root)
    if not stack.processes:
        print("the dev stack is not running")
    names = list(stack.processes)
    stack.stop_all()
    # The mail the sink received stays for a person to open; the next `dev up`
    # starts a fresh folder.
    for folder in ("pgdata", "pgsock"):
        shutil.rmtree(root / folder, ignore_errors=True)
    if names:
        print(f"stopped: {', '.join(names)}")
    mail = sorted(stack.mail_dir.glob("*.eml")) if stack.mail_dir.is_dir() else []
    if mail:
        print(f"the {len(mail)} email(s) the SMTP sink received are kept in {stack.mail_dir}")
    return 0


def status(root: Path) -> int:
    stack = Stack.load(root)
    if not stack.processes:
        print("the dev stack is not running")
        return 1
    for name, record in stack.processes.items():
        print(f"  {name:<10} pid {record.pid:<8} {'running' if record.alive() else 'DEAD'}")
    print(
        json.dumps(
            {k: v for k, v in stack.env.items() if "SECRET" not in k and "TOKEN" not in k}, indent=2
        )
    )
    return 0 if all(p.alive() for p in stack.processes.values()) else 1
