"""Batch input lines: split from a stream, checked as OpenAI checks them."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from chatjobs.batches.lines import ENDPOINT, Checker, Line, LineError, parse, split_lines


def raw(custom_id: Any = "a", **over: Any) -> bytes:
    data = {
        "custom_id": custom_id,
        "method": "POST",
        "url": ENDPOINT,
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    data.update(over)
    return json.dumps(data).encode()


def check(data: bytes | None, number: int = 1) -> Line | LineError:
    return parse(number, data, endpoint=ENDPOINT, max_line=10_000)


def test_split_numbers_lines_skips_blank_ones_and_drops_overlong_ones_unheld() -> None:
    chunks = [b"a\nbb", b"b\n\n  \r\n" + b"x" * 50, b"x" * 50 + b"\nlast"]
    assert list(split_lines(chunks, 20)) == [(1, b"a"), (2, b"bbb"), (5, None), (6, b"last")]


@given(
    st.lists(st.binary(max_size=30).filter(lambda b: b"\n" not in b and b.strip()), max_size=8),
    st.integers(min_value=1, max_value=7),
)
def test_split_is_the_same_whatever_the_chunking(lines: list[bytes], size: int) -> None:
    data = b"\n".join(lines)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    assert [x for _, x in split_lines(chunks, 1000)] == lines


def test_a_valid_line() -> None:
    line = check(raw("req-1"), 7)
    assert isinstance(line, Line)
    assert (line.number, line.custom_id, line.model) == (7, "req-1", "m")


def test_each_rule_has_its_code_and_param() -> None:
    cases: list[tuple[bytes | None, str, str | None]] = [
        (b"{nope", "invalid_json_line", None),
        (b"[1, 2]", "invalid_json_line", None),
        (b"1" * 5000, "invalid_json_line", None),  # over Python's digit limit
        (raw(None), "invalid_request", "custom_id"),
        (raw(""), "invalid_request", "custom_id"),
        (raw("x" * 513), "invalid_request", "custom_id"),
        (raw("a\u0000b"), "invalid_request", "custom_id"),
        (raw(method="GET"), "invalid_request", "method"),
        (raw(url="/v1/embeddings"), "url_mismatch", "url"),
        (raw(body=[]), "invalid_request", "body"),
        (raw(body={"messages": "hi"}), "invalid_request", "body.messages"),
        (raw(body={"messages": [], "temperature": 9}), "invalid_request", "body.temperature"),
        (raw(body={"messages": [], "stream": True}), "invalid_request", "body.stream"),
        (None, "line_too_long", None),
    ]
    for data, code, param in cases:
        error = check(data, 3)
        assert isinstance(error, LineError), data
        assert (error.code, error.line, error.param) == (code, 3, param), data


def test_the_checker_finds_duplicates_a_second_model_and_too_many_lines() -> None:
    checker = Checker(max_lines=3, default_model="default")

    def line(custom_id: str, model: str | None) -> Line:
        return Line(1, custom_id, {}, model)

    assert checker.check(line("a", None)) is None
    assert checker.model == "default"
    assert checker.check(line("b", "default")) is None
    dup = checker.check(line("a", "default"))
    assert dup is not None and dup.code == "duplicate_custom_id"
    other = Checker(max_lines=10, default_model="d")
    other.check(line("a", "x"))
    mismatch = other.check(line("b", "y"))
    assert mismatch is not None and mismatch.code == "model_mismatch"
    many = checker.check(line("z", "default"))
    assert many is not None and many.code == "too_many_tasks"


def _naive(data: bytes, max_line: int) -> list[tuple[int, bytes | None]]:
    out: list[tuple[int, bytes | None]] = []
    parts = data.split(b"\n")
    for number, part in enumerate(parts, 1):
        if number == len(parts) and not part.strip():
            break
        if len(part) > max_line:
            out.append((number, None))
        elif part.strip():
            out.append((number, part))
    return out


@given(
    st.lists(st.sampled_from([b"", b" ", b"\t", b"a", b"bc", b"{}", b"x y", b"\r"]), max_size=30),
    st.integers(min_value=1, max_value=9),
    st.integers(min_value=1, max_value=6),
)
def test_split_agrees_with_splitting_the_whole(
    pieces: list[bytes], size: int, max_line: int
) -> None:
    data = b"\n".join(pieces)
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    assert list(split_lines(chunks, max_line)) == _naive(data, max_line)
