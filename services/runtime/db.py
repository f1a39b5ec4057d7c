"""PostgreSQL: the connection pool and forward-only migrations per service schema."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

RUNTIME_MIGRATIONS = Path(__file__).parent / "migrations"


#: Sessions whose statements look rows up by key, a handful at a time: for them the
#: only good plan is an index scan. Without these, a plan PostgreSQL caches while a
#: table is nearly empty (a generic plan, chosen after five executions) keeps
#: scanning the whole table once it has grown, until the table is next analyzed.
INDEX_LOOKUPS = {"enable_seqscan": "off", "enable_hashjoin": "off", "enable_mergejoin": "off"}


class DatabaseUnavailable(RuntimeError):
    """PostgreSQL cannot be reached."""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for type_name in ("json", "jsonb"):
        await conn.set_type_codec(
            type_name, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
        )


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Released connections go back to the pool as they are, without asyncpg's reset
    query (a round trip on every release: UNLISTEN, RESET ALL, advisory unlocks):
    services change no session state on pooled connections (SET LOCAL only, advisory
    locks released where taken, LISTEN on connections of their own). An open
    transaction is still rolled back by the pool before this is called."""


async def create_pool(
    dsn: str,
    schema: str,
    *,
    size: int = 10,
    connect_timeout: float = 10.0,
    settings: dict[str, str] | None = None,
) -> asyncpg.Pool:
    """A pool whose connections work in ``schema`` (the service's own slice), with
    ``settings`` for every session of its own."""
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            timeout=connect_timeout,
            init=_init_connection,
            reset=_keep_session,
            server_settings={
                "search_path": schema,
                "application_name": f"touchstream-{schema}",
                **(settings or {}),
            },
        )
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {_redact(dsn)}: {exc}") from exc
    assert pool is not None
    return pool


def _redact(dsn: str) -> str:
    if "@" not in dsn or "://" not in dsn:
        return dsn
    scheme, rest = dsn.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else dsn


def _lock_key(schema: str) -> int:
    digest = hashlib.sha256(f"touchstream-migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def migration_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.sql") if p.name[:4].isdigit())


async def migrate(conn: asyncpg.Connection, schema: str, directory: Path) -> list[str]:
    """Apply the runtime's and the service's pending migrations to ``schema``.

    Runs under a session advisory lock, so any number of replicas may start at
    once; each file is applied in its own transaction and recorded with its
    checksum. An applied file whose content changed is an error: migrations are
    forward-only.
    """
    applied_now: list[str] = []
    key = _lock_key(schema)
    await conn.execute("SELECT pg_advisory_lock($1)", key)
    try:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(
            f"""CREATE TABLE IF NOT EXISTS "{schema}".schema_migrations (
                    name text PRIMARY KEY,
                    checksum text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        rows = await conn.fetch(f'SELECT name, checksum FROM "{schema}".schema_migrations')
        done = {r["name"]: r["checksum"] for r in rows}
        files = [("runtime/", p) for p in migration_files(RUNTIME_MIGRATIONS)]
        files += [("", p) for p in migration_files(directory)]
        for prefix, path in files:
            name = prefix + path.name
            sql = path.read_text()
            checksum = hashlib.sha256(sql.encode()).hexdigest()
            if name in done:
                if done[name] != checksum:
                    raise RuntimeError(
                        f"migration {schema}/{name} changed after it was applied; "
                        "migrations are forward-only: add a new file instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(f'SET LOCAL search_path TO "{schema}"')
                await conn.execute(sql)
                await conn.execute(
                    f'INSERT INTO "{schema}".schema_migrations (name, checksum) VALUES ($1, $2)',
                    name,
                    checksum,
                )
            log.info("applied migration %s/%s", schema, name)
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)
    return applied_now


async def migrate_dsn(dsn: str, schema: str, directory: Path, timeout: float = 10.0) -> list[str]:
    try:
        conn = await asyncpg.connect(dsn, timeout=timeout)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {_redact(dsn)}: {exc}") from exc
    try:
        return await migrate(conn, schema, directory)
    finally:
        await conn.close()


def record_to_dict(record: asyncpg.Record | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None
