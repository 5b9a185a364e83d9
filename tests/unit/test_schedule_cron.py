"""Cron expressions: parsing, every error, cron(8) day rules, and fire times across DST.

DST dates tested (the zones' 2026 and 2027 transitions, checked against the tz database) and
the fire times observed, in UTC and local time:

Spring forward (the local hour 02:00-02:59 does not exist):
  Europe/Berlin     2026-03-29 and 2027-03-28, 02:00 CET -> 03:00 CEST at 01:00 UTC
    30 2 * * *     fires once at 03:00 CEST = 01:00 UTC (the first instant after the gap)
    0 * * * *      00:00 UTC (01:00 CET), then 01:00 UTC (03:00 CEST): 23 firings that day,
                   one real hour apart
    */15 * * * *   00:45 UTC (01:45 CET), then 01:00 UTC (03:00 CEST): 92 firings, 15 min apart
  America/New_York  2026-03-08 and 2027-03-14, 02:00 EST -> 03:00 EDT at 07:00 UTC
    30 2 * * *     fires once at 03:00 EDT = 07:00 UTC
    0 * * * *      06:00 UTC (01:00 EST), then 07:00 UTC (03:00 EDT): 23 firings, an hour apart
    */15 * * * *   92 firings, 15 min apart

Fall back (a local hour repeats):
  Europe/Berlin     2026-10-25 and 2027-10-31, 03:00 CEST -> 02:00 CET at 01:00 UTC
    30 2 * * *     fires once, on the first pass: 02:30 CEST = 00:30 UTC
    0 * * * *      00:00 UTC (02:00 CEST), 01:00 UTC (02:00 CET), 02:00 UTC (03:00 CET):
                   25 firings, an hour apart
    */15 * * * *   100 firings, 15 min apart (02:00-02:45 CEST, then 02:00-02:45 CET)
  America/New_York  2026-11-01 and 2027-11-07, 02:00 EDT -> 01:00 EST at 06:00 UTC
    30 1 * * *     fires once, on the first pass: 01:30 EDT = 05:30 UTC
    30 2 * * *     02:30 EST = 07:30 UTC (02:30 happens once in New York)
    0 * * * *      05:00 UTC (01:00 EDT), 06:00 UTC (01:00 EST), 07:00 UTC (02:00 EST):
                   25 firings, an hour apart
    */15 * * * *   100 firings, 15 min apart

A fixed-time job (neither the minute nor the hour field starts with "*") fires once a day
on every one of these dates; a wildcard job keeps its real-time cadence.
"""

from __future__ import annotations

import pickle
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chatjobs.errors import ChatJobsError
from chatjobs.schedules.cron import (
    Cron,
    InvalidCron,
    UnknownTimezone,
    check_timezone,
    fires_after,
    fires_between,
    next_fire,
    next_fire_times,
    parse_cron,
    previous_fire,
)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def local_day(timezone: str, day: str) -> tuple[datetime, datetime]:
    """The UTC instants at which a local calendar day starts and ends."""
    zone = ZoneInfo(timezone)
    start = datetime.fromisoformat(day)
    return (
        start.replace(tzinfo=zone).astimezone(UTC),
        (start + timedelta(days=1)).replace(tzinfo=zone).astimezone(UTC),
    )


def steps(fires: list[datetime]) -> set[timedelta]:
    """The distinct real-time intervals between consecutive fire times."""
    return {b - a for a, b in pairwise(fires)}


def day_fires(expression: str, timezone: str, day: str) -> list[datetime]:
    return list(fires_between(expression, timezone, *local_day(timezone, day), limit=500))


# --- parsing ---------------------------------------------------------------------------------


def test_a_plain_expression_allows_the_listed_values_of_each_field() -> None:
    cron = parse_cron("5,10-12,*/20 8-18/5 1,15 JAN-mar,dec MON-FRI")
    assert cron.minutes == (0, 5, 10, 11, 12, 20, 40)
    assert cron.hours == (8, 13, 18)
    assert cron.days == {1, 15}
    assert cron.months == {1, 2, 3, 12}
    assert cron.weekdays == {1, 2, 3, 4, 5}
    assert cron.days_either and cron.fixed_time


def test_seven_is_sunday_as_zero_is() -> None:
    assert parse_cron("0 0 * * 7").weekdays == {0}
    assert parse_cron("0 0 * * 5-7").weekdays == {5, 6, 0}
    assert parse_cron("0 0 * * sun").weekdays == {0}
    assert parse_cron("0 0 * * 0-7").weekdays == set(range(7))


