"""Send windows: when a nurture email may go out. Pure functions, no I/O.

A window is a daily span of local wall-clock business hours ``[start, end)`` on
allowed weekdays, minus the public holidays of one country (``holidays``
library). Every function takes and returns timezone-aware datetimes; results
are in UTC.

Wall times are mapped to instants the same way everywhere: an ambiguous time
(autumn fall-back) takes its first occurrence (``fold=0``); a time that does
not exist (spring-forward gap) becomes the first valid instant after the gap.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays

__all__ = [
    "ALWAYS_OPEN",
    "WEEKDAY_NAMES",
    "SendWindow",
    "WindowInvalid",
    "add_business_days",
    "is_open",
    "next_opening",
    "schedule_send",
    "with_lead_holidays",
    "zone_for",
]

WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKDAY_LOOKUP = {name: i for i, name in enumerate(WEEKDAY_NAMES)} | {
    name: i
    for i, name in enumerate(
        ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
    )
}
_ALL_DAYS = frozenset(range(7))
_WORKDAYS = frozenset({0, 1, 2, 3, 4})
_MAX_JITTER_MINUTES = 240
_SEARCH_DAYS = 366
_TIME_RE = re.compile(r"(\d{1,2}):(\d{2})")
_CONFIG_KEYS = frozenset(
    {"timezone", "start", "end", "weekdays", "holidays", "jitter_minutes", "always_open"}
)
# Names ZoneInfo accepts that depend on the host rather than naming a zone.
_HOST_ZONES = frozenset({"localtime", "posixrules"})


class WindowInvalid(ValueError):
    """A send window (or one of its settings) is invalid."""


# --- validation helpers ---------------------------------------------------------------------------


@lru_cache(maxsize=1024)
def _zone(name: str) -> ZoneInfo:
    """The ZoneInfo for an IANA name; WindowInvalid if there is none."""
    if name in _HOST_ZONES:
        raise WindowInvalid(f"timezone: {name!r} depends on the host; use an IANA name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise WindowInvalid(f"timezone: unknown IANA time zone {name!r}") from exc


def _check_zone(name: object, field: str = "timezone") -> str:
    if not isinstance(name, str) or not name:
        raise WindowInvalid(f"{field}: expected an IANA time zone name, got {name!r}")
    _zone(name)
    return name


def _check_country(code: object, field: str = "holidays") -> str:
    """An upper-cased ISO 3166 alpha-2 code the holidays library supports."""
    if not isinstance(code, str) or not re.fullmatch(r"[A-Za-z]{2}", code):
        raise WindowInvalid(
            f"{field}: expected an ISO 3166 alpha-2 country code such as 'GB', got {code!r}"
        )
    upper = code.upper()
    if upper not in _supported_countries():
        raise WindowInvalid(f"{field}: no holiday calendar for country {code!r}")
    return upper


@lru_cache(maxsize=1)
def _supported_countries() -> frozenset[str]:
    return frozenset(holidays.list_supported_countries())


def _check_clock(value: object, field: str) -> time:
    if not isinstance(value, time):
        raise WindowInvalid(f"{field}: expected a datetime.time, got {value!r}")
    if value.tzinfo is not None:
        raise WindowInvalid(f"{field}: must be a naive local time, got {value!r}")
    if value.second or value.microsecond:
        raise WindowInvalid(f"{field}: must be a whole minute, got {value.isoformat()}")
    return value


def _check_weekdays(value: object, field: str = "weekdays") -> frozenset[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise WindowInvalid(f"{field}: expected a list of weekdays, got {value!r}")
    days: set[int] = set()
    for item in value:
        if isinstance(item, bool):
            raise WindowInvalid(f"{field}: invalid weekday {item!r}")
        if isinstance(item, int):
            if not 0 <= item <= 6:
                raise WindowInvalid(f"{field}: weekday {item} out of range 0 (Mon)..6 (Sun)")
            days.add(item)
        elif isinstance(item, str) and item.strip().lower() in _WEEKDAY_LOOKUP:
            days.add(_WEEKDAY_LOOKUP[item.strip().lower()])
        else:
            raise WindowInvalid(
                f"{field}: invalid weekday {item!r}; use 0..6 (Monday=0) or 'mon'..'sun'"
            )
    if not days:
        raise WindowInvalid(f"{field}: at least one weekday is required")
    return frozenset(days)


def _check_jitter(value: object, field: str = "jitter_minutes") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WindowInvalid(f"{field}: expected an integer number of minutes, got {value!r}")
    if not 0 <= value <= _MAX_JITTER_MINUTES:
        raise WindowInvalid(f"{field}: {value} is out of range 0..{_MAX_JITTER_MINUTES}")
    return value


def _parse_clock(value: object, field: str) -> time:
    if not isinstance(value, str) or not (m := _TIME_RE.fullmatch(value.strip())):
        raise WindowInvalid(f"{field}: expected a local time 'HH:MM', got {value!r}")
    hour, minute = int(m.group(1)), int(m.group(2))
    if hour > 23 or minute > 59:
        raise WindowInvalid(f"{field}: {value!r} is not a time of day (00:00..23:59)")
    return time(hour, minute)


def _aware(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise TypeError(f"{name}: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: naive datetime {value.isoformat()}; pass an aware datetime")
    return value


# --- the window -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendWindow:
    """Local business hours ``[start, end)`` on ``weekdays``, minus a country's holidays.

    ``timezone`` is the sequence default, used when the lead has no (valid) zone.
    Times have minute precision. With ``always_open`` the window is open at every
    instant; ``start``, ``end``, ``weekdays`` and ``holidays_country`` are then
    ignored and normalised to 00:00, 23:59, every day and None.
    """

    timezone: str = "UTC"
    start: time = time(9, 0)
    end: time = time(17, 0)
    weekdays: frozenset[int] = _WORKDAYS
    holidays_country: str | None = None
    jitter_minutes: int = 0
    always_open: bool = False

    def __post_init__(self) -> None:
        _check_zone(self.timezone)
        if not isinstance(self.always_open, bool):
            raise WindowInvalid(f"always_open: expected true or false, got {self.always_open!r}")
        _check_jitter(self.jitter_minutes)
        if self.always_open:
            object.__setattr__(self, "start", time(0, 0))
            object.__setattr__(self, "end", time(23, 59))
            object.__setattr__(self, "weekdays", _ALL_DAYS)
            object.__setattr__(self, "holidays_country", None)
            return
        start = _check_clock(self.start, "start")
        end = _check_clock(self.end, "end")
        if end <= start:
            raise WindowInvalid(
                f"end: {end:%H:%M} must be later than start {start:%H:%M} "
                "(windows cannot span midnight)"
            )
        object.__setattr__(self, "weekdays", _check_weekdays(self.weekdays))
        if self.holidays_country is not None:
            country = _check_country(self.holidays_country, "holidays_country")
            object.__setattr__(self, "holidays_country", country)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> SendWindow:
        """Parse a JSON-style dict; every key is optional (dataclass defaults).

        Keys: ``timezone`` (IANA name), ``start``/``end`` ('HH:MM'), ``weekdays``
        (list of 0..6 or 'mon'..'sun'), ``holidays`` (alpha-2 code or null),
        ``jitter_minutes`` (0..240), ``always_open`` (bool; excludes the hour,
        weekday and holiday keys).
        """
        if not isinstance(config, Mapping):
            raise WindowInvalid(f"send window: expected a mapping, got {type(config).__name__}")
        unknown = set(config) - _CONFIG_KEYS
        if unknown:
            raise WindowInvalid(
                f"send window: unknown key(s) {sorted(map(str, unknown))}; "
                f"allowed: {sorted(_CONFIG_KEYS)}"
            )
        timezone = _check_zone(config.get("timezone", "UTC"))
        jitter = _check_jitter(config.get("jitter_minutes", 0))
        always_open = config.get("always_open", False)
        if not isinstance(always_open, bool):
            raise WindowInvalid(f"always_open: expected true or false, got {always_open!r}")
        if always_open:
            clash = sorted({"start", "end", "weekdays", "holidays"} & set(config))
            if clash:
                raise WindowInvalid(f"always_open: cannot be combined with {clash}")
            return cls(timezone=timezone, jitter_minutes=jitter, always_open=True)
        start = _parse_clock(config.get("start", "09:00"), "start")
        end = _parse_clock(config.get("end", "17:00"), "end")
        weekdays = _check_weekdays(config.get("weekdays", sorted(_WORKDAYS)))
        country = config.get("holidays")
        if country is not None:
            country = _check_country(country)
        return cls(
            timezone=timezone,
            start=start,
            end=end,
            weekdays=weekdays,
            holidays_country=country,
            jitter_minutes=jitter,
        )

    def to_config(self) -> dict[str, Any]:
        """The JSON-style dict ``from_config`` reads back to an equal window."""
        if self.always_open:
            return {
                "timezone": self.timezone,
                "always_open": True,
                "jitter_minutes": self.jitter_minutes,
            }
        return {
            "timezone": self.timezone,
            "start": f"{self.start:%H:%M}",
            "end": f"{self.end:%H:%M}",
            "weekdays": [WEEKDAY_NAMES[d] for d in sorted(self.weekdays)],
            "holidays": self.holidays_country,
            "jitter_minutes": self.jitter_minutes,
        }


ALWAYS_OPEN = SendWindow(always_open=True)
"""Open at every instant: for sequences without a send window."""


# --- calendar -------------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def _holiday_dates(country: str, year: int) -> frozenset[date]:
    """Public holidays (including observed/substitute days) of ``country`` in ``year``.

    ``country`` has passed ``_check_country`` (a window checks its own and a lead's):
    the library has a calendar for it."""
    calendar = holidays.country_holidays(country, years=year)
    return frozenset(d for d in calendar if d.year == year)


def _is_business_day(day: date, weekdays: frozenset[int], country: str | None) -> bool:
    if day.weekday() not in weekdays:
        return False
    return country is None or day not in _holiday_dates(country, day.year)


def _localize(wall: datetime, tz: ZoneInfo) -> datetime:
    """The UTC instant of naive local ``wall`` in ``tz`` (fold=0; gaps -> end of the gap)."""
    instant = wall.replace(tzinfo=tz, fold=0).astimezone(UTC)
    if instant.astimezone(tz).replace(tzinfo=None) == wall:
        return instant
    # ``wall`` falls in a gap. fold=1 applies the offset after the transition and lands
    # before it; fold=0 lands after it. Bisect for the transition instant, i.e. the
    # first instant whose local wall time is >= ``wall``.
    low = wall.replace(tzinfo=tz, fold=1).astimezone(UTC)
    high = instant
    step = timedelta(microseconds=1)
    while high - low > step:
        mid = low + (high - low) // 2
        if mid.astimezone(tz).replace(tzinfo=None) >= wall:
            high = mid
        else:
            low = mid
    return high


def _day_span(window: SendWindow, day: date, tz: ZoneInfo) -> tuple[datetime, datetime] | None:
    """The UTC span ``[open, close)`` of business hours on local ``day``, or None."""
    if not _is_business_day(day, window.weekdays, window.holidays_country):
        return None
    opens = _localize(datetime.combine(day, window.start), tz)
    closes = _localize(datetime.combine(day, window.end), tz)
    return (opens, closes) if opens < closes else None


def _span_from(window: SendWindow, at: datetime, tz: ZoneInfo) -> tuple[datetime, datetime]:
    """``(opening, close)``: the earliest open instant >= ``at`` and the end of its span."""
    at_utc = _aware(at, "at").astimezone(UTC)
    if window.always_open:
        return at_utc, datetime.max.replace(tzinfo=UTC)
    # Start a day early: spans are searched in order, and a span belongs to its local day.
    first = at_utc.astimezone(tz).date() - timedelta(days=1)
    for offset in range(_SEARCH_DAYS + 2):
        span = _day_span(window, first + timedelta(days=offset), tz)
        if span is not None and span[1] > at_utc:
            return max(span[0], at_utc), span[1]
    raise WindowInvalid(f"send window {window.to_config()} has no opening within 366 days")


# --- public API -----------------------------------------------------------------------------------


def zone_for(window: SendWindow, lead_timezone: str | None) -> ZoneInfo:
    """The lead's time zone if it names a valid zone, else the window's."""
    if isinstance(lead_timezone, str) and lead_timezone:
        try:
            return _zone(lead_timezone)
        except WindowInvalid:
            pass
    return _zone(window.timezone)


@lru_cache(maxsize=1024)
def with_lead_holidays(window: SendWindow, lead_country: str | None) -> SendWindow:
    """``window`` observing the public holidays of the lead's country.

    The lead's ``country`` (ISO 3166 alpha-2) wins when it names a country the
    holiday library knows; otherwise the window's own ``holidays`` country applies
    (or none). An always-open window stays open at every instant.
    """
    if window.always_open or not isinstance(lead_country, str):
        return window
    try:
        country = _check_country(lead_country.strip(), "country")
    except WindowInvalid:
        return window
    if country == window.holidays_country:
        return window
    return replace(window, holidays_country=country)


def is_open(window: SendWindow, at: datetime, tz: ZoneInfo) -> bool:
    """Whether ``window`` (evaluated in ``tz``) is open at instant ``at``."""
    at_utc = _aware(at, "at").astimezone(UTC)
    if window.always_open:
        return True
    day = at_utc.astimezone(tz).date()
    for candidate in (day - timedelta(days=1), day, day + timedelta(days=1)):
        span = _day_span(window, candidate, tz)
        if span is not None and span[0] <= at_utc < span[1]:
            return True
    return False


def next_opening(window: SendWindow, at: datetime, tz: ZoneInfo) -> datetime:
    """``at`` (in UTC) if the window is open then, else the instant it next opens.

    Raises WindowInvalid if the window does not open within 366 days.
    """
    return _span_from(window, at, tz)[0]


def _jitter(seed: str, minutes: int) -> timedelta:
    """Deterministic offset in ``[0, minutes)`` minutes, at whole-second resolution."""
    if minutes <= 0:
        return timedelta(0)
    digest = hashlib.sha256(seed.encode("utf-8")).digest()
    return timedelta(seconds=int.from_bytes(digest[:8], "big") % (minutes * 60))


def schedule_send(
    window: SendWindow, due: datetime, lead_timezone: str | None, jitter_seed: str
) -> datetime:
    """When to send an email due at ``due``: the next opening plus a seeded jitter (UTC).

    The jitter is in ``[0, jitter_minutes)`` minutes (whole seconds) from
    ``sha256(jitter_seed)``. If it would reach the close of business hours it is
    wrapped (taken modulo the time left) so the result stays inside the window
    without piling late sends up at the closing instant.
    """
    _aware(due, "due")
    tz = zone_for(window, lead_timezone)
    opening, close = _span_from(window, due, tz)
    jitter = _jitter(jitter_seed, window.jitter_minutes)
    room = close - opening
    if jitter >= room:
        # Whole seconds that fit strictly before the close; 0 when under a second is left.
        whole = max(int((room - timedelta(microseconds=1)).total_seconds()), 0)
        jitter = timedelta(seconds=int(jitter.total_seconds()) % (whole + 1))
    return opening + jitter


def add_business_days(
    start: datetime,
    days: int,
    tz: ZoneInfo,
    weekdays: frozenset[int] = _WORKDAYS,
    holidays_country: str | None = None,
) -> datetime:
    """``start`` moved ``days`` business days later at the same local wall time (UTC).

    Business days are ``weekdays`` that are not holidays of ``holidays_country``
    (local dates in ``tz``). ``start`` itself need not be a business day. A wall
    time that is ambiguous on the target day takes fold=0; one in a DST gap becomes
    the first valid instant after the gap.
    """
    start_utc = _aware(start, "start").astimezone(UTC)
    if isinstance(days, bool) or not isinstance(days, int):
        raise TypeError(f"days: expected an int, got {days!r}")
    if days < 0:
        raise ValueError(f"days: must be >= 0, got {days}")
    allowed = _check_weekdays(weekdays)
    country = None if holidays_country is None else _check_country(holidays_country)
    if days == 0:
        return start_utc
    local = start_utc.astimezone(tz)
    day, counted, idle = local.date(), 0, 0
    while counted < days:
        day += timedelta(days=1)
        if _is_business_day(day, allowed, country):
            counted, idle = counted + 1, 0
        else:
            idle += 1
            if idle > _SEARCH_DAYS:
                raise WindowInvalid("add_business_days: no business day within 366 days")
    return _localize(datetime.combine(day, local.time()), tz)
