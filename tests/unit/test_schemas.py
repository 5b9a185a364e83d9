"""The request schema and the read shapes in isolation: the raw body is what is kept, what
Postgres cannot store is refused at its path, and any stored row reads back."""

from __future__ import annotations

import asyncio
import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from chatjobs import upstream
from chatjobs.errors import UpstreamStatusError
from chatjobs.jobs import error_record
from chatjobs.models import Job, JobStatus, uuid7
from chatjobs.schemas import ChatCompletionRequest, JobCreate, JobRead, StepRead


def test_raw_body_keeps_integers_and_unknown_keys() -> None:
    body = {
        "messages": [{"role": "user", "content": "x", "name": "n"}],
        "max_tokens": 500,
        "seed": 7,
        "vendor_extension": {"a": [1, 2]},
    }
    request = ChatCompletionRequest.model_validate(body)
    assert request.raw == body
    assert request.raw["max_tokens"] == 500
    assert isinstance(request.raw["max_tokens"], int)


def test_job_create_reads_long_context_default() -> None:
    job = JobCreate.model_validate(
        {"request": {"messages": [{"role": "user", "content": None}]}, "long_context": {}}
    )
    assert job.long_context is not None
    assert job.long_context.strategy == "map_reduce"


# --- normalise before store: what is accepted can be stored and read ----------------------

MESSAGES = [{"role": "user", "content": "hi"}]


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def refusal(body: dict[str, Any]) -> tuple[tuple[Any, ...], str]:
    with pytest.raises(ValidationError) as info:
        JobCreate.model_validate(body)
    first = info.value.errors()[0]
    return first["loc"], first["type"]


@pytest.mark.parametrize(
    ("body", "loc", "rule"),
    [
        (
            {"request": {"messages": [{"role": "user", "content": "a\x00"}]}},
            ("request", "messages", 0, "content"),
            "nul_character",
        ),
        (
            {"request": {"messages": [{"role": "user", "content": [{"text": "\ud800"}]}]}},
            ("request", "messages", 0, "content", 0, "text"),
            "lone_surrogate",
        ),
        (
            {"request": {"messages": MESSAGES, "model": "gpt\x00"}},
            ("request", "model"),
            "nul_character",
        ),
        (
            {"request": {"messages": MESSAGES, "vendor": {"k": ["\x00"]}}},
            ("request", "vendor", "k", 0),
            "nul_character",
        ),
        (
            {"request": {"messages": MESSAGES, "max_tokens": math.inf}},
            ("request", "max_tokens"),
            "non_finite_number",
        ),
        (
            {"request": {"messages": MESSAGES, "temperature": math.nan}},
            ("request", "temperature"),
            "non_finite_number",
        ),
        (
            {"request": {"messages": MESSAGES, "vendor": nested(300)}},
            ("request", "vendor", *(0,) * 63),
            "json_too_deep",
        ),
        (
            {"request": {"messages": MESSAGES}, "metadata": {"k\x00": "v"}},
            ("metadata", "k\ufffd"),
            "nul_character",
        ),
        (
            {"request": {"messages": MESSAGES}, "metadata": {"k": -math.inf}},
            ("metadata", "k"),
            "non_finite_number",
        ),
        (
            {"request": {"messages": MESSAGES}, "metadata": {"k": nested(64)}},
            ("metadata", "k", *(0,) * 63),
            "json_too_deep",
        ),
        (
            {"request": {"messages": MESSAGES}, "webhook_url": "https://example.com/\x00"},
            ("webhook_url",),
            "nul_character",
        ),
        (
            {"request": {"messages": MESSAGES}, "long_context": {"map_prompt": "\udc00"}},
            ("long_context", "map_prompt"),
            "lone_surrogate",
        ),
        (
            {"request": {"messages": MESSAGES, "model": "m" * 201}},
            ("request", "model"),
            "string_too_long",
        ),
    ],
    ids=[
        "nul-content",
        "surrogate-content-part",
        "nul-model",
        "nul-pass-through",
        "infinite-max-tokens",
        "nan-temperature",
        "deep-pass-through",
        "nul-metadata-key",
        "infinite-metadata",
        "deep-metadata",
        "nul-webhook-url",
        "surrogate-long-context-prompt",
        "model-over-200",
    ],
)
def test_what_postgres_cannot_store_is_refused_at_its_path(
    body: dict[str, Any], loc: tuple[Any, ...], rule: str
) -> None:
    assert refusal(body) == (loc, rule)


def test_nesting_up_to_64_levels_below_a_field_is_accepted() -> None:
    # The request object is level 1; metadata is level 1 of its own column.
    request = {"messages": MESSAGES, "vendor": nested(63)}
    job = JobCreate.model_validate({"request": request, "metadata": {"k": nested(63)}})
    assert job.request.raw["vendor"] == nested(63)
    assert JobCreate.model_validate({"request": {"messages": MESSAGES, "model": "m" * 200}})


@pytest.mark.parametrize(
    ("deadline", "accepted"),
    [
        ("9999-12-31T23:59:59-23:59", False),
        ("0001-01-01T00:00:00+23:59", False),
        ((datetime.now(UTC) + timedelta(days=366)).isoformat(), False),
        ((datetime.now(UTC) + timedelta(days=364)).isoformat(), True),
        ((datetime.now(UTC) + timedelta(hours=1)).isoformat(), True),
    ],
    ids=["year-9999-behind-utc", "year-1-ahead-of-utc", "over-a-year", "within-a-year", "soon"],
)
def test_a_deadline_is_within_a_year_and_stored_in_utc(deadline: str, accepted: bool) -> None:
    body = {"request": {"messages": MESSAGES}, "deadline": deadline}
    if not accepted:
        assert refusal(body) == (("deadline",), "value_error")
        return
    job = JobCreate.model_validate(body)
    assert job.deadline is not None and job.deadline.utcoffset() == timedelta(0)


