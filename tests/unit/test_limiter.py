"""The limiter's pure arithmetic: the send log's share of an interval, the pause after a 429."""

from __future__ import annotations

import pytest

from chatjobs.limiter import Limits


def test_the_send_log_allows_a_seconds_share_over_a_little_more_than_a_second() -> None:
    limits = Limits(rpm=1200, tpm=90_000)
    # Half the headroom's stretch: 1 + (1 / 0.98 - 1) / 2.
    assert limits.interval_share(1200) == (20, pytest.approx(1.0102, abs=1e-4))
    assert limits.interval_share(90_000) == (1500, pytest.approx(1.0102, abs=1e-4))
    assert limits.interval_share(None) == (0, 0.0)


def test_a_limit_below_one_call_per_interval_allows_one_call_per_its_pace() -> None:
    allowance, span = Limits(rpm=90).interval_share(90)
    assert allowance == 1
    assert span == pytest.approx(60 / 90 * 1.0102, abs=1e-4)


@pytest.mark.parametrize("limit", [1, 59, 60, 90, 1200, 3000, 10_000, 30_000, 150_000])
@pytest.mark.parametrize("headroom", [0.9, 0.98, 1.0])
@pytest.mark.parametrize("window", [2.0, 60.0])
def test_the_send_log_is_never_looser_than_the_limit_nor_slower_than_gcra(
    limit: int, headroom: float, window: float
) -> None:
    limits = Limits(rpm=limit, window_seconds=window, headroom=headroom)
    allowance, span = limits.interval_share(limit)
    assert allowance / span <= limit / window + 1e-9
    # GCRA hands out one slot per window / (headroom * limit): the log must keep up with it,
    # or late calls would queue at the log for ever.
    assert allowance / span >= headroom * limit / window - 1e-9


def test_the_pause_after_a_bare_429_is_one_calls_share_of_the_interval() -> None:
    assert Limits(rpm=1200).pause_after_429(100) == pytest.approx(0.05)
    assert Limits(tpm=60_000).pause_after_429(250) == pytest.approx(0.25)
    # The larger share of the two limits; never more than the interval.
    assert Limits(rpm=1200, tpm=60_000).pause_after_429(10) == pytest.approx(0.05)
    assert Limits(rpm=30).pause_after_429(1) == pytest.approx(1.0)
    assert Limits(tpm=60_000).pause_after_429(5000) == pytest.approx(1.0)


@pytest.mark.parametrize("interval", [0.0, -1.0, 61.0])
def test_limits_refuse_an_interval_outside_the_window(interval: float) -> None:
    with pytest.raises(ValueError, match="interval_seconds"):
        Limits(rpm=60, interval_seconds=interval)
