"""The batches pages' pure parts: the pace (rate and ETA) of a batch and how it reads, and the
progress of a batch row as its page and its JSON show it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest

from api.ui.batches import Pace, Progress, duration_text, pace, rate_text

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_rate_is_lines_ended_per_second_since_in_progress_and_eta_the_rest_at_that_rate() -> None:
    assert pace(ended=30, total=100, started=T0, until=None, now=at(10)) == Pace(3.0, 70 / 3)


def test_nothing_is_known_before_the_batch_runs_or_before_a_line_ends() -> None:
    assert pace(ended=0, total=0, started=None, until=None, now=at(5)) == Pace(None, None)
    assert pace(ended=0, total=10, started=T0, until=None, now=at(5)) == Pace(None, None)
    # A clock behind in_progress_at (the database's) is no rate rather than a negative one.
    assert pace(ended=3, total=10, started=T0, until=None, now=at(-1)) == Pace(None, None)


def test_an_ended_batch_keeps_its_mean_rate_up_to_its_end_and_has_no_eta() -> None:
    assert pace(ended=50, total=50, started=T0, until=at(25), now=at(1000)) == Pace(2.0, None)


def test_every_line_ended_while_running_is_an_eta_of_zero() -> None:
    assert pace(ended=10, total=10, started=T0, until=None, now=at(5)) == Pace(2.0, 0.0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "—"),
        (0, "0 s"),
        (44.6, "45 s"),
        (59.4, "59 s"),
        (60, "1 min 00 s"),
        (200, "3 min 20 s"),
        (3600, "1 h 00 min"),
        (7500, "2 h 05 min"),
        (86400 * 3 + 3600 * 4 + 59, "3 d 4 h"),
    ],
)
def test_durations_read_in_the_largest_two_units(seconds: float | None, text: str) -> None:
    assert duration_text(seconds) == text


@pytest.mark.parametrize(
    ("rate", "text"),
    [(None, "—"), (12.345, "12.3 lines/s"), (1.0, "1.0 lines/s"), (0.0234, "0.023 lines/s")],
)
def test_rates_read_in_lines_per_second(rate: float | None, text: str) -> None:
    assert rate_text(rate) == text


def batch(**fields: Any) -> Any:
    row: dict[str, Any] = {
        "id": "batch_" + "0" * 32,
        "status": "in_progress",
        "request_total": 10,
        "request_completed": 4,
        "request_failed": 3,
        "request_expired": 1,
        "request_cancelled": 0,
        "in_progress_at": T0,
        "finished_at": None,
        "input_tokens": 100,
        "output_tokens": 20,
        "total_tokens": 120,
    }
    return SimpleNamespace(**(row | fields))


def test_progress_counts_by_outcome_and_paces_a_running_batch() -> None:
    p = Progress.of(batch(), running=2, now=at(7))
    assert (p.total, p.ended, p.succeeded, p.failed) == (10, 7, 4, 3)
    assert (p.errored, p.expired, p.cancelled, p.pending, p.running) == (2, 1, 0, 3, 2)
    assert (p.percent, p.rate, p.eta_seconds) == ("70 %", 1.0, 3.0)
    assert (p.rate_text, p.eta_text, p.final) == ("1.0 lines/s", "3 s", False)


def test_progress_reads_100_percent_only_once_every_line_has_ended() -> None:
    assert (
        Progress.of(
            batch(request_total=1000, request_completed=999, request_failed=0),
            running=1,
            now=at(10),
        ).percent
        == "99 %"
    )
    done = Progress.of(
        batch(status="completed", request_completed=7, finished_at=at(5)), running=0, now=at(99)
    )
    assert (done.percent, done.final, done.rate, done.eta_text) == ("100 %", True, 2.0, "—")


def test_a_validating_batch_has_no_lines_and_no_pace_yet() -> None:
    p = Progress.of(
        batch(
            status="validating",
            request_total=0,
            request_completed=0,
            request_failed=0,
            request_expired=0,
            in_progress_at=None,
        ),
        running=0,
        now=at(3),
    )
    assert (p.percent, p.pending, p.rate_text, p.eta_text) == ("0 %", 0, "—", "—")
