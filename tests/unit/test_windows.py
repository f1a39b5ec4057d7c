"""Send windows: config parsing, openings across DST and holidays, jitter, business days."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import holidays
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.nurture.windows import (
    ALWAYS_OPEN,
    SendWindow,
    WindowInvalid,
    add_business_days,
    is_open,
    next_opening,
    schedule_send,
    with_lead_holidays,
    zone_for,
)

LONDON = ZoneInfo("Europe/London")
NEW_YORK = ZoneInfo("America/New_York")
EVERY_DAY = frozenset(range(7))
ZONES = [
    "UTC",
    "Europe/London",
    "America/New_York",
    "Asia/Kolkata",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "America/Sao_Paulo",
]
COUNTRIES = [None, "GB", "US", "DE", "IN", "AU", "NZ"]
FAST = settings(max_examples=150, deadline=None)


def local(
    tz: ZoneInfo,
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    microsecond: int = 0,
) -> datetime:
    """An aware datetime in ``tz`` (fold=0 when the wall time is ambiguous)."""
    return datetime(year, month, day, hour, minute, second, microsecond, tzinfo=tz)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def is_holiday(country: str | None, day: date) -> bool:
    return country is not None and day in holidays.country_holidays(country, years=day.year)


def wall_is_ambiguous(at: datetime, tz: ZoneInfo) -> bool:
    wall = at.astimezone(tz).replace(tzinfo=None)
    first = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    second = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    return first != second


def naive_open(window: SendWindow, at: datetime, tz: ZoneInfo) -> bool:
    """Reference check on the local wall clock (exact except in a fall-back repeat)."""
    wall = at.astimezone(tz)
    return (
        wall.weekday() in window.weekdays
        and not is_holiday(window.holidays_country, wall.date())
        and window.start <= wall.time() < window.end
    )


# --- strategies -----------------------------------------------------------------------------------


def _offset_changes() -> list[datetime]:
    """UTC midnights of the days on which some test zone changes its UTC offset, 2024-2030."""
    changes = []
    for name in ZONES:
        tz = ZoneInfo(name)
        day = datetime(2024, 1, 1, 12, tzinfo=UTC)
        while day.year < 2031:
            if (
                day.astimezone(tz).utcoffset()
                != (day + timedelta(days=1)).astimezone(tz).utcoffset()
            ):
                changes.append(day.replace(hour=0) + timedelta(days=1))
            day += timedelta(days=1)
    return changes


OFFSET_CHANGES = _offset_changes()
instants = st.one_of(
    st.datetimes(
        min_value=datetime(2024, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)
    ),
    st.builds(
        lambda day, minutes: day + timedelta(minutes=minutes),
        st.sampled_from(OFFSET_CHANGES),
        st.integers(-36 * 60, 36 * 60),
    ),
)
zones = st.sampled_from(ZONES).map(ZoneInfo)
weekday_sets = st.frozensets(st.integers(0, 6), min_size=1)


@st.composite
def windows(draw: st.DrawFn) -> SendWindow:
    start = draw(st.integers(0, 23 * 60 + 58))
    end = draw(st.integers(start + 1, 23 * 60 + 59))
    return SendWindow(
        timezone=draw(st.sampled_from(ZONES)),
        start=time(start // 60, start % 60),
        end=time(end // 60, end % 60),
        weekdays=draw(weekday_sets),
        holidays_country=draw(st.sampled_from(COUNTRIES)),
        jitter_minutes=draw(st.integers(0, 240)),
    )


# --- config ---------------------------------------------------------------------------------------


def test_from_config_parses_everything() -> None:
    window = SendWindow.from_config(
        {
            "timezone": "Europe/London",
            "start": "09:00",
            "end": "17:30",
            "weekdays": ["mon", "Tue", "wednesday", 3, "fri"],
            "holidays": "gb",
            "jitter_minutes": 15,
        }
    )
    assert window == SendWindow(
        timezone="Europe/London",
        start=time(9, 0),
        end=time(17, 30),
        weekdays=frozenset({0, 1, 2, 3, 4}),
        holidays_country="GB",
        jitter_minutes=15,
    )
    assert window.to_config() == {
        "timezone": "Europe/London",
        "start": "09:00",
        "end": "17:30",
        "weekdays": ["mon", "tue", "wed", "thu", "fri"],
        "holidays": "GB",
        "jitter_minutes": 15,
    }


def test_from_config_defaults() -> None:
    assert SendWindow.from_config({}) == SendWindow()


def test_always_open_config_round_trip() -> None:
    assert ALWAYS_OPEN.to_config() == {"timezone": "UTC", "always_open": True, "jitter_minutes": 0}
    assert SendWindow.from_config(ALWAYS_OPEN.to_config()) == ALWAYS_OPEN
    assert SendWindow(always_open=True, holidays_country="GB") == ALWAYS_OPEN


@FAST
@given(windows())
def test_config_round_trip(window: SendWindow) -> None:
    config = window.to_config()
    assert SendWindow.from_config(config) == window
    assert SendWindow.from_config(config).to_config() == config


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"timezone": "Europe/Londn"}, r"timezone: unknown IANA time zone 'Europe/Londn'"),
        ({"timezone": ""}, r"timezone: expected an IANA time zone name"),
        ({"timezone": 3}, r"timezone: expected an IANA time zone name"),
        ({"timezone": "localtime"}, r"timezone: 'localtime' depends on the host"),
        ({"start": "9am"}, r"start: expected a local time 'HH:MM', got '9am'"),
        ({"start": 9}, r"start: expected a local time 'HH:MM'"),
        ({"end": "24:00"}, r"end: '24:00' is not a time of day"),
        ({"end": "17:60"}, r"end: '17:60' is not a time of day"),
        ({"start": "17:00", "end": "09:00"}, r"end: 09:00 must be later than start 17:00"),
        ({"start": "09:00", "end": "09:00"}, r"end: 09:00 must be later than start 09:00"),
        ({"weekdays": []}, r"weekdays: at least one weekday is required"),
        ({"weekdays": "mon"}, r"weekdays: expected a list of weekdays"),
        ({"weekdays": ["mon", "funday"]}, r"weekdays: invalid weekday 'funday'"),
        ({"weekdays": [7]}, r"weekdays: weekday 7 out of range"),
        ({"weekdays": [True]}, r"weekdays: invalid weekday True"),
        ({"holidays": "XX"}, r"holidays: no holiday calendar for country 'XX'"),
        ({"holidays": "GBR"}, r"holidays: expected an ISO 3166 alpha-2 country code"),
        ({"holidays": ""}, r"holidays: expected an ISO 3166 alpha-2 country code"),
        ({"jitter_minutes": 241}, r"jitter_minutes: 241 is out of range 0\.\.240"),
        ({"jitter_minutes": -1}, r"jitter_minutes: -1 is out of range"),
        ({"jitter_minutes": 1.5}, r"jitter_minutes: expected an integer"),
        ({"jitter_minutes": True}, r"jitter_minutes: expected an integer"),
        ({"always_open": "yes"}, r"always_open: expected true or false"),
        ({"always_open": True, "start": "09:00"}, r"always_open: cannot be combined with"),
        ({"weekday": ["mon"]}, r"unknown key\(s\) \['weekday'\]"),
    ],
)
def test_from_config_rejects(config: dict[str, Any], message: str) -> None:
    with pytest.raises(WindowInvalid, match=message):
        SendWindow.from_config(config)


def test_from_config_rejects_non_mapping() -> None:
    with pytest.raises(WindowInvalid, match="expected a mapping"):
        SendWindow.from_config(["09:00"])  # type: ignore[arg-type]


def test_window_invalid_is_value_error_and_direct_construction_validates() -> None:
    assert issubclass(WindowInvalid, ValueError)
    with pytest.raises(WindowInvalid, match="must be later than start"):
        SendWindow(start=time(17), end=time(9))
    with pytest.raises(WindowInvalid, match="no holiday calendar"):
        SendWindow(holidays_country="ZZ")
    with pytest.raises(WindowInvalid, match="whole minute"):
        SendWindow(start=time(9, 0, 30))
    with pytest.raises(WindowInvalid, match="at least one weekday"):
        SendWindow(weekdays=frozenset())


# --- zone_for -------------------------------------------------------------------------------------


def test_zone_for_prefers_valid_lead_zone() -> None:
    window = SendWindow(timezone="Europe/London")
    assert zone_for(window, "Asia/Kolkata") == ZoneInfo("Asia/Kolkata")
    assert zone_for(window, None) == LONDON
    assert zone_for(window, "") == LONDON
    assert zone_for(window, "Mars/Olympus_Mons") == LONDON
    assert zone_for(window, "../../etc/passwd") == LONDON
    assert zone_for(window, "localtime") == LONDON


# --- is_open / next_opening -----------------------------------------------------------------------


def test_naive_datetimes_are_rejected() -> None:
    window = SendWindow()
    with pytest.raises(ValueError, match="naive"):
        is_open(window, datetime(2026, 5, 12, 10), LONDON)
    with pytest.raises(ValueError, match="naive"):
        next_opening(window, datetime(2026, 5, 12, 10), LONDON)
    with pytest.raises(ValueError, match="naive"):
        schedule_send(window, datetime(2026, 5, 12, 10), None, "seed")
    with pytest.raises(ValueError, match="naive"):
        add_business_days(datetime(2026, 5, 12, 10), 1, LONDON)


def test_open_returns_at_in_utc() -> None:
    at = local(LONDON, 2026, 5, 12, 10, 15)  # Tuesday, BST
    result = next_opening(SendWindow(), at, LONDON)
    assert result == at
    assert result.tzinfo is UTC
    assert result == utc(2026, 5, 12, 9, 15)


def test_weekend_skipped() -> None:
    saturday_noon = local(LONDON, 2026, 5, 9, 12)
    assert not is_open(SendWindow(), saturday_noon, LONDON)
    assert next_opening(SendWindow(), saturday_noon, LONDON) == local(LONDON, 2026, 5, 11, 9)


def test_after_hours_goes_to_next_morning() -> None:
    tuesday_evening = local(NEW_YORK, 2026, 5, 12, 18)
    assert next_opening(SendWindow(), tuesday_evening, NEW_YORK) == utc(2026, 5, 13, 13)


def test_end_is_exclusive_and_start_inclusive() -> None:
    window = SendWindow()
    assert is_open(window, local(LONDON, 2026, 5, 12, 9), LONDON)
    assert is_open(window, local(LONDON, 2026, 5, 12, 16, 59, 59), LONDON)
    assert not is_open(window, local(LONDON, 2026, 5, 12, 17), LONDON)
    assert next_opening(window, local(LONDON, 2026, 5, 12, 17), LONDON) == local(
        LONDON, 2026, 5, 13, 9
    )
    assert next_opening(window, local(LONDON, 2026, 5, 12, 8, 59), LONDON) == local(
        LONDON, 2026, 5, 12, 9
    )


def test_any_input_zone_is_accepted() -> None:
    at = datetime(2026, 5, 12, 18, 30, tzinfo=ZoneInfo("Asia/Kolkata"))  # 14:00 in London
    assert is_open(SendWindow(), at, LONDON)
    assert next_opening(SendWindow(), at, LONDON) == utc(2026, 5, 12, 13)


def test_dst_london_spring_forward_gap() -> None:
    # 2026-03-29: 01:00 GMT jumps to 02:00 BST; a 01:00 start does not exist that day.
    window = SendWindow(start=time(1), end=time(3), weekdays=EVERY_DAY)
    assert next_opening(window, utc(2026, 3, 28, 12), LONDON) == utc(2026, 3, 29, 1)
    assert is_open(window, utc(2026, 3, 29, 1, 59, 59), LONDON)
    assert not is_open(window, utc(2026, 3, 29, 2), LONDON)  # 03:00 BST
    assert not is_open(window, utc(2026, 3, 29, 0, 59), LONDON)  # 00:59 GMT
    assert next_opening(window, utc(2026, 3, 29, 2), LONDON) == utc(2026, 3, 30, 0)


def test_dst_london_business_hours_around_spring_forward() -> None:
    window = SendWindow(weekdays=EVERY_DAY)
    assert next_opening(window, utc(2026, 3, 28, 0), LONDON) == utc(2026, 3, 28, 9)
    assert next_opening(window, utc(2026, 3, 28, 17), LONDON) == utc(2026, 3, 29, 8)
    assert not is_open(window, utc(2026, 3, 29, 16), LONDON)  # 17:00 BST


def test_dst_london_fall_back() -> None:
    # 2026-10-25: 02:00 BST falls back to 01:00 GMT; 01:00-02:00 happens twice.
    window = SendWindow(start=time(1), end=time(3), weekdays=EVERY_DAY)
    assert next_opening(window, utc(2026, 10, 24, 12), LONDON) == utc(2026, 10, 25, 0)
    for minute in range(0, 180, 15):  # open through both passes, 3 real hours
        assert is_open(window, utc(2026, 10, 25) + timedelta(minutes=minute), LONDON)
    assert not is_open(window, utc(2026, 10, 25, 3), LONDON)
    assert next_opening(window, utc(2026, 10, 25, 3), LONDON) == utc(2026, 10, 26, 1)

    hours = SendWindow(weekdays=EVERY_DAY)
    assert next_opening(hours, utc(2026, 10, 24, 0), LONDON) == utc(2026, 10, 24, 8)
    assert next_opening(hours, utc(2026, 10, 24, 16), LONDON) == utc(2026, 10, 25, 9)


def test_fall_back_ambiguous_start_uses_first_occurrence() -> None:
    window = SendWindow(start=time(1, 30), end=time(9), weekdays=EVERY_DAY)
    # 01:30 BST (fold=0) is 00:30 UTC; the repeat 01:30 GMT is 01:30 UTC.
    assert next_opening(window, utc(2026, 10, 24, 12), LONDON) == utc(2026, 10, 25, 0, 30)


def test_dst_new_york_spring_forward() -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
    gap = SendWindow(start=time(2, 30), end=time(4), weekdays=EVERY_DAY)
    assert next_opening(gap, utc(2026, 3, 7, 12), NEW_YORK) == utc(2026, 3, 8, 7)
    assert not is_open(gap, utc(2026, 3, 8, 6, 59), NEW_YORK)
    assert is_open(gap, utc(2026, 3, 8, 7, 59), NEW_YORK)
    assert not is_open(gap, utc(2026, 3, 8, 8), NEW_YORK)  # 04:00 EDT

    hours = SendWindow(weekdays=EVERY_DAY)
    assert next_opening(hours, utc(2026, 3, 7, 0), NEW_YORK) == utc(2026, 3, 7, 14)
    assert next_opening(hours, utc(2026, 3, 7, 23), NEW_YORK) == utc(2026, 3, 8, 13)


def test_dst_half_hour_and_chatham_gaps() -> None:
    # Lord Howe 2026-10-04: 02:00 (+10:30) jumps to 02:30 (+11:00) at 15:30 UTC.
    lord_howe = ZoneInfo("Australia/Lord_Howe")
    window = SendWindow(start=time(2, 10), end=time(3), weekdays=EVERY_DAY)
    assert next_opening(window, utc(2026, 10, 3, 0), lord_howe) == utc(2026, 10, 3, 15, 30)
    assert not is_open(window, utc(2026, 10, 3, 16), lord_howe)
    # Chatham 2026-09-27: 02:45 (+12:45) jumps to 03:45 (+13:45) at 14:00 UTC.
    chatham = ZoneInfo("Pacific/Chatham")
    window = SendWindow(start=time(3), end=time(4), weekdays=EVERY_DAY)
    assert next_opening(window, utc(2026, 9, 26, 0), chatham) == utc(2026, 9, 26, 14)
    assert is_open(window, utc(2026, 9, 26, 14, 14), chatham)
    assert not is_open(window, utc(2026, 9, 26, 14, 15), chatham)


def test_midnight_gap_and_skipped_day() -> None:
    # Santiago 2026-09-06: 00:00 (-04) jumps to 01:00 (-03); midnight does not exist.
    santiago = ZoneInfo("America/Santiago")
    window = SendWindow(start=time(0), end=time(8), weekdays=EVERY_DAY)
    assert next_opening(window, utc(2026, 9, 5, 12), santiago) == utc(2026, 9, 6, 4)
    # Apia skipped 2011-12-30 entirely: no business hours that day.
    apia = ZoneInfo("Pacific/Apia")
    thursday_evening = local(apia, 2011, 12, 29, 18)
    assert next_opening(SendWindow(weekdays=EVERY_DAY), thursday_evening, apia) == local(
        apia, 2011, 12, 31, 9
    )


def test_gb_christmas_and_boxing_day_substitute() -> None:
    gb = holidays.country_holidays("GB", years=2026)
    assert date(2026, 12, 28) in gb  # Boxing Day (Saturday) observed on Monday
    window = SendWindow(timezone="Europe/London", holidays_country="GB")
    christmas = local(LONDON, 2026, 12, 25, 10)  # Friday
    assert not is_open(window, christmas, LONDON)
    assert next_opening(window, christmas, LONDON) == utc(2026, 12, 29, 9)


def test_us_independence_day_observed_friday() -> None:
    # 2026-07-04 is a Saturday; the holidays library observes it on Friday 2026-07-03.
    window = SendWindow(holidays_country="US")
    thursday_evening = local(NEW_YORK, 2026, 7, 2, 17, 30)
    assert next_opening(window, thursday_evening, NEW_YORK) == utc(2026, 7, 6, 13)
    assert not is_open(window, local(NEW_YORK, 2026, 7, 3, 10), NEW_YORK)


def test_holidays_are_judged_on_the_lead_local_date() -> None:
    window = SendWindow(holidays_country="GB", weekdays=EVERY_DAY, start=time(0), end=time(23, 59))
    kolkata = ZoneInfo("Asia/Kolkata")
    # 2026-12-24 20:00 UTC is already Christmas Day 01:30 in Kolkata.
    assert is_open(window, utc(2026, 12, 24, 20), LONDON)
    assert not is_open(window, utc(2026, 12, 24, 20), kolkata)


def test_always_open() -> None:
    at = local(NEW_YORK, 2026, 12, 25, 3, 7)
    assert is_open(ALWAYS_OPEN, at, NEW_YORK)
    assert next_opening(ALWAYS_OPEN, at, NEW_YORK) == at
    assert next_opening(ALWAYS_OPEN, at, NEW_YORK).tzinfo is UTC
    assert schedule_send(ALWAYS_OPEN, at, None, "seed") == at


@FAST
@given(windows(), instants, zones)
def test_is_open_matches_wall_clock_reference(
    window: SendWindow, at: datetime, tz: ZoneInfo
) -> None:
    if not wall_is_ambiguous(at, tz):
        assert is_open(window, at, tz) == naive_open(window, at, tz)


@FAST
@given(
    windows(), instants, zones, st.lists(st.floats(0, 1, exclude_max=True), min_size=3, max_size=6)
)
def test_next_opening_is_the_earliest_open_instant(
    window: SendWindow, at: datetime, tz: ZoneInfo, fractions: list[float]
) -> None:
    result = next_opening(window, at, tz)
    assert result.tzinfo is UTC
    assert result >= at
    assert is_open(window, result, tz)
    if result == at:
        return
    assert not is_open(window, at, tz)
    assert not is_open(window, result - timedelta(microseconds=1), tz)
    span = result - at
    for fraction in fractions:
        point = at + span * fraction
        if point < result:
            assert not is_open(window, point, tz)
    # Every local start of business hours strictly between `at` and `result` is closed.
    day = at.astimezone(tz).date() - timedelta(days=1)
    while day <= result.astimezone(tz).date():
        for fold in (0, 1):
            candidate = datetime.combine(day, window.start, tzinfo=tz).replace(fold=fold)
            if at < candidate < result:
                assert not is_open(window, candidate, tz)
        day += timedelta(days=1)


# --- schedule_send --------------------------------------------------------------------------------


def test_schedule_send_deterministic_and_within_jitter() -> None:
    window = SendWindow(timezone="Europe/London", jitter_minutes=30)
    due = local(LONDON, 2026, 5, 9, 12)  # Saturday -> Monday 09:00 BST
    opening = utc(2026, 5, 11, 8)
    first = schedule_send(window, due, None, "enrollment-1:step-2")
    assert first == schedule_send(window, due, None, "enrollment-1:step-2")
    assert first.tzinfo is UTC
    assert opening <= first < opening + timedelta(minutes=30)
    seeds = {schedule_send(window, due, None, f"seed-{i}") for i in range(20)}
    assert len(seeds) > 10


def test_schedule_send_without_jitter_is_the_opening() -> None:
    due = local(LONDON, 2026, 5, 12, 18)
    assert schedule_send(SendWindow(), due, "Europe/London", "x") == utc(2026, 5, 13, 8)


def test_schedule_send_uses_lead_zone_with_fallback() -> None:
    window = SendWindow(timezone="Europe/London")
    due = utc(2026, 5, 12, 6)
    assert schedule_send(window, due, "Asia/Kolkata", "s") == utc(2026, 5, 12, 6)  # 11:30 IST
    assert schedule_send(window, due, "Not/AZone", "s") == utc(2026, 5, 12, 8)
    assert schedule_send(window, due, None, "s") == utc(2026, 5, 12, 8)


def test_schedule_send_jitter_near_close_stays_inside() -> None:
    window = SendWindow(jitter_minutes=240)
    due = local(LONDON, 2026, 5, 12, 16, 55)
    for i in range(50):
        sent = schedule_send(window, due, "Europe/London", f"late-{i}")
        assert due <= sent < local(LONDON, 2026, 5, 12, 17)
        assert is_open(window, sent, LONDON)
    last_moment = local(LONDON, 2026, 5, 12, 16, 59, 59, 500000)
    assert schedule_send(window, last_moment, "Europe/London", "z") == last_moment


@FAST
@given(windows(), instants, st.sampled_from(ZONES), st.text(max_size=20))
def test_schedule_send_properties(
    window: SendWindow, due: datetime, lead_zone: str, seed: str
) -> None:
    tz = zone_for(window, lead_zone)
    opening = next_opening(window, due, tz)
    sent = schedule_send(window, due, lead_zone, seed)
    assert sent == schedule_send(window, due, lead_zone, seed)
    assert sent.tzinfo is UTC
    assert opening <= sent
    assert sent < opening + timedelta(minutes=max(window.jitter_minutes, 1))
    assert is_open(window, sent, tz)


# --- add_business_days ----------------------------------------------------------------------------


def test_add_business_days_friday_plus_one_is_monday() -> None:
    friday = local(LONDON, 2026, 5, 8, 10)
    assert add_business_days(friday, 1, LONDON) == local(LONDON, 2026, 5, 11, 10)
    assert add_business_days(friday, 0, LONDON) == friday
    assert add_business_days(friday, 0, LONDON).tzinfo is UTC
    assert add_business_days(friday, 5, LONDON) == local(LONDON, 2026, 5, 15, 10)


def test_add_business_days_skips_holidays() -> None:
    friday = local(LONDON, 2026, 5, 1, 10)  # Monday 2026-05-04 is the GB May Day holiday
    assert add_business_days(friday, 1, LONDON, holidays_country="GB") == local(
        LONDON, 2026, 5, 5, 10
    )
    assert add_business_days(friday, 1, LONDON) == local(LONDON, 2026, 5, 4, 10)
    christmas_eve = local(LONDON, 2026, 12, 24, 10)
    assert add_business_days(christmas_eve, 1, LONDON, holidays_country="GB") == local(
        LONDON, 2026, 12, 29, 10
    )


def test_add_business_days_keeps_wall_time_across_dst() -> None:
    friday = utc(2026, 3, 27, 10)  # 10:00 GMT
    assert add_business_days(friday, 1, LONDON) == utc(2026, 3, 30, 9)  # 10:00 BST
    # 01:30 does not exist on 2026-03-29 in London: first valid instant after the gap.
    saturday = utc(2026, 3, 28, 1, 30)
    assert add_business_days(saturday, 1, LONDON, EVERY_DAY) == utc(2026, 3, 29, 1)
    # 01:30 is ambiguous on 2026-10-25: the first occurrence (BST).
    assert add_business_days(utc(2026, 10, 24, 0, 30), 1, LONDON, EVERY_DAY) == utc(
        2026, 10, 25, 0, 30
    )


def test_add_business_days_rejects_bad_arguments() -> None:
    start = utc(2026, 5, 8, 10)
    with pytest.raises(ValueError, match="days: must be >= 0"):
        add_business_days(start, -1, LONDON)
    with pytest.raises(WindowInvalid, match="at least one weekday"):
        add_business_days(start, 1, LONDON, frozenset())
    with pytest.raises(WindowInvalid, match="no holiday calendar for country 'XX'"):
        add_business_days(start, 1, LONDON, holidays_country="XX")


@FAST
@given(
    instants,
    st.integers(0, 40),
    zones,
    weekday_sets,
    st.sampled_from(COUNTRIES),
)
def test_add_business_days_properties(
    start: datetime, days: int, tz: ZoneInfo, weekdays: frozenset[int], country: str | None
) -> None:
    result = add_business_days(start, days, tz, weekdays, country)
    assert result.tzinfo is UTC
    if days == 0:
        assert result == start
        return
    start_local, result_local = start.astimezone(tz), result.astimezone(tz)
    wall = datetime.combine(result_local.date(), start_local.time())
    if wall.replace(tzinfo=tz).astimezone(UTC).astimezone(tz).replace(tzinfo=None) == wall:
        assert result_local.time() == start_local.time()
    else:  # the wall time falls in a DST gap on the target day
        assert result_local.time() > start_local.time()
        assert result_local.date() == wall.date()
    target = wall.date()
    assert target.weekday() in weekdays
    assert not is_holiday(country, target)
    between = [
        start_local.date() + timedelta(days=n) for n in range(1, (target - start_local.date()).days)
    ]
    business = [d for d in between if d.weekday() in weekdays and not is_holiday(country, d)]
    assert len(business) == days - 1


def test_no_opening_within_a_year_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import services.nurture.windows as windows_module

    monkeypatch.setattr(windows_module, "_is_business_day", lambda *_: False)
    with pytest.raises(WindowInvalid, match="no opening within 366 days"):
        next_opening(SendWindow(), utc(2026, 5, 12, 10), LONDON)
    with pytest.raises(WindowInvalid, match="no business day within 366 days"):
        add_business_days(utc(2026, 5, 12, 10), 1, LONDON)


def test_with_lead_holidays_takes_the_leads_country_when_it_has_a_calendar() -> None:
    gb = SendWindow.from_config({"timezone": "Europe/London", "holidays": "GB"})
    assert with_lead_holidays(gb, "US").holidays_country == "US"
    assert with_lead_holidays(gb, " us ").holidays_country == "US"
    assert with_lead_holidays(gb, "US").timezone == "Europe/London"  # only the holidays
    for missing in (None, "", "ZZ", "USA", "1"):
        assert with_lead_holidays(gb, missing) is gb
    plain = SendWindow.from_config({"timezone": "Europe/London"})
    assert with_lead_holidays(plain, "DE").holidays_country == "DE"
    assert with_lead_holidays(plain, None).holidays_country is None
    assert with_lead_holidays(ALWAYS_OPEN, "US") is ALWAYS_OPEN
    # 4 July 2025 is a Friday: closed for a US lead, open for the window's GB.
    independence_day = datetime(2025, 7, 4, 12, 0, tzinfo=UTC)
    london = ZoneInfo("Europe/London")
    assert is_open(gb, independence_day, london)
    assert not is_open(with_lead_holidays(gb, "US"), independence_day, london)
