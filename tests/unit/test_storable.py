"""What Postgres can store and a reader can serialise: the judge of client input
(first_offence) and the cleaner of everything else (storable)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from chatjobs.storable import MAX_DEPTH, _surely_clean, first_offence, loads, storable


def nested(levels: int, leaf: Any = 1) -> Any:
    """``levels`` arrays, one inside the other, around ``leaf``."""
    value = leaf
    for _ in range(levels):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("value", "path", "rule"),
    [
        ("a\x00b", (), "nul_character"),
        ({"content": "x\x00"}, ("content",), "nul_character"),
        ({"a\x00": 1}, ("a\ufffd",), "nul_character"),
        ({"a": [1, {"b": "\ud800"}]}, ("a", 1, "b"), "lone_surrogate"),
        ({"\udfff": None}, ("\ufffd",), "lone_surrogate"),
        ([1, 2, math.nan], (2,), "non_finite_number"),
        ({"t": math.inf}, ("t",), "non_finite_number"),
        ({"t": [-math.inf]}, ("t", 0), "non_finite_number"),
        (nested(MAX_DEPTH + 1), (0,) * MAX_DEPTH, "json_too_deep"),
        ({"x": nested(MAX_DEPTH)}, ("x",) + (0,) * (MAX_DEPTH - 1), "json_too_deep"),
    ],
    ids=[
        "nul-scalar",
        "nul-value",
        "nul-key",
        "surrogate-value",
        "surrogate-key",
        "nan",
        "infinity",
        "minus-infinity",
        "too-deep-array",
        "too-deep-below-an-object",
    ],
)
def test_first_offence_names_the_path_and_the_rule(
    value: Any, path: tuple[Any, ...], rule: str
) -> None:
    offence = first_offence(value)
    assert offence is not None
    assert (offence.path, offence.rule) == (path, rule)
    assert offence.message


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        10**4000,
        -(2**63),
        1e308,
        -0.0,
        "",
        "emoji \U0001f600 and \u2028",
        nested(MAX_DEPTH),
        {"a": [{"b": None}, [], {}], "c": "ok"},
    ],
    ids=[
        "null",
        "bool",
        "huge-int",
        "min-int64",
        "large-float",
        "minus-zero",
        "empty",
        "astral",
        "exactly-max-depth",
        "mixed",
    ],
)
def test_storable_values_have_no_offence_and_are_returned_as_they_are(value: Any) -> None:
    assert first_offence(value) is None
    assert storable(value) is value


def test_depth_far_beyond_the_recursion_limit_is_judged_without_recursing() -> None:
    deep = nested(200_000)
    offence = first_offence(deep)
    assert offence is not None and offence.rule == "json_too_deep"
    assert len(offence.path) == MAX_DEPTH
    cleaned = storable(deep)
    assert json.dumps(cleaned).count("[") == MAX_DEPTH


def test_a_wide_value_is_judged_member_by_member() -> None:
    wide = [{"k": "v", "n": i, "l": [1, 2]} for i in range(50_000)]
    assert first_offence(wide) is None
    wide[-1]["l"][1] = math.nan
    offence = first_offence(wide)
    assert offence is not None and offence.path == (49_999, "l", 1)


def test_storable_replaces_only_what_cannot_be_stored_or_read() -> None:
    value = {
        "text\x00": ["ok", "\ud800x", 1.5, math.nan, 7, True, None],
        "deep": nested(300),
        "fine": {"x": [1, "y"]},
    }
    out = storable(value)
    assert out["text\ufffd"] == ["ok", "\ufffdx", 1.5, None, 7, True, None]
    assert out["fine"] == {"x": [1, "y"]}
    # The object is level 1: 63 arrays below it are kept, the 64th is replaced by null.
    assert json.dumps(out["deep"]).count("[") == MAX_DEPTH - 1
    assert first_offence(out) is None


def test_what_storable_returns_serialises_inside_a_pydantic_model() -> None:
    class Shape(BaseModel):
        request: dict[str, Any]

    raw = {"x": nested(1000), "y": math.inf, "z": "\ud800"}
    with pytest.raises(PydanticSerializationError):
        Shape(request=raw).model_dump_json()
    dumped = json.loads(Shape(request=storable(raw)).model_dump_json())
    assert dumped["request"]["y"] is None and dumped["request"]["z"] == "\ufffd"


def test_loads_reads_what_postgres_holds_and_python_json_cannot() -> None:
    long_int = "1" + "0" * 5000  # Postgres prints 1e5000 in full
    assert storable(loads('{"n": ' + long_int + ', "m": 2}')) == {"n": None, "m": 2}
    assert loads("[" * 100_000 + "]" * 100_000) is None
    assert loads(b'{"x": [1, 2.5, "s", null]}') == {"x": [1, 2.5, "s", None]}


def reference_offends(value: Any, depth: int = 1, max_depth: int = MAX_DEPTH) -> bool:
    """The rules, spelled out recursively (fine for the small values generated here)."""
    if isinstance(value, str):
        return "\x00" in value or any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return depth > max_depth or any(
            reference_offends(k, depth, max_depth) or reference_offends(v, depth + 1, max_depth)
            for k, v in value.items()
        )
    if isinstance(value, list):
        return depth > max_depth or any(reference_offends(v, depth + 1, max_depth) for v in value)
    return False


CHARACTERS = st.characters() | st.sampled_from(["\x00", "\ud800", "\udfff", "\\", '"'])
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(CHARACTERS, max_size=8)
    | st.sampled_from(["\\u0000", '\\"\x00', "[{", "}]"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(CHARACTERS), inner),
    max_leaves=20,
)


@settings(max_examples=500, derandomize=True, database=None)
@given(value=JSON_VALUES, max_depth=st.integers(1, 12))
def test_the_fast_judgement_and_the_walk_agree_with_the_rules(value: Any, max_depth: int) -> None:
    offends = reference_offends(value, max_depth=max_depth)
    offence = first_offence(value, max_depth=max_depth)
    assert (offence is not None) == offends
    if isinstance(value, dict | list):
        assert _surely_clean(value, max_depth) == (not offends)
    cleaned = storable(value, max_depth=max_depth)
    assert first_offence(cleaned, max_depth=max_depth) is None
    if not offends:
        assert cleaned is value
