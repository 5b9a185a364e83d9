"""Cron expressions for schedules: parse, validate, and find fire times in an IANA time zone.

Every function here is pure: time comes in as an argument (an aware datetime) and fire times go
out as aware UTC datetimes. Nothing reads the wall clock, a database or Redis.

Syntax (Vixie / Debian cron, 5 fields)
--------------------------------------
``minute hour day-of-month month day-of-week``, separated by spaces or tabs. Each field is a
comma-separated list of items; an item is ``*``, a number, a range ``a-b``, or either of the
first two followed by a step ``/n`` (``*/15``, ``8-18/2``). Months take the names JAN-DEC and
days of the week SUN-SAT (any case, also in ranges); day of week 0 and 7 are both Sunday.
A step after a single number (``5/15``) is refused, as cron(8) refuses it; write ``5-59/15``.
Quartz extensions (``?``, ``L``, ``W``, ``#``, a seconds or a year field) are refused.
Nicknames: ``@yearly`` = ``@annually`` = ``0 0 1 1 *``, ``@monthly`` = ``0 0 1 * *``,
``@weekly`` = ``0 0 * * 0``, ``@daily`` = ``@midnight`` = ``0 0 * * *``, ``@hourly`` =
``0 * * * *``. ``@reboot`` is refused: a schedule fires on the clock, never at start-up.

Days follow cron(8): when both day fields are restricted (neither starts with ``*``) a day
matches if EITHER matches (``0 9 1,15 * MON``: the 1st, the 15th and every Monday); when either
starts with ``*`` both must match, so ``*/2`` counts as unrestricted here, exactly as in Vixie
cron (``0 9 */2 * MON`` runs on odd-numbered days that are Mondays).

An expression that can never fire (``0 0 30 2 *``, ``0 0 31 4,6,9,11 *``) is refused when it is
parsed. Only the day-of-month/month pair can make that happen, so the check is exact: some
listed month must have some listed day (February counts 29 days, leap years come round).

Daylight saving time (cron(8) on Debian, Vixie cron 3/4)
-------------------------------------------------------
Fire times are computed in the schedule's zone and returned as UTC instants. What happens when
the zone's offset changes depends on the job's kind, decided as Vixie cron decides it:

- **Wildcard jobs**: the minute or the hour field starts with ``*`` (``*/15 * * * *``,
  ``0 * * * *``, ``@hourly``, ``30 * * * *``, ``*/10 9 * * *``). They run "based on the new time
  immediately": every real instant whose local wall time matches fires, so they keep their
  real-time cadence through both transitions. Wall times skipped by a spring-forward gap do not
  exist and do not fire; wall times repeated by a fall-back fire on both passes (they are
  different instants). ``0 * * * *`` in Berlin on 2026-10-25 fires at 00:00, 01:00 and 02:00
  UTC (02:00 CEST, 02:00 CET, 03:00 CET): still one firing per real hour.
- **Fixed-time jobs**: every other job (``30 2 * * *``, ``0 7 * * MON-FRI``, ``@daily``, and
  also ``0 0-23 * * *``, which cron(8) treats as fixed because no field starts with ``*``).
  A wall time inside a spring-forward gap fires once, at the first instant after the gap (the
  transition itself: ``30 2 * * *`` in Berlin on 2026-03-29 fires at 03:00 CEST = 01:00 UTC).
  Several gap times collapse into that one firing, and into a firing due at the gap's end
  anyway (``0,30 2,3 * * *`` fires once at 03:00, then at 03:30). A wall time repeated by a
  fall-back fires once, on its first pass (``30 2 * * *`` in Berlin on 2026-10-25 fires at
  02:30 CEST = 00:30 UTC, not again at 02:30 CET).

Fire instants are strictly increasing, so ``(schedule_id, scheduled_for)`` is a unique key.
cron(8) applies its DST handling only to clock changes under three hours and treats larger
ones as clock corrections; here the offset changes come from the tz database, not from a
clock being set, so the rules above apply to every offset change whatever its size.

Bounds
------
An expression is at most 256 characters. Offset changes are found once per zone and year by
sampling the zone every 12 hours and bisecting each change to the second, and cached (about
1 ms a zone-year). Sampling cannot miss a change: in tzdata 2025b the closest two offset changes
of any zone since 1900 are four days apart (Africa/Freetown, 1939). A fire time is searched for at
most 50 years ahead; the sparsest valid expression (``0 0 29 2 *``) waits at most 8 years,
so the horizon is only a guard.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from chatjobs.errors import ChatJobsError

MAX_EXPRESSION_LENGTH = 256
HORIZON = timedelta(days=50 * 366)
FIELD_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")

NICKNAMES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

_MONTH_NAMES = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAY_NAMES = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February as in leap years
_SAMPLE = timedelta(hours=12)
_TICK = timedelta(microseconds=1)
# Far enough from datetime.max that a zone's offset and a day of arithmetic cannot overflow.
_LATEST = datetime(9998, 1, 1)


class InvalidSchedule(ChatJobsError, ValueError):
    """A schedule's cron, time zone or template is invalid (422, naming ``field``)."""

    field = "schedule"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message,))


