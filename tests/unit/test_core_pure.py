"""Pure pieces of the job core: usage cleaning, storable JSON, retention durations."""

from __future__ import annotations

import argparse
import json
import math
import uuid
from datetime import timedelta

import pytest

from chatjobs.cli import _duration
from chatjobs.jobs import clean_usage
from chatjobs.storable import storable


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}, (3, 2, 5)),
        ({"prompt_tokens": 3, "completion_tokens": 2}, (3, 2, 5)),
        ({"prompt_tokens": "3", "completion_tokens": True, "total_tokens": None}, (0, 0, 0)),
        ({"prompt_tokens": -1, "completion_tokens": math.nan, "total_tokens": math.inf}, (0, 0, 0)),
        ({"prompt_tokens": 2**40, "completion_tokens": 1.9, "total_tokens": 0}, (0, 1, 1)),
    ],
)
def test_usage_is_three_non_negative_integers_whatever_came(
    usage: dict[str, object], expected: tuple[int, int, int]
) -> None:
    cleaned = clean_usage(usage)
    assert cleaned is not None
    assert (cleaned["prompt_tokens"], cleaned["completion_tokens"], cleaned["total_tokens"]) == (
        expected
    )


def test_usage_that_is_not_an_object_is_none() -> None:
    assert clean_usage(None) is None
    assert clean_usage([1, 2]) is None


def test_storable_replaces_what_jsonb_refuses_and_keeps_the_rest() -> None:
    value = {
        "a\x00b": ["ok", "\ud800x", 1.5, math.nan, -math.inf, 7, True, None],
        "nested": {"deep": [{"x": math.inf}]},
    }
    out = storable(value)
    assert out == {
        "a\ufffdb": ["ok", "\ufffdx", 1.5, None, None, 7, True, None],
        "nested": {"deep": [{"x": None}]},
    }
    json.dumps(out, allow_nan=False).encode("utf-8")  # strict JSON, valid UTF-8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("90m", timedelta(minutes=90)),
        ("45s", timedelta(seconds=45)),
        ("7", timedelta(days=7)),
    ],
)
def test_retention_durations(text: str, expected: timedelta) -> None:
    assert _duration(text) == expected


@pytest.mark.parametrize("text", ["", "d", "-3d", "0", "abc", "1e9d"])
def test_bad_retention_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        _duration(text)


@pytest.mark.parametrize("field", ["priority", "max_attempts"])
@pytest.mark.parametrize("value", [True, "5", 5.5])
def test_small_integer_fields_are_strict(field: str, value: object) -> None:
    from pydantic import ValidationError

    from chatjobs.schemas import JobCreate

    body = {"request": {"messages": [{"role": "user", "content": "x"}]}, field: value}
    with pytest.raises(ValidationError):
        JobCreate.model_validate(body)


def test_uuid7_is_monotonic_within_a_process_even_within_one_millisecond() -> None:
    from chatjobs.models import _after, uuid7

    ids = [uuid7() for _ in range(20_000)]  # many per millisecond
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {7}
    # Carries past the full random bits keep the version and variant.
    full_b = ids[-1].int | ((1 << 62) - 1)
    full_ab = full_b | (0xFFF << 64)
    for value in (full_b, full_ab):
        after = uuid.UUID(int=_after(value))
        assert after.int > value and after.version == 7 and after.variant == uuid.RFC_4122
