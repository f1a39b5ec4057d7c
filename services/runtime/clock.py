"""The one injectable clock every scheduling decision goes through.

Production runs on wall time. Tests and the demo run a fast clock: product time
advances ``speed`` times faster than the wall clock from a common ``origin``, so
every process of one deployment agrees on "now" without talking to each other.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

log = logging.getLogger(__name__)


class Clock(Protocol):
    def now(self) -> datetime:
        """The current product time (timezone-aware, UTC)."""
        ...

    def wall_seconds(self, product: timedelta) -> float:
        """How many wall-clock seconds a stretch of product time takes."""
        ...


class SystemClock:
    """Wall time."""

    def now(self) -> datetime:
        return datetime.now(UTC)

    def wall_seconds(self, product: timedelta) -> float:
        return product.total_seconds()


class FastClock:
    """Product time = start + (wall - origin) * speed.

    ``origin`` is the wall-clock instant the clock starts ticking; ``start`` is the
    product time at that instant (default: the origin itself)."""

    def __init__(
        self, speed: float, origin: datetime | None = None, start: datetime | None = None
    ) -> None:
        if speed <= 0:
            raise ValueError("clock speed must be positive")
        self.speed = speed
        self.origin = origin or datetime.now(UTC)
        self.start = start or self.origin
        self._origin_ts = self.origin.timestamp()

    def now(self) -> datetime:
        elapsed = (time.time() - self._origin_ts) * self.speed
        return self.start + timedelta(seconds=elapsed)

    def wall_seconds(self, product: timedelta) -> float:
        return product.total_seconds() / self.speed


class FrozenClock:
    """A clock that moves only when told to (unit tests)."""

    def __init__(self, start: datetime) -> None:
        self._now = start

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        self._now += delta

    def wall_seconds(self, product: timedelta) -> float:
        return 0.0


def clock_from_settings(
    speed: float, origin: datetime | None, start: datetime | None = None
) -> Clock:
    if speed == 1.0 and origin is None and start is None:
        return SystemClock()
    if origin is None:
        # Product time then counts from this process's start-up: processes started at
        # different moments disagree on "now" (and a restart jumps back in time).
        log.warning(
            "TOUCHSTREAM_CLOCK_SPEED=%s%s without TOUCHSTREAM_CLOCK_ORIGIN: this process's"
            " clock starts from its own start-up, so processes started at different moments"
            " disagree on the time; give every process of the deployment the same"
            " TOUCHSTREAM_CLOCK_ORIGIN (an ISO 8601 instant)",
            f"{speed:g}",
            "" if start is None else " and TOUCHSTREAM_CLOCK_START",
        )
    return FastClock(speed, origin, start)
