"""The ``touchstream`` command.

touchstream run <service>          run one service (what a container runs)
touchstream migrate [service ...]  apply migrations and exit
touchstream topics create          create the topics (idempotent)
touchstream dlq replay <topic>     put dead letters of <topic> back on <topic>
touchstream dev up | down | status the embedded stack, no Docker
touchstream demo                   publish demo leads to the running dev stack
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

SERVICES = ("router", "nurture", "sender", "tracker")
DEV_DIR = Path(".touchstream") / "dev"


def _service_class(name: str) -> Any:
    if name == "router":
        from services.router.app import RouterService

        return RouterService
    if name == "nurture":
        from services.nurture.app import NurtureService

        return NurtureService
    if name == "sender":
        from services.sender.app import SenderService

        return SenderService
    if name == "tracker":
        from services.tracker.app import TrackerService

        return TrackerService
    raise SystemExit(f"unknown service {name!r}; choose one of {', '.join(SERVICES)}")


def _settings_for(name: str) -> Any:
    from services.runtime import settings

    return {
        "router": settings.RouterSettings,
        "nurture": settings.NurtureSettings,
        "sender": settings.SenderSettings,
        "tracker": settings.TrackerSettings,
    }[name]()


def _fail(message: str) -> int:
    print(f"touchstream: {message}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    from services.runtime.logs import setup_logging
    from services.runtime.service import StartupError

    settings = _settings_for(args.service)
    setup_logging(args.service, settings.log_level, settings.log_json)
    try:
        service = _service_class(args.service)(settings)
    except ValueError as exc:
        return _fail(f"{args.service}: {exc}")

    async def main() -> int:
        try:
            return int(await service.run())
        except StartupError as exc:
            await service.stop()
            return _fail(f"{args.service} cannot start: {exc}")

    return asyncio.run(main())


def cmd_migrate(args: argparse.Namespace) -> int:
    from services.runtime.db import DatabaseUnavailable, migrate_dsn
    from services.runtime.settings import CommonSettings

    settings = CommonSettings()
    names = args.services or list(SERVICES)

    async def main() -> None:
        for name in names:
            cls = _service_class(name)
            applied = await migrate_dsn(settings.database_url, cls.name, cls.migrations_dir)
            print(
                f"{name}: {len(applied)} migration(s) applied"
                + (f" ({', '.join(applied)})" if applied else "")
            )

    try:
        asyncio.run(main())
    except DatabaseUnavailable as exc:
        return _fail(str(exc))
    return 0


def cmd_topics_create(args: argparse.Namespace) -> int:
    from services.runtime.kafka import KafkaUnavailable, create_topics
    from services.runtime.settings import CommonSettings

    settings = CommonSettings()
    partitions = args.partitions or settings.topic_partitions
    try:
        created = asyncio.run(
            create_topics(settings.kafka_bootstrap_servers, partitions, settings.topic_replication)
        )
    except KafkaUnavailable as exc:
        return _fail(str(exc))
    print(
        f"created {len(created)} topic(s)"
        + (f": {', '.join(created)}" if created else " (all existed)")
    )
    return 0


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    from aiokafka.errors import KafkaError

    from services.runtime.dlq import replay
    from services.runtime.kafka import KafkaUnavailable
    from services.runtime.settings import CommonSettings

    settings = CommonSettings()
    try:
        count = asyncio.run(
            replay(
                settings.kafka_bootstrap_servers,
                args.topic,
                limit=args.limit,
                session_timeout_ms=settings.kafka_session_timeout_ms,
            )
        )
    except (KafkaUnavailable, ValueError) as exc:
        return _fail(str(exc))
    except (TimeoutError, KafkaError) as exc:
        # Each letter's offset is committed right after it is re-published: what went
        # back before the failure stays replayed once, and a new run resumes after it.
        return _fail(
            f"replay of {args.topic}-dlq stopped: the broker did not answer in time"
            f" ({exc!r}); letters replayed so far are not replayed again, run the"
            " command again to continue"
        )
    print(f"replayed {count} dead letter(s) from {args.topic}-dlq to {args.topic}")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from services.runtime import devcli

    if args.action == "up":
        return devcli.up(DEV_DIR, clock_speed=args.clock_speed)
    if args.action == "down":
        return devcli.down(DEV_DIR)
    return devcli.status(DEV_DIR)


def cmd_demo(args: argparse.Namespace) -> int:
    from services.runtime import demo

    return demo.run(DEV_DIR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="touchstream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run one service")
    run.add_argument("service", choices=SERVICES)
    run.set_defaults(func=cmd_run)

    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("services", nargs="*", help="default: all four")
    migrate.set_defaults(func=cmd_migrate)

    topics = sub.add_parser("topics", help="manage Kafka topics")
    topics_sub = topics.add_subparsers(dest="action", required=True)
    create = topics_sub.add_parser("create", help="create every topic (idempotent)")
    create.add_argument("--partitions", type=int, default=None)
    create.set_defaults(func=cmd_topics_create)

    dlq = sub.add_parser("dlq", help="dead-letter topics")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    replay = dlq_sub.add_parser("replay", help="put dead letters back on their topic")
    replay.add_argument("topic", help="the original topic, e.g. leads")
    replay.add_argument("--limit", type=int, default=None)
    replay.set_defaults(func=cmd_dlq_replay)

    dev = sub.add_parser("dev", help="the embedded stack (no Docker)")
    dev.add_argument("action", choices=("up", "down", "status"))
    dev.add_argument(
        "--clock-speed", type=float, default=float(os.environ.get("TOUCHSTREAM_CLOCK_SPEED", "1"))
    )
    dev.set_defaults(func=cmd_dev)

    demo = sub.add_parser("demo", help="publish demo leads to the dev stack and report")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