def test_fields_may_be_separated_by_tabs_and_several_spaces() -> None:
    assert parse_cron(" 0\t9  *   * 1 ").hours == (9,)


@pytest.mark.parametrize(
    ("nickname", "same_as"),
    [
        ("@yearly", "0 0 1 1 *"),
        ("@annually", "0 0 1 1 *"),
        ("@monthly", "0 0 1 * *"),
        ("@weekly", "0 0 * * 0"),
        ("@daily", "0 0 * * *"),
        ("@midnight", "0 0 * * *"),
        ("@hourly", "0 * * * *"),
        ("@DAILY", "0 0 * * *"),
    ],
)
def test_a_nickname_fires_as_its_five_fields(nickname: str, same_as: str) -> None:
    after = utc("2026-02-11T13:14:00")
    assert next_fire_times(nickname, "Europe/Berlin", after, 5) == next_fire_times(
        same_as, "Europe/Berlin", after, 5
    )


def test_hourly_is_a_wildcard_job_and_daily_a_fixed_time_one() -> None:
    assert not parse_cron("@hourly").fixed_time
    assert parse_cron("@daily").fixed_time
    assert not parse_cron("*/10 9 * * *").fixed_time
    assert not parse_cron("30 * * * *").fixed_time
    # cron(8) looks at the first character only: a list of every hour is still fixed-time.
    assert parse_cron("0 0-23 * * *").fixed_time


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "cron: the expression is empty"),
        ("   ", "cron: the expression is empty"),
        (
            "* * * *",
            "cron: expected 5 fields (minute hour day-of-month month day-of-week), got 4",
        ),
        (
            "0 0 0 * * *",
            "cron: expected 5 fields (minute hour day-of-month month day-of-week), got 6",
        ),
        ("60 * * * *", "cron: minute field: 60 is out of range 0-59"),
        ("0 24 * * *", "cron: hour field: 24 is out of range 0-23"),
        ("0 0 0 * *", "cron: day-of-month field: 0 is out of range 1-31"),
        ("0 0 32 * *", "cron: day-of-month field: 32 is out of range 1-31"),
        ("0 0 * 0 *", "cron: month field: 0 is out of range 1-12"),
        ("0 0 * 13 *", "cron: month field: 13 is out of range 1-12"),
        ("0 0 * * 8", "cron: day-of-week field: 8 is out of range 0-7"),
        ("*/0 * * * *", "cron: minute field: step 0 is out of range 1-59"),
        ("*/60 * * * *", "cron: minute field: step 60 is out of range 1-59"),
        ("0 */24 * * *", "cron: hour field: step 24 is out of range 1-23"),
        ("*/x * * * *", "cron: minute field: step 'x' is not a number"),
        ("5/15 * * * *", "cron: minute field: a step needs a range or *: write 5-59/15"),
        ("30-10 * * * *", "cron: minute field: range 30-10 runs backwards"),
        ("0 0 * * FRI-MON", "cron: day-of-week field: range FRI-MON runs backwards"),
        ("1,,2 * * * *", "cron: minute field: empty item in '1,,2'"),
        ("1- * * * *", "cron: minute field: a range is missing a bound"),
        ("-1 * * * *", "cron: minute field: a range is missing a bound"),
        ("0 0 * FOO *", "cron: month field: cannot read 'FOO' (numbers or JAN-DEC)"),
        ("0 0 * * MONDAY", "cron: day-of-week field: cannot read 'MONDAY' (numbers or SUN-SAT)"),
        ("0 MON * * *", "cron: hour field: cannot read 'MON' (numbers, *, ranges a-b, steps /n)"),
        (
            "0 0 L * *",
            "cron: day-of-month field: cannot read 'L' (numbers, *, ranges a-b, steps /n)",
        ),
        (
            "0 0 ? * *",
            "cron: day-of-month field: cannot read '?' (numbers, *, ranges a-b, steps /n)",
        ),
        ("0 0 * * 1#2", "cron: day-of-week field: cannot read '1#2' (numbers or SUN-SAT)"),
        (
            "\u0663 * * * *",
            "cron: minute field: cannot read '\u0663' (numbers, *, ranges a-b, steps /n)",
        ),
        ("0 0 30 2 *", "cron: never fires: no month in '2' has a day in '30'"),
        ("0 0 31 4,6,9,11 *", "cron: never fires: no month in '4,6,9,11' has a day in '31'"),
        ("0 0 30-31 FEB *", "cron: never fires: no month in 'FEB' has a day in '30-31'"),
        ("@reboot", "cron: @reboot is not supported: a schedule fires on the clock"),
        (
            "@fortnightly",
            "cron: unknown nickname '@fortnightly' (use one of @yearly, @annually, @monthly,"
            " @weekly, @daily, @midnight, @hourly)",
        ),
        ("0 " * 200, "cron: longer than 256 characters"),
    ],
)
def test_an_invalid_expression_is_refused_naming_the_field_and_the_rule(
    expression: str, message: str
) -> None:
    with pytest.raises(InvalidCron) as caught:
        parse_cron(expression)
    assert str(caught.value) == message
    assert caught.value.field == "cron"