class InvalidCron(InvalidSchedule):
    """The cron expression cannot be read, or can never fire."""

    field = "cron"


class UnknownTimezone(InvalidSchedule):
    """The time zone is not an IANA zone name."""

    field = "timezone"


@dataclass(frozen=True)
class _Field:
    name: str
    low: int
    high: int
    names: tuple[str, ...] = ()

    def error(self, problem: str) -> InvalidCron:
        return InvalidCron(f"cron: {self.name} field: {problem}")


_FIELDS = (
    _Field("minute", 0, 59),
    _Field("hour", 0, 23),
    _Field("day-of-month", 1, 31),
    _Field("month", 1, 12, _MONTH_NAMES),
    # 7 is Sunday as well as 0; names map SUN to 0.
    _Field("day-of-week", 0, 7, _DAY_NAMES),
)


@dataclass(frozen=True)
class Cron:
    """A parsed expression: the values each field allows, and how cron(8) combines them."""

    expression: str
    minutes: tuple[int, ...]
    hours: tuple[int, ...]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday ... 6 = Saturday
    days_either: bool  # both day fields restricted: a day matches if either matches
    fixed_time: bool  # neither minute nor hour starts with "*": DST-adjusted (module docstring)

    def matches_day(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        by_date = day.day in self.days
        by_weekday = day.isoweekday() % 7 in self.weekdays
        return (by_date or by_weekday) if self.days_either else (by_date and by_weekday)

    def first_time_from(self, hour: int, minute: int) -> tuple[int, int] | None:
        """The first (hour, minute) the expression allows at or after hour:minute of a day."""
        i = bisect.bisect_left(self.hours, hour)
        if i < len(self.hours) and self.hours[i] == hour:
            j = bisect.bisect_left(self.minutes, minute)
            if j < len(self.minutes):
                return hour, self.minutes[j]
            i += 1
        if i < len(self.hours):
            return self.hours[i], self.minutes[0]
        return None


@functools.lru_cache(maxsize=512)
def parse_cron(expression: str) -> Cron:
    """Parse and validate a 5-field expression or nickname; raise InvalidCron naming the field."""
    if len(expression) > MAX_EXPRESSION_LENGTH:
        raise InvalidCron(f"cron: longer than {MAX_EXPRESSION_LENGTH} characters")
    text = expression.strip()
    if not text:
        raise InvalidCron("cron: the expression is empty")
    if text.startswith("@"):
        nickname = text.lower()
        if nickname == "@reboot":
            raise InvalidCron("cron: @reboot is not supported: a schedule fires on the clock")
        if nickname not in NICKNAMES:
            known = ", ".join(NICKNAMES)
            raise InvalidCron(f"cron: unknown nickname {text!r} (use one of {known})")
        text = NICKNAMES[nickname]
    parts = text.split()
    if len(parts) != 5:
        raise InvalidCron(f"cron: expected 5 fields ({' '.join(FIELD_NAMES)}), got {len(parts)}")
    minutes, hours, days, months, weekdays = (
        _parse_field(field, part) for field, part in zip(_FIELDS, parts, strict=True)
    )
    if 7 in weekdays:
        weekdays = (weekdays - {7}) | {0}
    dom_restricted = not parts[2].startswith("*")
    dow_restricted = not parts[4].startswith("*")
    days_either = dom_restricted and dow_restricted
    if not (days_either or dow_restricted) and not any(
        day <= _DAYS_IN_MONTH[month - 1] for month in months for day in days
    ):
        raise InvalidCron(f"cron: never fires: no month in {parts[3]!r} has a day in {parts[2]!r}")
    return Cron(
        expression=expression,
        minutes=tuple(sorted(minutes)),
        hours=tuple(sorted(hours)),
        days=frozenset(days),
        months=frozenset(months),
        weekdays=frozenset(weekdays),
        days_either=days_either,
        fixed_time=not (parts[0].startswith("*") or parts[1].startswith("*")),
    )


def _parse_field(field: _Field, text: str) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        if not item:
            raise field.error(f"empty item in {text!r}")
        values |= _parse_item(field, item)
    return values


def _parse_item(field: _Field, item: str) -> set[int]:
    body, slash, step_text = item.partition("/")
    if body == "*":
        low, high = field.low, field.high
    elif "-" in body:
        first, _, last = body.partition("-")
        low, high = _value(field, first), _value(field, last)
        if low > high:
            raise field.error(f"range {body} runs backwards")
    else:
        low = high = _value(field, body)
        if slash:
            raise field.error(f"a step needs a range or *: write {body}-{field.high}/{step_text}")
    if not slash:
        return set(range(low, high + 1))
    if not (step_text.isascii() and step_text.isdigit()):
        raise field.error(f"step {step_text!r} is not a number")
    step = int(step_text)
    if not 1 <= step <= field.high:
        raise field.error(f"step {step} is out of range 1-{field.high}")
    return set(range(low, high + 1, step))


def _value(field: _Field, token: str) -> int:
    if token.isascii() and token.isdigit():
        value = int(token)
        if not field.low <= value <= field.high:
            raise field.error(f"{value} is out of range {field.low}-{field.high}")
        return value
    if token.upper() in field.names:
        return field.names.index(token.upper()) + field.low
    if not token:
        raise field.error("a range is missing a bound")
    if field.names:
        raise field.error(f"cannot read {token!r} (numbers or {field.names[0]}-{field.names[-1]})")
    raise field.error(f"cannot read {token!r} (numbers, *, ranges a-b, steps /n)")


@functools.lru_cache(maxsize=1)
def _zone_names() -> dict[str, str]:
    """Every IANA zone name known here, keyed by its lower case (for a did-you-mean hint)."""
    return {name.lower(): name for name in zoneinfo.available_timezones()}


def check_timezone(name: str) -> zoneinfo.ZoneInfo:
    """The zone named ``name`` (IANA, e.g. ``Europe/Berlin``); raise UnknownTimezone if none."""
    known = _zone_names().get(name.lower()) if len(name) <= 64 else None
    if known is None:
        raise UnknownTimezone(f"timezone: unknown IANA time zone {name[:64]!r}")
    if known != name:
        raise UnknownTimezone(f"timezone: unknown IANA time zone {name!r}; did you mean {known!r}?")
    return zoneinfo.ZoneInfo(name)


def validate(expression: str, timezone: str) -> tuple[Cron, zoneinfo.ZoneInfo]:
    """Parse the expression and the zone, as a schedule is created or changed."""
    return parse_cron(expression), check_timezone(timezone)


# --- fire times -----------------------------------------------------------------------------


def fires_after(expression: str, timezone: str, after_utc: datetime) -> Iterator[datetime]:
    """Every fire instant (UTC) strictly after ``after_utc``, ascending, up to 50 years on."""
    cron, zone = parse_cron(expression), check_timezone(timezone)
    after = _as_utc(after_utc).replace(tzinfo=None)  # checked now, not at the first next()
    return (instant.replace(tzinfo=UTC) for instant in _instants(cron, zone, after))


def next_fire(expression: str, timezone: str, after_utc: datetime) -> datetime:
    """The first fire instant (UTC) strictly after ``after_utc``.

    Raises InvalidCron if there is none within 50 years (only near the end of the calendar: an
    expression that parses always fires within 8 years).
    """
    for instant in fires_after(expression, timezone, after_utc):
        return instant
    raise InvalidCron(f"cron: no fire time within 50 years after {after_utc.isoformat()}")


def next_fire_times(expression: str, timezone: str, after_utc: datetime, n: int) -> list[datetime]:
    """The first ``n`` fire instants (UTC) strictly after ``after_utc`` (fewer at the horizon)."""
    return list(itertools.islice(fires_after(expression, timezone, after_utc), max(n, 0)))


def fires_between(
    expression: str, timezone: str, start_utc: datetime, end_utc: datetime, limit: int
) -> Iterator[datetime]:
    """Fire instants (UTC) with ``start_utc <= t < end_utc``, ascending, at most ``limit``."""
    end = _as_utc(end_utc)
    if limit <= 0:
        return
    for count, instant in enumerate(fires_after(expression, timezone, start_utc - _TICK), 1):
        if instant >= end:
            return
        yield instant
        if count == limit:
            return


def previous_fire(expression: str, timezone: str, before_utc: datetime) -> datetime:
    """The last fire instant (UTC) strictly before ``before_utc``.

    Searched forward over spans that grow fourfold from two minutes back, so the work is about
    the number of fire times in the last span, never the whole history.
    """
    before = _as_utc(before_utc)
    span = timedelta(minutes=2)
    while span <= HORIZON:
        last = None
        for instant in fires_after(expression, timezone, before - span):
            if instant >= before:
                break
            last = instant
        if last is not None:
            return last
        span *= 4
    raise InvalidCron(f"cron: no fire time within 50 years before {before.isoformat()}")


def _as_utc(moment: datetime) -> datetime:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"a naive datetime is ambiguous here: {moment.isoformat()}")
    return moment.astimezone(UTC)


