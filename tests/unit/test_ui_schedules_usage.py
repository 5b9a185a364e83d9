"""The schedules and usage pages' pure parts: instants shown in a schedule's zone with UTC
beside them, the usage form's range, the day range filled for the charts, series and totals."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from api.ui.schedules import zoned
from api.ui.usage import Range, by_model, day_range, parse_range, totals
from chatjobs.usage import UsageRow


@pytest.mark.parametrize(
    ("moment", "zone", "shown"),
    [
        (
            datetime(2026, 12, 2, 6, tzinfo=UTC),
            "Europe/Berlin",
            "2026-12-02 07:00 Europe/Berlin (06:00 UTC)",
        ),
        # Summer time: the same wall time is an hour earlier in UTC.
        (
            datetime(2027, 3, 28, 5, tzinfo=UTC),
            "Europe/Berlin",
            "2027-03-28 07:00 Europe/Berlin (05:00 UTC)",
        ),
        # A local day that is not the UTC day names the UTC date too.
        (
            datetime(2026, 12, 1, 15, 30, tzinfo=UTC),
            "Asia/Tokyo",
            "2026-12-02 00:30 Asia/Tokyo (2026-12-01 15:30 UTC)",
        ),
        (datetime(2026, 12, 2, 6, tzinfo=UTC), "UTC", "2026-12-02 06:00 UTC"),
        (datetime(2026, 12, 2, 6, 1, 2, 300, tzinfo=UTC), "UTC", "2026-12-02 06:01:02 UTC"),
        (datetime(2026, 12, 2, 6, tzinfo=UTC), "Mars/Olympus", "2026-12-02 06:00 UTC"),
    ],
)
def test_zoned_shows_the_wall_time_in_the_zone_and_utc_beside_it(
    moment: datetime, zone: str, shown: str
) -> None:
    assert zoned(moment, zone) == shown


TODAY = date(2026, 12, 1)


def test_the_range_defaults_to_today_and_the_six_days_before() -> None:
    assert parse_range(None, "", today=TODAY) == (Range(date(2026, 11, 25), TODAY), {})
    shown, errors = parse_range("2026-06-01", "2026-06-01", today=TODAY)
    assert errors == {}
    assert shown.instants() == (
        datetime(2026, 6, 1, tzinfo=UTC),
        datetime(2026, 6, 2, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("start", "end", "field", "words"),
    [
        ("junk", None, "start", "YYYY-MM-DD"),
        ("2026-06-01", "2026-13-01", "end", "YYYY-MM-DD"),
        ("2026-06-02", "2026-06-01", "end", "before start"),
        ("2025-01-01", "2026-06-01", "start", "366 days"),
        ("9999-12-31", "2026-06-01", "start", "1970-01-01 to 8999-12-31"),
        ("1969-12-31", "1970-01-01", "start", "1970-01-01 to 8999-12-31"),
    ],
)
def test_a_bad_range_names_its_field(start: str, end: str | None, field: str, words: str) -> None:
    _, errors = parse_range(start, end, today=TODAY)
    assert list(errors) == [field] and words in errors[field]


def test_day_range_fills_every_day_both_ends_included() -> None:
    assert day_range(date(2026, 2, 27), date(2026, 3, 2)) == [
        date(2026, 2, 27),
        date(2026, 2, 28),
        date(2026, 3, 1),
        date(2026, 3, 2),
    ]
    assert day_range(TODAY, TODAY) == [TODAY]


def _row(day: date, model: str, requests: int, tokens: int, cost: float | None) -> UsageRow:
    return UsageRow(model, day, requests, 0, tokens, 0, tokens, cost)


def test_series_per_model_biggest_first_with_empty_days_as_zero() -> None:
    d1, d2, d3 = day_range(date(2026, 6, 1), date(2026, 6, 3))
    rows = [
        _row(d1, "small", 1, 10, None),
        _row(d3, "big", 2, 500, 0.5),
        _row(d1, "big", 1, 5, 0.1),
    ]
    tokens = by_model(rows, [d1, d2, d3], "total_tokens")
    requests = by_model(rows, [d1, d2, d3], "requests")
    assert [(s.name, list(s.values)) for s in tokens] == [
        ("big", [5, 0, 500]),
        ("small", [10, 0, 0]),
    ]
    assert [(s.name, list(s.values)) for s in requests] == [
        ("big", [1, 0, 2]),
        ("small", [1, 0, 0]),
    ]


def test_totals_sum_the_rows_and_price_only_the_priced() -> None:
    rows = [_row(TODAY, "a", 1, 10, 0.25), _row(TODAY, "b", 2, 20, None)]
    got = totals(rows)
    assert (got.requests, got.total_tokens, got.cost_usd, got.unpriced) == (3, 30, 0.25, True)
    assert totals([]).cost_usd is None