def test_a_cron_error_is_a_value_error_of_chatjobs_and_pickles() -> None:
    with pytest.raises(InvalidCron) as caught:
        parse_cron("0 24 * * *")
    error = caught.value
    assert isinstance(error, ValueError) and isinstance(error, ChatJobsError)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is InvalidCron and copy.message == error.message and copy.field == "cron"


def test_february_the_29th_is_valid_and_fires_in_leap_years() -> None:
    assert next_fire_times("0 0 29 2 *", "UTC", utc("2026-01-01T00:00"), 3) == [
        utc("2028-02-29T00:00"),
        utc("2032-02-29T00:00"),
        utc("2036-02-29T00:00"),
    ]
    # 2100 is not a leap year: the longest wait any valid expression has, eight years.
    assert next_fire("0 0 29 2 *", "UTC", utc("2096-03-01T00:00")) == utc("2104-02-29T00:00")


def test_a_day_of_month_that_never_comes_is_valid_when_the_weekday_can_fire() -> None:
    # Both day fields restricted: Mondays of February fire, the 30th never comes.
    assert next_fire("0 0 30 2 MON", "UTC", utc("2026-01-01T00:00")) == utc("2026-02-02T00:00")


# --- the day rule ----------------------------------------------------------------------------


def fire_days(expression: str, start: str, end: str) -> list[int]:
    return [
        instant.day for instant in fires_between(expression, "UTC", utc(start), utc(end), limit=100)
    ]


def test_both_day_fields_restricted_fire_on_either() -> None:
    # June 2026: Mondays are the 1st, 8th, 15th, 22nd and 29th.
    assert fire_days("0 9 1,15,20 * MON", "2026-06-01", "2026-07-01") == [1, 8, 15, 20, 22, 29]
    assert fire_days("0 9 13 * FRI", "2026-02-01", "2026-04-01") == [6, 13, 20, 27, 6, 13, 20, 27]


def test_a_day_field_starting_with_a_star_makes_both_required() -> None:
    assert fire_days("0 9 * * MON", "2026-06-01", "2026-07-01") == [1, 8, 15, 22, 29]
    assert fire_days("0 9 1,15 * *", "2026-06-01", "2026-07-01") == [1, 15]
    # As in Vixie cron, "*/2" counts as a star: odd days that are Mondays.
    assert fire_days("0 9 */2 * MON", "2026-06-01", "2026-07-01") == [1, 15, 29]


# --- time zones ------------------------------------------------------------------------------


def test_a_known_zone_is_returned() -> None:
    assert check_timezone("Europe/Berlin") == ZoneInfo("Europe/Berlin")
    assert check_timezone("UTC") == ZoneInfo("UTC")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Europe/Berln", "timezone: unknown IANA time zone 'Europe/Berln'"),
        ("", "timezone: unknown IANA time zone ''"),
        ("../../etc/passwd", "timezone: unknown IANA time zone '../../etc/passwd'"),
        ("+02:00", "timezone: unknown IANA time zone '+02:00'"),
        (
            "europe/berlin",
            "timezone: unknown IANA time zone 'europe/berlin'; did you mean 'Europe/Berlin'?",
        ),
        ("x" * 1000, f"timezone: unknown IANA time zone '{'x' * 64}'"),
    ],
)
def test_an_unknown_zone_is_refused_with_its_name(name: str, message: str) -> None:
    with pytest.raises(UnknownTimezone) as caught:
        check_timezone(name)
    assert str(caught.value) == message
    assert caught.value.field == "timezone"
    assert isinstance(caught.value, ValueError)


