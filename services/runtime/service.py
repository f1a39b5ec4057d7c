"""The service runner: one process = one service.

It connects to PostgreSQL (and applies the service's migrations under an
advisory lock), checks the service's topics exist, starts the consumer, the
outbox relay, the service's background loops and its HTTP face (with
``/healthz`` and ``/readyz``), and shuts all of it down in order on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import uuid
from collections.abc import Awaitable, Callable, Generator
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import asyncpg
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from faststream.kafka import KafkaBroker

from schemas import topics
from services.runtime.clock import Clock, clock_from_settings
from services.runtime.consumer import EventConsumer, TopicHandler
from services.runtime.db import create_pool, migrate
from services.runtime.kafka import missing_topics, new_broker
from services.runtime.outbox import OutboxRelay
from services.runtime.settings import CommonSettings

log = logging.getLogger(__name__)

S = TypeVar("S", bound=CommonSettings)
BackgroundLoop = Callable[[asyncio.Event], Awaitable[None]]


class StartupError(RuntimeError):
    """The service cannot start: what it depends on is unreachable or missing."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # The service runner owns signal handling.
        yield


class Service(Generic[S]):
    """Base of the four services. Subclasses declare topics, routes and loops."""

    name: ClassVar[str]
    migrations_dir: ClassVar[Path]

    def __init__(self, settings: S, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or clock_from_settings(
            settings.clock_speed, settings.clock_origin, settings.clock_start
        )
        self.instance_id = uuid.uuid4().hex[:12]
        self.stop_event = asyncio.Event()
        self.fatal: BaseException | None = None
        self._pool: asyncpg.Pool | None = None
        self._broker: KafkaBroker | None = None
        self.relay: OutboxRelay | None = None
        self.consumer: EventConsumer | None = None
        self.app = FastAPI(title=f"touchstream {self.name}", version="0.1.0")
        self._tasks: list[asyncio.Task[Any]] = []
        self._server: _Server | None = None
        self._add_health_routes()
        self.add_routes(self.app)

    # ------------------------------------------------------------ for subclasses

    def topic_handlers(self) -> dict[str, TopicHandler]:
        """Topic -> batch handler, applied inside the consumer's transaction."""
        return {}

    def after_commit(self) -> None:
        """Called after each applied batch is committed."""

    def add_routes(self, app: FastAPI) -> None:
        """Add the service's HTTP routes."""

    def background_loops(self) -> list[BackgroundLoop]:
        """Long-running loops (scheduler, dispatcher) that end when the event is set."""
        return []

    async def on_started(self) -> None:
        """Called once the pool and broker are up, before loops start."""

    # -------------------------------------------------------------------- access

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._pool

    @property
    def broker(self) -> KafkaBroker:
        if self._broker is None:
            raise RuntimeError(f"{self.name} is not started")
        return self._broker

    def wake_relay(self) -> None:
        if self.relay is not None:
            self.relay.wake()

    # ----------------------------------------------------------------- lifecycle

    def required_topics(self) -> list[str]:
        names = set(self.topic_handlers())
        names |= {topics.dlq(t) for t in self.topic_handlers()}
        return sorted(names | set(self.produced_topics()))

    def produced_topics(self) -> list[str]:
        return []

    async def start(self) -> None:
        settings = self.settings
        try:
            self._pool = await create_pool(
                settings.database_url, self.name, size=settings.database_pool_size
            )
        except Exception as exc:
            raise StartupError(str(exc)) from exc
        async with self.pool.acquire() as conn:
            await migrate(conn, self.name, self.migrations_dir)
        try:
            missing = await missing_topics(settings.kafka_bootstrap_servers, self.required_topics())
        except Exception as exc:
            raise StartupError(str(exc)) from exc
        if missing:
            raise StartupError(
                f"topics missing on {settings.kafka_bootstrap_servers}: {', '.join(missing)}"
                " (create them with `touchstream topics create`)"
            )
        self._broker = new_broker(settings.kafka_bootstrap_servers, f"touchstream-{self.name}")
        handlers = self.topic_handlers()
        if handlers:
            self.consumer = EventConsumer(
                service=self.name,
                pool=self.pool,
                broker=self.broker,
                handlers=handlers,
                after_commit=self._after_commit,
                max_batch=settings.kafka_max_batch,
                session_timeout_ms=settings.kafka_session_timeout_ms,
                fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
                poll_timeout_ms=settings.kafka_poll_timeout_ms,
                dlq_limit_ratio=settings.dlq_limit_ratio,
                dlq_limit_window=settings.dlq_limit_window,
                on_fatal=self._on_fatal,
                concurrency=settings.kafka_consumer_concurrency,
            )
        await self.on_started()
        try:
            await self.broker.start()
        except Exception as exc:
            raise StartupError(
                f"cannot start Kafka clients on {settings.kafka_bootstrap_servers}: {exc!r}"
            ) from exc
        self.relay = OutboxRelay(settings.database_url, self.name, self.broker)
        self._spawn(self.relay.run(self.stop_event), "outbox-relay")
        for loop in self.background_loops():
            self._spawn(loop(self.stop_event), getattr(loop, "__name__", "loop"))
        port = getattr(settings, "http_port", None)
        if port:
            config = uvicorn.Config(
                self.app,
                host=settings.http_host,
                port=int(port),
                log_level="warning",
                lifespan="off",
                access_log=False,
            )
            self._server = _Server(config)
            self._spawn(self._server.serve(), "http")
            for _ in range(100):
                if self._server.started:
                    break
                await asyncio.sleep(0.05)
        # What start-up allocated lives as long as the process: keep it out of the
        # collector's full passes, which otherwise pause the event loop for ~25 ms.
        gc.collect()
        gc.freeze()
        log.info("%s started (instance %s, http port %s)", self.name, self.instance_id, port)

    def _after_commit(self) -> None:
        self.wake_relay()
        self.after_commit()

    def _on_fatal(self, exc: BaseException) -> None:
        self.fatal = exc
        self.stop_event.set()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("%s: %s crashed", self.name, name)
                self._on_fatal(exc)

        self._tasks.append(asyncio.create_task(guarded(), name=f"{self.name}:{name}"))

    async def stop(self) -> None:
        """Graceful shutdown: stop taking work, finish what is in hand, close."""
        self.stop_event.set()
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.close()
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._broker.stop(), 15)
        if self._server is not None:
            self._server.should_exit = True
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=15)
            for task in pending:
                task.cancel()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
        log.info("%s stopped", self.name)

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT; the process exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_event.set)
        await self.start()
        await self.stop_event.wait()
        await self.stop()
        return 1 if self.fatal is not None else 0

    # -------------------------------------------------------------------- health

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), 2)
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"error: {exc!r}"
        try:
            kafka_ok = self._broker is not None and await self._broker.ping(2)
        except Exception:
            kafka_ok = False
        checks["kafka"] = "ok" if kafka_ok else "down"
        if self.consumer is not None:
            checks["consumer"] = {
                "applied": self.consumer.stats.applied,
                "dead_lettered": self.consumer.stats.dead_lettered,
                "duplicates": self.consumer.stats.duplicates,
            }
        if self.relay is not None:
            checks["outbox_relay"] = {
                "leader": self.relay.is_leader,
                "published": self.relay.published,
            }
        return checks

    def _add_health_routes(self) -> None:
        @self.app.get("/healthz", tags=["health"])
        async def healthz() -> dict[str, str]:
            return {"status": "ok", "service": self.name}

        @self.app.get("/readyz", tags=["health"])
        async def readyz() -> JSONResponse:
            if self._pool is None or self.stop_event.is_set():
                return JSONResponse({"status": "starting"}, status_code=503)
            checks = await self.readiness()
            ready = checks.get("database") == "ok" and checks.get("kafka") == "ok"
            return JSONResponse(
                {"status": "ready" if ready else "not ready", "checks": checks},
                status_code=200 if ready else 503,
            )