# --- reads never fail on stored data -----------------------------------------------------


def stored_job(**columns: Any) -> Job:
    now = datetime.now(UTC)
    values: dict[str, Any] = {
        "id": uuid7(),
        "status": JobStatus.failed,
        "model": "gpt-4.1",
        "request": {"messages": MESSAGES},
        "result": None,
        "error": None,
        "metadata_": None,
        "webhook_url": None,
        "long_context": None,
        "progress": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "prompt_token_estimate": None,
        "token_count_method": None,
        "attempts": 1,
        "max_attempts": 6,
        "priority": 0,
        "batch_id": None,
        "schedule_id": None,
        "deadline": None,
        "next_attempt_at": None,
        "created_at": now,
        "updated_at": now,
        "started_at": None,
        "completed_at": None,
        "step_kind": "map",
        "step_level": 0,
        "step_index": 0,
        **columns,
    }
    return Job(**values)


ODD_ROWS: dict[str, dict[str, Any]] = {
    "numeric-error-code": {"error": {"type": "upstream_error", "message": "m", "code": 123}},
    "null-error-code": {"error": {"type": "upstream_error", "message": "m", "code": None}},
    "error-fields-of-every-type": {
        "error": {"type": 5, "message": ["a"], "status_code": "429", "request_id": {"x": 1}}
    },
    "error-a-string": {"error": "boom"},
    "error-a-list": {"error": [1, 2]},
    "result-choices-not-a-list": {"result": {"choices": {"0": "x"}}},
    "result-content-not-a-string": {
        "result": {"choices": [{"message": {"content": [{"type": "text", "text": "t"}]}}]}
    },
    "result-a-list": {"result": [1, 2, 3]},
    "result-deep": {"result": {"choices": nested(300)}},
    "request-deep": {"request": {"messages": MESSAGES, "vendor": nested(300)}},
    "request-a-string": {"request": "not an object"},
    "metadata-a-list": {"metadata_": [1, "two"]},
    "metadata-a-string": {"metadata_": "just text"},
    "metadata-huge-int": {"metadata_": {"n": 10**4000}},
    "metadata-non-finite": {"metadata_": {"n": math.inf, "m": math.nan}},
    "progress-a-number": {"progress": 7},
    "long-context-a-list": {"long_context": ["map_reduce"]},
}


@pytest.mark.parametrize("columns", ODD_ROWS.values(), ids=ODD_ROWS.keys())
def test_any_stored_row_has_a_read_shape_that_serialises(columns: dict[str, Any]) -> None:
    job = stored_job(**columns)
    for shape in (JobRead.from_job(job), StepRead.from_job(job)):
        text = shape.model_dump_json()
        json.loads(text)  # strict JSON: no NaN, no Infinity
        json.dumps(shape.model_dump(mode="json"), allow_nan=False)


def test_an_error_code_is_shown_as_text_whatever_its_type() -> None:
    read = JobRead.from_job(stored_job(error={"type": "t", "message": "m", "code": 123}))
    assert read.error is not None and read.error.code == "123"
    odd = JobRead.from_job(stored_job(error=[1, 2])).error
    assert odd is not None and (odd.type, odd.message) == ("unknown", "[1, 2]")


def test_an_object_column_holding_another_value_is_shown_under_value() -> None:
    read = JobRead.from_job(stored_job(metadata_=[1, "two"], progress=7))
    assert read.metadata == {"value": [1, "two"]}
    assert read.progress == {"value": 7}


def test_a_step_shows_its_content_whatever_the_result_shape() -> None:
    parts = [{"type": "text", "text": "t"}]
    shaped = stored_job(result={"choices": [{"message": {"content": parts}}]})
    assert json.loads(StepRead.from_job(shaped).content or "") == parts
    assert StepRead.from_job(stored_job(result={"choices": "x"})).content is None
    text = stored_job(result={"choices": [{"message": {"content": "done"}}]})
    assert StepRead.from_job(text).content == "done"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"error": {"message": "m", "code": 123}}, "123"),
        ({"error": {"message": "m", "code": 0, "type": "t"}}, "0"),
        ({"error": {"message": "m", "code": None, "type": "server_error"}}, "server_error"),
        ({"error": {"message": "m", "code": None}}, None),
        ({"error": {"message": "m", "code": {"n": 1}}}, '{"n": 1}'),
    ],
    ids=["number", "zero", "null-falls-back-to-type", "null", "object"],
)
def test_an_upstream_error_code_of_any_type_is_stored_and_read_as_text(
    body: dict[str, Any], code: str | None
) -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json=body))

    async def call() -> None:
        async with httpx.AsyncClient(transport=transport) as client:
            await upstream.chat_completion(
                {"messages": MESSAGES}, model="m", client=client, base_url="http://upstream"
            )

    with pytest.raises(UpstreamStatusError) as info:
        asyncio.run(call())
    assert info.value.code == code
    read = JobRead.from_job(stored_job(error=error_record(info.value)))
    assert read.error is not None and read.error.code == code