def _instants(cron: Cron, zone: zoneinfo.ZoneInfo, after: datetime) -> Iterator[datetime]:
    """Fire instants (naive UTC) strictly after ``after``, ascending, until the horizon.

    Walks the zone's spans of constant UTC offset. Inside one, the fire times are the wall times
    the expression matches; at a change of offset the DST rules of the module docstring apply.
    """
    horizon = min(after + HORIZON, _LATEST)
    cursor = after + _TICK  # the earliest instant that may still be returned
    previous = _transition_at_or_before(zone, cursor)
    last = None
    while cursor < horizon:
        offset = _offset_at(zone, cursor)
        start_wall = _ceil_minute(cursor + offset)
        if cron.fixed_time and previous and previous.before > previous.after:
            # After a fall-back, a fixed-time job skips the wall times it already passed.
            start_wall = max(start_wall, previous.at + previous.before)
        wall = _next_wall_match(cron, start_wall, horizon + offset)
        candidate = horizon if wall is None else wall - offset
        change = _next_transition(zone, cursor, candidate)
        if change is None:
            if wall is None:
                return
            if candidate != last:
                yield candidate
                last = candidate
            cursor = candidate + _TICK
            continue
        # The offset changes before the candidate: nothing fires in [cursor, change.at).
        if (
            cron.fixed_time
            and change.after > change.before
            and change.at != last
            and _next_wall_match(
                cron, _ceil_minute(change.at + change.before), change.at + change.after
            )
            is not None
        ):
            # Wall times inside a spring-forward gap fire once, as the gap ends.
            yield change.at
            last = change.at
        cursor, previous = change.at, change