# --- fire times ------------------------------------------------------------------------------


def test_the_next_fire_is_strictly_after_the_given_instant() -> None:
    assert next_fire("0 7 * * *", "UTC", utc("2026-05-01T07:00")) == utc("2026-05-02T07:00")
    assert next_fire("0 7 * * *", "UTC", utc("2026-05-01T06:59:59.999999")) == utc(
        "2026-05-01T07:00"
    )


def test_fire_times_are_utc_whatever_zone_the_instant_was_given_in() -> None:
    after = datetime(2026, 5, 1, 9, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    fire = next_fire("0 7 * * *", "Europe/Berlin", after)
    assert fire == utc("2026-05-02T05:00") and fire.tzinfo is UTC


def test_a_naive_instant_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        next_fire("0 7 * * *", "UTC", datetime(2026, 5, 1))


def test_invalid_input_is_refused_before_iterating() -> None:
    with pytest.raises(InvalidCron):
        fires_after("0 24 * * *", "UTC", utc("2026-05-01T00:00"))
    with pytest.raises(UnknownTimezone):
        fires_after("0 0 * * *", "Mars/Olympus", utc("2026-05-01T00:00"))


def test_fires_between_is_half_open_and_limited() -> None:
    start, end = utc("2026-05-01T00:00"), utc("2026-05-01T01:00")
    fires = list(fires_between("*/15 * * * *", "UTC", start, end, limit=100))
    assert fires == [start + timedelta(minutes=m) for m in (0, 15, 30, 45)]
    assert list(fires_between("*/15 * * * *", "UTC", start, end, limit=2)) == fires[:2]
    assert list(fires_between("*/15 * * * *", "UTC", start, end, limit=0)) == []


def test_the_previous_fire_is_strictly_before_the_given_instant() -> None:
    assert previous_fire("0 7 * * *", "UTC", utc("2026-05-02T07:00")) == utc("2026-05-01T07:00")
    assert previous_fire("0 0 29 2 *", "UTC", utc("2026-05-01T00:00")) == utc("2024-02-29T00:00")
    assert previous_fire("* * * * *", "UTC", utc("2026-05-01T00:00:30")) == utc("2026-05-01T00:00")


# --- DST -------------------------------------------------------------------------------------

SPRING = [
    ("Europe/Berlin", "2026-03-29", "2026-03-29T01:00"),
    ("Europe/Berlin", "2027-03-28", "2027-03-28T01:00"),
    ("America/New_York", "2026-03-08", "2026-03-08T07:00"),
    ("America/New_York", "2027-03-14", "2027-03-14T07:00"),
]
FALL = [
    ("Europe/Berlin", "2026-10-25", "2026-10-25T01:00"),
    ("Europe/Berlin", "2027-10-31", "2027-10-31T01:00"),
    ("America/New_York", "2026-11-01", "2026-11-01T06:00"),
    ("America/New_York", "2027-11-07", "2027-11-07T06:00"),
]


@pytest.mark.parametrize(("zone", "day", "change"), SPRING + FALL)
def test_the_tested_dates_are_the_zones_transitions(zone: str, day: str, change: str) -> None:
    tz = ZoneInfo(zone)
    before, at = utc(change) - timedelta(seconds=1), utc(change)
    assert before.astimezone(tz).utcoffset() != at.astimezone(tz).utcoffset()
    assert at.astimezone(tz).date() == date.fromisoformat(day)


@pytest.mark.parametrize(("zone", "day", "change"), SPRING)
def test_a_fixed_time_in_the_spring_gap_fires_once_as_the_gap_ends(
    zone: str, day: str, change: str
) -> None:
    assert day_fires("30 2 * * *", zone, day) == [utc(change)]
    assert utc(change).astimezone(ZoneInfo(zone)).strftime("%H:%M") == "03:00"
    # The days around it fire at 02:30 local as usual.
    previous_day = (date.fromisoformat(day) - timedelta(days=1)).isoformat()
    (fire,) = day_fires("30 2 * * *", zone, previous_day)
    assert fire.astimezone(ZoneInfo(zone)).strftime("%H:%M") == "02:30"


@pytest.mark.parametrize(("zone", "day", "change"), SPRING)
def test_gap_times_and_the_gaps_end_collapse_into_one_firing(
    zone: str, day: str, change: str
) -> None:
    fires = day_fires("0,30 2,3 * * *", zone, day)
    assert fires == [utc(change), utc(change) + timedelta(minutes=30)]


@pytest.mark.parametrize(
    ("zone", "day", "expression", "fire"),
    [
        ("Europe/Berlin", "2026-10-25", "30 2 * * *", "2026-10-25T00:30"),
        ("Europe/Berlin", "2027-10-31", "30 2 * * *", "2027-10-31T00:30"),
        ("America/New_York", "2026-11-01", "30 1 * * *", "2026-11-01T05:30"),
        ("America/New_York", "2027-11-07", "30 1 * * *", "2027-11-07T05:30"),
        # 02:30 happens once in New York (the repeated hour there is 01:00-01:59).
        ("America/New_York", "2026-11-01", "30 2 * * *", "2026-11-01T07:30"),
    ],
)
def test_a_fixed_time_in_the_repeated_hour_fires_once_on_its_first_pass(
    zone: str, day: str, expression: str, fire: str
) -> None:
    assert day_fires(expression, zone, day) == [utc(fire)]


@pytest.mark.parametrize(("zone", "day", "change"), SPRING)
def test_an_hourly_job_keeps_firing_every_real_hour_across_the_gap(
    zone: str, day: str, change: str
) -> None:
    fires = day_fires("0 * * * *", zone, day)
    assert len(fires) == 23
    assert steps(fires) == {timedelta(hours=1)}
    assert utc(change) in fires  # 03:00 local, the first hour after the gap


@pytest.mark.parametrize(("zone", "day", "change"), FALL)
def test_an_hourly_job_fires_in_both_passes_of_the_repeated_hour(
    zone: str, day: str, change: str
) -> None:
    fires = day_fires("0 * * * *", zone, day)
    assert len(fires) == 25
    assert steps(fires) == {timedelta(hours=1)}
    first_pass, second_pass = utc(change) - timedelta(hours=1), utc(change)
    tz = ZoneInfo(zone)
    assert first_pass in fires and second_pass in fires
    assert first_pass.astimezone(tz).strftime("%H:%M") == second_pass.astimezone(tz).strftime(
        "%H:%M"
    )


@pytest.mark.parametrize(("zone", "day", "change"), SPRING + FALL)
def test_a_quarter_hourly_job_keeps_its_real_time_cadence(zone: str, day: str, change: str) -> None:
    fires = day_fires("*/15 * * * *", zone, day)
    assert len(fires) == (92 if (zone, day, change) in SPRING else 100)
    assert steps(fires) == {timedelta(minutes=15)}


@pytest.mark.parametrize(("zone", "day", "change"), SPRING + FALL)
def test_a_daily_job_outside_the_changed_hour_fires_at_its_local_time(
    zone: str, day: str, change: str
) -> None:
    (fire,) = day_fires("0 7 * * *", zone, day)
    assert fire.astimezone(ZoneInfo(zone)).strftime("%H:%M") == "07:00"


# --- properties ------------------------------------------------------------------------------

ZONES = [
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Europe/London",
    "Australia/Sydney",
    "Australia/Lord_Howe",  # half-hour DST
    "America/Santiago",  # changes at midnight
    "America/Havana",  # changes at midnight
    "Asia/Kolkata",
]
EXPRESSIONS = [
    "* * * * *",
    "*/15 * * * *",
    "0 * * * *",
    "30 * * * *",
    "30 2 * * *",
    "0,30 0-3 * * *",
    "15 0 * * *",
    "0 7 * * MON-FRI",
    "0 9 1,15 * MON",
    "0 0 29 2 *",
    "*/10 2 * * *",
    "@weekly",
]
instants = st.datetimes(
    min_value=datetime(2024, 1, 1), max_value=datetime(2029, 12, 31), timezones=st.just(UTC)
)


def wall_matches(cron: Cron, wall: datetime) -> bool:
    return (
        wall.second == 0
        and wall.minute in cron.minutes
        and wall.hour in cron.hours
        and cron.matches_day(wall.date())
    )


def is_forward_change(zone: ZoneInfo, instant: datetime) -> bool:
    before = (instant - timedelta(seconds=1)).astimezone(zone).utcoffset()
    after = instant.astimezone(zone).utcoffset()
    return before is not None and after is not None and after > before


@settings(max_examples=60, deadline=None)
@given(expression=st.sampled_from(EXPRESSIONS), zone=st.sampled_from(ZONES), after=instants)
@example("0,30 0-3 * * *", "Europe/Berlin", utc("2026-03-28T23:00"))
@example("30 2 * * *", "America/New_York", utc("2027-03-13T12:00"))
@example("*/10 2 * * *", "Australia/Lord_Howe", utc("2026-04-04T12:00"))
def test_fire_times_increase_and_match_the_expression_in_local_time(
    expression: str, zone: str, after: datetime
) -> None:
    cron, tz = parse_cron(expression), ZoneInfo(zone)
    fires = next_fire_times(expression, zone, after, 12)
    assert fires[0] > after
    assert all(a < b for a, b in pairwise(fires))
    for fire in fires:
        wall = fire.astimezone(tz).replace(tzinfo=None)
        # A fixed-time job may also fire where a spring-forward gap ends.
        assert wall_matches(cron, wall) or (cron.fixed_time and is_forward_change(tz, fire))


@settings(max_examples=60, deadline=None)
@given(
    expression=st.sampled_from(EXPRESSIONS),
    zone=st.sampled_from(ZONES),
    after=instants,
    back=st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=12)),
)
@example("*/15 * * * *", "Europe/Berlin", utc("2026-10-25T00:40"), timedelta(hours=2))
@example("30 2 * * *", "Europe/Berlin", utc("2026-10-25T00:40"), timedelta(hours=2))
@example("0,30 0-3 * * *", "America/New_York", utc("2026-11-01T06:10"), timedelta(hours=3))
@example("0,30 0-3 * * *", "America/New_York", utc("2026-03-08T07:00"), timedelta(hours=1))
def test_fire_times_do_not_depend_on_where_the_search_starts(
    expression: str, zone: str, after: datetime, back: timedelta
) -> None:
    end = after + timedelta(hours=6)
    from_earlier = [
        t for t in fires_between(expression, zone, after - back, end, limit=2000) if t > after
    ]
    from_here = list(fires_between(expression, zone, after + timedelta(microseconds=1), end, 2000))
    assert from_here == from_earlier


