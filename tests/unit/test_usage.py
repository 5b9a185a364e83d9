"""Usage accounting's pure rules: groups, ranges, prices in the models file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from chatjobs.routing import ModelsFileError, load_models_file
from chatjobs.usage import UsageQueryError, parse_group_by, resolve_range

NOW = datetime(2026, 6, 10, 12, tzinfo=UTC)


def test_group_by_reads_either_both_or_none_in_canonical_order() -> None:
    assert parse_group_by("day, model") == ("model", "day")
    assert parse_group_by("day") == ("day",)
    assert parse_group_by("") == ()


def test_group_by_names_an_unknown_group() -> None:
    with pytest.raises(UsageQueryError, match="'week'") as caught:
        parse_group_by("model,week")
    assert caught.value.param == "group_by"


def test_range_defaults_to_the_seven_days_before_now_in_utc() -> None:
    assert resolve_range(None, None, now=NOW) == (NOW - timedelta(days=7), NOW)
    plus_two = datetime(2026, 6, 1, 4, tzinfo=timezone(timedelta(hours=2)))
    start, _ = resolve_range(plus_two, None, now=NOW)
    assert start == datetime(2026, 6, 1, 2, tzinfo=UTC) and start.tzinfo is UTC


@pytest.mark.parametrize(
    ("start", "end", "param"),
    [
        (NOW, NOW, "end"),
        (NOW, NOW - timedelta(seconds=1), "end"),
        (NOW - timedelta(days=366, seconds=1), NOW, "start"),
    ],
)
def test_range_refuses_an_empty_backwards_or_too_long_one(
    start: datetime, end: datetime, param: str
) -> None:
    with pytest.raises(UsageQueryError) as caught:
        resolve_range(start, end)
    assert caught.value.param == param


def test_models_file_takes_both_prices_or_neither(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text("[models.m]\ninput_per_mtok = 2.5\noutput_per_mtok = 10\n")
    assert load_models_file(path)["m"].output_per_mtok == 10
    path.write_text("[models.m]\ninput_per_mtok = 2.5\n")
    with pytest.raises(ModelsFileError, match="both input_per_mtok and output_per_mtok"):
        load_models_file(path)
    path.write_text("[models.m]\ninput_per_mtok = -1\noutput_per_mtok = 1\n")
    with pytest.raises(ModelsFileError, match=r"models\.m\.input_per_mtok"):
        load_models_file(path)