def _next_wall_match(cron: Cron, start: datetime, limit: datetime) -> datetime | None:
    """The first wall time (whole minute) ``start <= t < limit`` the expression matches."""
    day, hour, minute = start.date(), start.hour, start.minute
    while day <= limit.date():
        if day.month not in cron.months:
            day = date(day.year + day.month // 12, day.month % 12 + 1, 1)
            hour = minute = 0
            continue
        if cron.matches_day(day):
            found = cron.first_time_from(hour, minute)
            if found is not None:
                wall = datetime.combine(day, time(*found))
                return wall if wall < limit else None
        day += timedelta(days=1)
        hour = minute = 0
    return None


def _ceil_minute(moment: datetime) -> datetime:
    floor = moment.replace(second=0, microsecond=0)
    return floor if floor == moment else floor + timedelta(minutes=1)


# --- the zone's offset changes -------------------------------------------------------------


@dataclass(frozen=True)
class _Transition:
    at: datetime  # naive UTC: the first instant with the new offset
    before: timedelta
    after: timedelta


def _offset_at(zone: zoneinfo.ZoneInfo, instant: datetime) -> timedelta:
    offset = instant.replace(tzinfo=UTC).astimezone(zone).utcoffset()
    assert offset is not None
    return offset


@functools.lru_cache(maxsize=1024)
def _transitions(zone: zoneinfo.ZoneInfo, year: int) -> tuple[_Transition, ...]:
    """The offset changes of ``zone`` in (Jan 1 ``year``, Jan 1 ``year + 1``] UTC, ascending."""
    found = []
    moment, end = datetime(year, 1, 1), datetime(year + 1, 1, 1)
    offset = _offset_at(zone, moment)
    while moment < end:
        probe = min(moment + _SAMPLE, end)
        new = _offset_at(zone, probe)
        if new != offset:
            low, high = moment, probe  # bisect to the second: low has the old offset
            while high - low > timedelta(seconds=1):
                middle = low + timedelta(seconds=(high - low).total_seconds() // 2)
                if _offset_at(zone, middle) == offset:
                    low = middle
                else:
                    high = middle
            found.append(_Transition(at=high, before=offset, after=new))
            offset = new
        moment = probe
    return tuple(found)


def _next_transition(
    zone: zoneinfo.ZoneInfo, instant: datetime, limit: datetime
) -> _Transition | None:
    """The first offset change in (``instant``, ``limit``], if any."""
    for year in range(instant.year, limit.year + 1):
        changes = _transitions(zone, year)
        i = bisect.bisect_right(changes, instant, key=lambda change: change.at)
        if i < len(changes):
            return changes[i] if changes[i].at <= limit else None
    return None


def _transition_at_or_before(zone: zoneinfo.ZoneInfo, instant: datetime) -> _Transition | None:
    """The latest offset change at or before ``instant`` within about a year, if any."""
    for year in (instant.year, instant.year - 1):
        if year < 1:
            break
        changes = _transitions(zone, year)
        i = bisect.bisect_right(changes, instant, key=lambda change: change.at)
        if i:
            return changes[i - 1]
    return None