@settings(max_examples=60, deadline=None)
@given(expression=st.sampled_from(EXPRESSIONS), zone=st.sampled_from(ZONES), after=instants)
def test_no_fire_time_lies_between_an_instant_and_the_next_fire(
    expression: str, zone: str, after: datetime
) -> None:
    fire = next_fire(expression, zone, after)
    assert previous_fire(expression, zone, fire) <= after


@settings(max_examples=60, deadline=None)
@given(
    minute=st.integers(0, 59),
    hour=st.integers(0, 23),
    zone=st.sampled_from(ZONES),
    year=st.sampled_from([2026, 2027]),
)
def test_a_fixed_daily_time_fires_exactly_once_every_local_day(
    minute: int, hour: int, zone: str, year: int
) -> None:
    tz = ZoneInfo(zone)
    start = datetime(year, 1, 1).replace(tzinfo=tz).astimezone(UTC)
    end = datetime(year + 1, 1, 1).replace(tzinfo=tz).astimezone(UTC)
    fires = list(fires_between(f"{minute} {hour} * * *", zone, start, end, limit=400))
    days = [fire.astimezone(tz).date() for fire in fires]
    assert len(days) == len(set(days)) == (date(year + 1, 1, 1) - date(year, 1, 1)).days


def offset_changes(zone: ZoneInfo, year: int) -> list[datetime]:
    """The instants in ``year`` at which ``zone`` changes its offset (an hourly scan)."""
    changes, moment = [], utc(f"{year}-01-01T00:00")
    while moment.year == year:
        if (
            moment.astimezone(zone).utcoffset()
            != (moment - timedelta(hours=1)).astimezone(zone).utcoffset()
        ):
            changes.append(moment)
        moment += timedelta(hours=1)
    return changes


@pytest.mark.parametrize("year", [2026, 2027])
@pytest.mark.parametrize("zone", ZONES)
def test_a_quarter_hourly_job_never_doubles_or_skips_real_time_at_any_change(
    zone: str, year: int
) -> None:
    for change in offset_changes(ZoneInfo(zone), year):
        start, end = change - timedelta(hours=6), change + timedelta(hours=6)
        fires = list(fires_between("*/15 * * * *", zone, start, end, limit=100))
        assert len(fires) == 48
        assert steps(fires) == {timedelta(minutes=15)}
