"""The injectable clock (services/runtime/clock.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from unittest.mock import patch

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.runtime import clock as clock_module
from services.runtime.clock import (
    FastClock,
    FrozenClock,
    SystemClock,
    clock_from_settings,
)

ORIGIN = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


class FakeWall:
    """A controllable time.time()."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall(monkeypatch: pytest.MonkeyPatch) -> FakeWall:
    fake = FakeWall(ORIGIN.timestamp())
    monkeypatch.setattr(clock_module.time, "time", fake)
    return fake


def test_fast_clock_starts_at_origin(wall: FakeWall) -> None:
    assert FastClock(60, ORIGIN).now() == ORIGIN


def test_fast_clock_runs_speed_times_faster(wall: FakeWall) -> None:
    clock = FastClock(1440, ORIGIN)  # one product day per wall minute
    wall.now += 60
    assert clock.now() == ORIGIN + timedelta(days=1)
    wall.now += 30
    assert clock.now() == ORIGIN + timedelta(days=1, hours=12)


def test_fast_clock_agrees_across_instances(wall: FakeWall) -> None:
    """Two processes of one deployment agree on "now" without talking."""
    wall.now += 1000
    a = FastClock(100, ORIGIN)
    wall.now += 7
    b = FastClock(100, ORIGIN)
    assert a.now() == b.now() == ORIGIN + timedelta(seconds=1007 * 100)


def test_fast_clock_origin_in_the_past_is_ahead_of_wall_time(wall: FakeWall) -> None:
    origin = ORIGIN - timedelta(hours=1)
    clock = FastClock(2, origin)
    assert clock.now() == origin + timedelta(hours=2)


@given(
    speed=st.floats(min_value=0.01, max_value=10_000),
    elapsed=st.floats(min_value=0, max_value=86_400),
)
@example(speed=8391.0, elapsed=1.192092896e-07)  # below the wall clock's float resolution
@settings(max_examples=200)
def test_fast_clock_elapsed_product_time_is_speed_times_wall(speed: float, elapsed: float) -> None:
    fake = FakeWall(ORIGIN.timestamp() + elapsed)
    # A wall timestamp is a float near 1.8e9 s: the elapsed time it can express is
    # a multiple of about 2.4e-7 s, which the speed multiplies like any other.
    wall_elapsed = fake.now - ORIGIN.timestamp()
    with patch.object(clock_module.time, "time", fake):
        product = FastClock(speed, ORIGIN).now() - ORIGIN
    assert product.total_seconds() == pytest.approx(wall_elapsed * speed, rel=1e-6, abs=1e-5)


def test_fast_clock_time_is_aware_utc(wall: FakeWall) -> None:
    now = FastClock(10, ORIGIN).now()
    assert now.tzinfo is not None
    assert now.utcoffset() == timedelta(0)


def test_fast_clock_without_origin_starts_now() -> None:
    before = datetime.now(UTC)
    clock = FastClock(1000)
    after = datetime.now(UTC)
    assert before <= clock.origin <= after


@pytest.mark.parametrize(
    ("speed", "product", "wall_seconds"),
    [
        (1, timedelta(minutes=1), 60.0),
        (60, timedelta(hours=1), 60.0),
        (1440, timedelta(days=1), 60.0),
        (0.5, timedelta(seconds=10), 20.0),
    ],
)
def test_fast_clock_wall_seconds(speed: float, product: timedelta, wall_seconds: float) -> None:
    assert FastClock(speed, ORIGIN).wall_seconds(product) == pytest.approx(wall_seconds)


def test_wall_seconds_is_the_inverse_of_now(wall: FakeWall) -> None:
    clock = FastClock(360, ORIGIN)
    wait = clock.wall_seconds(timedelta(days=3))
    wall.now += wait
    assert clock.now() == ORIGIN + timedelta(days=3)


@pytest.mark.parametrize("speed", [0, -1, -0.5])
def test_fast_clock_refuses_non_positive_speed(speed: float) -> None:
    with pytest.raises(ValueError):
        FastClock(speed, ORIGIN)


def test_frozen_clock_moves_only_when_told() -> None:
    clock = FrozenClock(ORIGIN)
    assert clock.now() == ORIGIN
    time.sleep(0.001)
    assert clock.now() == ORIGIN
    clock.advance(timedelta(days=2, minutes=5))
    assert clock.now() == ORIGIN + timedelta(days=2, minutes=5)
    clock.advance(timedelta(seconds=1))
    assert clock.now() == ORIGIN + timedelta(days=2, minutes=5, seconds=1)
    assert clock.wall_seconds(timedelta(days=30)) == 0.0


def test_system_clock_is_wall_time() -> None:
    clock = SystemClock()
    before = datetime.now(UTC)
    now = clock.now()
    after = datetime.now(UTC)
    assert before <= now <= after
    assert now.tzinfo is not None
    assert clock.wall_seconds(timedelta(minutes=2)) == 120.0


def test_clock_from_settings_speed_one_without_origin_is_system() -> None:
    assert isinstance(clock_from_settings(1.0, None), SystemClock)
    assert isinstance(clock_from_settings(1, None), SystemClock)


def test_clock_from_settings_fast() -> None:
    fast = clock_from_settings(60.0, ORIGIN)
    assert isinstance(fast, FastClock)
    assert fast.speed == 60.0
    assert fast.origin == ORIGIN

    no_origin = clock_from_settings(60.0, None)
    assert isinstance(no_origin, FastClock)
    assert no_origin.speed == 60.0


def test_clock_from_settings_speed_one_with_origin_is_fast() -> None:
    clock = clock_from_settings(1.0, ORIGIN)
    assert isinstance(clock, FastClock)
    assert clock.origin == ORIGIN


def test_clock_from_settings_refuses_bad_speed() -> None:
    with pytest.raises(ValueError):
        clock_from_settings(0, None)


def test_a_fast_clock_without_origin_warns(caplog: pytest.LogCaptureFixture) -> None:
    """Each process would start its own fast clock at its own start-up: say so."""
    with caplog.at_level("WARNING", logger="services.runtime.clock"):
        clock_from_settings(86400.0, None)
    (record,) = caplog.records
    assert record.levelname == "WARNING"
    assert "TOUCHSTREAM_CLOCK_ORIGIN" in record.getMessage()
    assert "86400" in record.getMessage()


def test_a_shared_origin_or_wall_time_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="services.runtime.clock"):
        clock_from_settings(86400.0, ORIGIN)
        clock_from_settings(86400.0, ORIGIN, ORIGIN - timedelta(days=3))
        clock_from_settings(1.0, None)
    assert caplog.records == []
