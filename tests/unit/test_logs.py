"""The log formats: one JSON object per line with the extra fields, or text with key=value."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from chatjobs import logs


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord(
        "chatjobs.worker", logging.INFO, __file__, 1, "call %s", ("x",), None
    )
    record.__dict__.update(extra)
    return record


def test_json_line_carries_the_fixed_keys_and_the_extra_fields() -> None:
    line = logs.JsonFormatter().format(_record(job_id="j1", latency_ms=12, batch_id=None))
    parsed = json.loads(line)
    assert "\n" not in line
    assert parsed["level"] == "INFO"
    assert parsed["logger"] == "chatjobs.worker"
    assert parsed["message"] == "call x"
    assert parsed["ts"].endswith("+00:00")
    assert parsed["job_id"] == "j1" and parsed["latency_ms"] == 12
    assert "batch_id" not in parsed  # unknown fields are left out, not null


def test_json_exception_is_one_string_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), exc_info=sys.exc_info()
        )
    line = logs.JsonFormatter().format(record)
    parsed = json.loads(line)
    assert "\n" not in line
    assert isinstance(parsed["exception"], str) and "ValueError: boom" in parsed["exception"]


def test_text_line_appends_fields_as_key_value() -> None:
    text = logs.TextFormatter().format(_record(job_id="j1", status=200, tokens=None))
    assert text.endswith("INFO chatjobs.worker call x job_id=j1 status=200")


@pytest.mark.parametrize(
    ("setting", "tty", "expected"),
    [
        ("auto", True, "text"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("text", False, "text"),
    ],
)
def test_auto_format_is_text_on_a_terminal_and_json_elsewhere(
    setting: str, tty: bool, expected: str
) -> None:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    assert logs.resolve_format(setting, Stream()) == expected


def test_configure_routes_library_loggers_through_one_root_handler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CHATJOBS_LOG_FORMAT", "json")
    from chatjobs.settings import get_settings

    get_settings.cache_clear()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure()
        assert len(root.handlers) == 1
        assert isinstance(root.handlers[0].formatter, logs.JsonFormatter)
        uvicorn = logging.getLogger("uvicorn.access")
        assert uvicorn.handlers == [] and uvicorn.propagate
        assert logging.getLogger("httpx").level == logging.WARNING
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        get_settings.cache_clear()
