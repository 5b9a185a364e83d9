"""The ``anthropic-batch`` offload upstream (chatjobs.offload.anthropic_batch): OpenAI requests
as Messages params, results back as chat completions, errors classified as synchronous calls
are, and the control plane (submit, find, poll, cancel) against ``httpx.MockTransport``."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatjobs.errors import UpstreamStatusError, is_retryable
from chatjobs.limiter import Limits
from chatjobs.offload import available, batch_upstream
from chatjobs.offload.anthropic_batch import (
    AmbiguousBatch,
    AnthropicBatch,
    anthropic_error,
    errored,
    line_result,
)
from chatjobs.offload.upstream import EarlierSubmit, Item, NotOffloadable, UpstreamBatch
from chatjobs.routing import Route

FIXTURES = Path(__file__).parent.parent / "fixtures" / "anthropic"
USER = {"role": "user", "content": "hi"}
ROUTE = Route(
    model="claude",
    base_url="https://anthropic.test/v1",
    api_key_env="ANTH_KEY",
    limits=Limits(1, 1, 1),
    offload="anthropic-batch",
)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTH_KEY", "sk-ant-test")


def params(max_output_tokens: int | None = None, **request: Any) -> dict[str, Any]:
    body = {"model": "claude-sonnet-4-5", "messages": [USER], **request}
    entry = json.loads(AnthropicBatch().encode(Item("job-1", body, max_output_tokens)))
    assert entry["custom_id"] == "job-1"
    result: dict[str, Any] = entry["params"]
    return result


def refused(**request: Any) -> str:
    with pytest.raises(NotOffloadable) as info:
        params(**request)
    return str(info.value)


# --- encode ----------------------------------------------------------------------------------


def test_a_plain_request_carries_model_messages_and_a_max_tokens() -> None:
    assert params() == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_max_tokens_is_the_requests_limit_else_the_jobs_output_budget_else_4096() -> None:
    assert params(max_completion_tokens=10, max_tokens=20)["max_tokens"] == 10
    assert params(max_tokens=20)["max_tokens"] == 20
    assert params(max_output_tokens=300)["max_tokens"] == 300
    assert params(max_output_tokens=300, max_tokens=5)["max_tokens"] == 5
    assert params()["max_tokens"] == 4096


def test_system_and_developer_messages_become_the_system_string() -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "use French"}]},
        USER,
    ]
    out = params(messages=messages)
    assert out["system"] == "be brief\n\nuse French"
    assert out["messages"] == [{"role": "user", "content": "hi"}]


def test_text_parts_and_consecutive_turns_of_one_role_merge_into_one_turn() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    assert params(messages=messages)["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "text", "text": "b"},
                {"type": "text", "text": "c"},
            ],
        },
        {"role": "assistant", "content": "d"},
    ]


def test_tool_calls_become_tool_use_and_tool_messages_tool_results_in_a_user_turn() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
    }
    messages = [
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "user", "content": "thanks"},
    ]
    assert params(messages=messages)["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Oslo"}}
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "call_1",
                    "content": [{"type": "text", "text": "sunny"}],
                },
                {"type": "text", "text": "thanks"},
            ],
        },
    ]


def test_sampling_stop_and_user_fields_are_translated() -> None:
    out = params(
        temperature=0.5,
        top_p=1,
        stop="END",
        user="u-42",
        stream=True,
        stream_options={"include_usage": True},
    )
    assert out["temperature"] == 0.5 and "top_p" not in out
    assert params(top_p=0.9)["top_p"] == 0.9
    assert out["stop_sequences"] == ["END"]
    assert out["metadata"] == {"user_id": "u-42"}
    assert "stream" not in out and "stream_options" not in out
    assert params(stop=["a", "b"])["stop_sequences"] == ["a", "b"]
    assert params(temperature=1)["temperature"] == 1


def test_function_tools_and_every_tool_choice_are_translated() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "description": "does f",
            "parameters": {"type": "object", "properties": {"x": {"type": "string"}}},
        },
    }
    out = params(tools=[tool])
    assert out["tools"] == [
        {
            "name": "f",
            "description": "does f",
            "input_schema": {"type": "object", "properties": {"x": {"type": "string"}}},
        }
    ]
    assert "tool_choice" not in out
    bare = {"type": "function", "function": {"name": "g"}}
    assert params(tools=[bare])["tools"] == [
        {"name": "g", "input_schema": {"type": "object", "properties": {}}}
    ]
    choices = {
        "auto": {"type": "auto"},
        "none": {"type": "none"},
        "required": {"type": "any"},
    }
    for choice, expected in choices.items():
        assert params(tools=[tool], tool_choice=choice)["tool_choice"] == expected
    named = {"type": "function", "function": {"name": "f"}}
    assert params(tools=[tool], tool_choice=named)["tool_choice"] == {"type": "tool", "name": "f"}


def test_parallel_tool_calls_false_disables_parallel_tool_use() -> None:
    tool = {"type": "function", "function": {"name": "f"}}
    assert params(tools=[tool], parallel_tool_calls=False)["tool_choice"] == {
        "type": "auto",
        "disable_parallel_tool_use": True,
    }
    assert params(tools=[tool], tool_choice="required", parallel_tool_calls=False)[
        "tool_choice"
    ] == {"type": "any", "disable_parallel_tool_use": True}
    assert params(tools=[tool], tool_choice="none", parallel_tool_calls=False)["tool_choice"] == {
        "type": "none"
    }
    assert "tool_choice" not in params(tools=[tool], parallel_tool_calls=True)


def test_temperature_and_top_p_together_keep_the_one_not_at_its_default() -> None:
    assert params(temperature=0.2, top_p=1)["temperature"] == 0.2
    assert "top_p" not in params(temperature=0.2, top_p=1)
    assert params(temperature=1, top_p=0.8)["top_p"] == 0.8
    assert "temperature" not in params(temperature=1, top_p=0.8)
    assert "top_p" in refused(temperature=0.2, top_p=0.8)


def test_a_job_id_anthropic_would_refuse_as_custom_id_is_not_offloaded() -> None:
    with pytest.raises(NotOffloadable, match="custom_id"):
        AnthropicBatch().encode(Item("job 1", {"model": "c", "messages": [USER]}))


def test_the_simulators_fault_field_passes_through() -> None:
    assert params(x_sim={"status": 529})["x_sim"] == {"status": 529}


def test_defaults_equal_to_openais_are_not_refused() -> None:
    out = params(
        n=1,
        frequency_penalty=0,
        presence_penalty=0,
        logprobs=False,
        logit_bias={},
        response_format={"type": "text"},
        store=False,
        metadata={"a": "b"},
    )
    assert set(out) == {"model", "max_tokens", "messages"}


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 1.5}, "temperature"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 2}, "logprobs"),
        ({"seed": 7}, "seed"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -1}, "presence_penalty"),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0]"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "strict"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "allowed_tools"},
            },
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
    ],
)
def test_what_anthropic_cannot_run_faithfully_is_refused_naming_the_field(
    request_fields: dict[str, Any], field: str
) -> None:
    assert field in refused(**request_fields)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
            "messages[0].content[0]",
        ),
        (
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
            "messages[0].content[0]",
        ),
        ({"role": "user", "content": "hi", "name": "bob"}, "messages[0].name"),
        ({"role": "function", "name": None, "content": "x"}, "messages[0].role"),
        (
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}
                ],
            },
            "arguments",
        ),
        ({"role": "tool", "content": "x"}, "tool_call_id"),
        ({"role": "system", "content": "only a system prompt"}, "messages"),
    ],
)
def test_messages_anthropic_cannot_carry_are_refused(message: dict[str, Any], field: str) -> None:
    assert field in refused(messages=[message])


def _call(**fields: Any) -> dict[str, Any]:
    call: dict[str, Any] = {"id": "c1", "type": "function", "function": {"name": "f"}}
    function = {**call["function"], **fields.pop("function", {})}
    return {**call, **fields, "function": function}


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"stop": 5}, "stop"),
        ({"stop": ["ok", 5]}, "stop"),
        ({"stop": "\n"}, "stop"),
        ({"stop": ["END", " "]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"max_tokens": "abc"}, "max_tokens"),
        ({"max_tokens": [1]}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"tools": [{"type": "function", "function": {"name": 5}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]},
            "parameters",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [_call(function={"arguments": {"a": 1}})]},
                ]
            },
            "arguments",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [_call(function={"arguments": 3})]},
                ]
            },
            "arguments",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [{**_call(), "id": None}]},
                ]
            },
            "tool_calls[0].id",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [_call(function={"name": None})]},
                ]
            },
            "function.name",
        ),
        ({"messages": [{"role": "user", "content": [5]}]}, "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [None]}, "messages[0]"),
    ],
)
def test_odd_shapes_are_refused_naming_the_field_never_another_error(
    request_fields: dict[str, Any], field: str
) -> None:
    # Anything but NotOffloadable would stop the route's gather (it is caught there too).
    assert field in refused(**request_fields)


def test_a_user_turns_tool_results_come_before_its_text() -> None:
    out = params(
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [_call()]},
            {"role": "user", "content": "and be quick"},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    )
    last = out["messages"][-1]
    assert last["role"] == "user"
    assert [block["type"] for block in last["content"]] == ["tool_result", "text"]


# --- results ----------------------------------------------------------------------------


def fixture_results() -> dict[str, Any]:
    lines = (FIXTURES / "results.jsonl").read_text().splitlines()
    results = [line_result(json.loads(line)) for line in lines]
    return {r.job_id: r for r in results if r is not None}


def test_a_succeeded_message_becomes_a_chat_completion_with_its_usage() -> None:
    result = fixture_results()["my-first-request"]
    assert result.error is None and not result.unfinished and result.completion is not None
    completion = result.completion
    assert completion["id"] == "msg_01FqfsLoHwgeFbguDgpz48m7"
    assert completion["object"] == "chat.completion"
    assert completion["model"] == "claude-sonnet-4-5-20250929"
    assert isinstance(completion["created"], int)
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Hello! How can I assist you today?")
    assert "tool_calls" not in choice["message"]
    assert completion["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 34,
        "total_tokens": 44,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def succeeded(message: dict[str, Any]) -> dict[str, Any]:
    base = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude",
        "content": [],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1, "output_tokens": 1},
    }
    result = line_result(
        {"custom_id": "j", "result": {"type": "succeeded", "message": {**base, **message}}}
    )
    assert result is not None and result.completion is not None
    return result.completion


def test_tool_use_blocks_become_tool_calls() -> None:
    completion = succeeded(
        {
            "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
            ],
            "stop_reason": "tool_use",
        }
    )
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look."
    assert choice["message"]["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    only_tool = succeeded({"content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]})
    assert only_tool["choices"][0]["message"]["content"] is None


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
    ],
)
def test_stop_reasons_map_to_finish_reasons(stop_reason: str, finish_reason: str) -> None:
    completion = succeeded({"stop_reason": stop_reason})
    assert completion["choices"][0]["finish_reason"] == finish_reason


def test_cache_tokens_count_as_prompt_tokens_and_cache_reads_as_cached() -> None:
    usage = {
        "input_tokens": 5,
        "output_tokens": 7,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 20,
    }
    assert succeeded({"usage": usage})["usage"] == {
        "prompt_tokens": 125,
        "completion_tokens": 7,
        "total_tokens": 132,
        "prompt_tokens_details": {"cached_tokens": 20},
    }


def test_errored_items_are_classified_as_the_synchronous_call_would_be() -> None:
    results = fixture_results()
    invalid = results["my-third-request"].error
    assert isinstance(invalid, UpstreamStatusError)
    assert (invalid.status_code, invalid.code) == (400, "invalid_request_error")
    assert invalid.request_id == "req_011CTestInvalid" and "max_tokens" in invalid.message
    assert not is_retryable(invalid)
    overloaded = results["my-fourth-request"].error
    assert overloaded is not None and overloaded.status_code == 529 and is_retryable(overloaded)


@pytest.mark.parametrize(
    ("kind", "status", "retryable"),
    [
        ("invalid_request_error", 400, False),
        ("authentication_error", 401, False),
        ("billing_error", 402, False),
        ("permission_error", 403, False),
        ("not_found_error", 404, False),
        ("request_too_large", 413, False),
        ("rate_limit_error", 429, True),
        ("api_error", 500, True),
        ("timeout_error", 504, True),
        ("overloaded_error", 529, True),
        ("some_new_error", 500, True),
    ],
)
def test_each_error_type_gets_its_http_status(kind: str, status: int, retryable: bool) -> None:
    error = errored({"type": "error", "error": {"type": kind, "message": "m"}})
    assert error.status_code == status and error.code == kind
    assert is_retryable(error) is retryable


def test_canceled_and_expired_items_are_unfinished() -> None:
    results = fixture_results()
    for job_id in ("my-fifth-request", "my-sixth-request"):
        assert results[job_id].unfinished and results[job_id].completion is None


def test_a_line_without_custom_id_is_skipped_and_a_broken_one_retried() -> None:
    assert line_result({"result": {"type": "expired"}}) is None
    odd = line_result({"custom_id": "j", "result": {"type": "mystery"}})
    assert odd is not None and odd.error is not None and is_retryable(odd.error)
    empty = line_result({"custom_id": "j", "result": {"type": "succeeded"}})
    assert empty is not None and empty.error is not None and is_retryable(empty.error)


def test_control_plane_errors_are_classified_and_keep_retry_after_and_request_id() -> None:
    body = json.dumps(
        {
            "type": "error",
            "error": {"type": "rate_limit_error", "message": "slow"},
            "request_id": "req_body",
        }
    ).encode()
    error = anthropic_error(429, {"retry-after": "7", "request-id": "req_hdr"}, body)
    assert (error.status_code, error.code, error.retry_after) == (429, "rate_limit_error", 7.0)
    assert error.request_id == "req_hdr" and is_retryable(error)
    overloaded = anthropic_error(529, {}, b'{"type":"error","error":{"type":"overloaded_error"}}')
    assert is_retryable(overloaded)
    for status in (400, 401, 403, 404):
        assert not is_retryable(anthropic_error(status, {}, b"not json"))


# --- the control plane -------------------------------------------------------------------


Handler = Callable[[httpx.Request], httpx.Response]


def client_for(handler: Handler, seen: list[httpx.Request] | None = None) -> httpx.Client:
    def record(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return handler(request)

    return httpx.Client(transport=httpx.MockTransport(record))


def stamp(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def batch(
    batch_id: str, created: datetime, size: int, status: str = "in_progress"
) -> dict[str, Any]:
    ended = status == "ended"
    counts = {
        "processing": 0 if ended else size,
        "succeeded": size if ended else 0,
        "errored": 0,
        "canceled": 0,
        "expired": 0,
    }
    return {
        "id": batch_id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "created_at": stamp(created),
        "ended_at": None,
        "expires_at": stamp(created + timedelta(days=1)),
        "results_url": f"https://anthropic.test/v1/messages/batches/{batch_id}/results"
        if ended
        else None,
    }


def test_submit_posts_the_requests_inline_with_anthropics_headers() -> None:
    seen: list[httpx.Request] = []
    upstream = AnthropicBatch()
    encoded = [
        upstream.encode(Item(f"job-{i}", {"model": "c", "messages": [USER]})) for i in (1, 2)
    ]
    answer = batch("msgbatch_1", datetime.now(UTC), 2)
    with client_for(lambda r: httpx.Response(200, json=answer), seen) as client:
        submitted = upstream.submit(client, ROUTE, encoded, ref="row-1")
    assert submitted.upstream_batch_id == "msgbatch_1" and submitted.upstream_file_id is None
    request = seen[0]
    assert request.method == "POST"
    assert str(request.url) == "https://anthropic.test/v1/messages/batches"
    assert request.headers["x-api-key"] == "sk-ant-test"
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["content-type"] == "application/json"
    body = json.loads(request.content)
    assert [r["custom_id"] for r in body["requests"]] == ["job-1", "job-2"]
    assert body["requests"][0]["params"]["max_tokens"] == 4096
    assert "authorization" not in request.headers


def test_submit_refused_raises_the_classified_error() -> None:
    refusal = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    refusing = client_for(lambda r: httpx.Response(400, json=refusal))
    with refusing as client, pytest.raises(UpstreamStatusError) as info:
        AnthropicBatch().submit(client, ROUTE, [b"{}"], ref="r")
    assert info.value.status_code == 400 and not is_retryable(info.value)


def test_poll_reports_the_processing_status_and_the_results_url() -> None:
    created = datetime.now(UTC)
    states = iter([batch("b", created, 3), batch("b", created, 3, "ended")])
    with client_for(lambda r: httpx.Response(200, json=next(states))) as client:
        running = AnthropicBatch().poll(client, ROUTE, "b")
        ended = AnthropicBatch().poll(client, ROUTE, "b")
    assert (running.status, running.ended, running.output_ref) == ("in_progress", False, None)
    assert (ended.status, ended.ended) == ("ended", True)
    assert ended.output_ref == "https://anthropic.test/v1/messages/batches/b/results"
    assert ended.error is None


def test_results_stream_the_results_url_line_by_line() -> None:
    seen: list[httpx.Request] = []
    text = (FIXTURES / "results.jsonl").read_bytes() + b"\n\nnot json\n"
    url = "https://anthropic.test/v1/messages/batches/b/results"
    with client_for(lambda r: httpx.Response(200, content=text), seen) as client:
        got = list(AnthropicBatch().results(client, ROUTE, UpstreamBatch("b", "ended", True, url)))
    assert len(got) == 6 and str(seen[0].url) == url
    assert seen[0].headers["x-api-key"] == "sk-ant-test"
    assert sum(r.completion is not None for r in got) == 2
    assert sum(r.error is not None for r in got) == 2
    assert sum(r.unfinished for r in got) == 2


def test_results_of_a_batch_without_a_results_url_are_none() -> None:
    with client_for(lambda r: httpx.Response(500)) as client:
        assert (
            list(AnthropicBatch().results(client, ROUTE, UpstreamBatch("b", "ended", True))) == []
        )


def test_cancel_is_idempotent_for_an_ended_or_canceling_batch() -> None:
    created = datetime.now(UTC)
    refusal = {"type": "error", "error": {"type": "invalid_request_error", "message": "ended"}}

    def answer(status: str) -> Handler:
        def handler(request: httpx.Request) -> httpx.Response:
            if request.url.path.endswith("/cancel"):
                return httpx.Response(400, json=refusal)
            return httpx.Response(200, json=batch("b", created, 1, status))

        return handler

    for status in ("ended", "canceling"):
        with client_for(answer(status)) as client:
            AnthropicBatch().cancel(client, ROUTE, "b")
    with client_for(answer("in_progress")) as client, pytest.raises(UpstreamStatusError):
        AnthropicBatch().cancel(client, ROUTE, "b")
    seen: list[httpx.Request] = []
    canceling = batch("b", created, 1, "canceling")
    with client_for(lambda r: httpx.Response(200, json=canceling), seen) as client:
        AnthropicBatch().cancel(client, ROUTE, "b")
    assert seen[0].method == "POST" and seen[0].url.path == "/v1/messages/batches/b/cancel"
    with client_for(lambda r: httpx.Response(500)) as client, pytest.raises(UpstreamStatusError):
        AnthropicBatch().cancel(client, ROUTE, "b")


# --- find --------------------------------------------------------------------------------------


SINCE = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
JOBS = ["job-a", "job-b", "job-c"]


def lister(
    pages: list[list[dict[str, Any]]], results: dict[str, str] | None = None
) -> tuple[Handler, list[str | None]]:
    """A listing served in pages (``after_id`` = the previous page's last id), and results
    files whose first line names the given custom_id."""
    cursors: list[str | None] = []
    by_cursor: dict[str | None, int] = {None: 0}
    for i, page in enumerate(pages[:-1]):
        by_cursor[page[-1]["id"]] = i + 1

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/results"):
            batch_id = request.url.path.split("/")[-2]
            first = (results or {}).get(batch_id, "someone-else")
            line = {"custom_id": first, "result": {"type": "expired"}}
            return httpx.Response(200, content=json.dumps(line).encode() + b"\n")
        cursor = request.url.params.get("after_id")
        cursors.append(cursor)
        assert request.url.params["limit"] == "100"
        index = by_cursor[cursor]
        page = pages[index]
        return httpx.Response(
            200,
            json={
                "data": page,
                "has_more": index + 1 < len(pages),
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            },
        )

    return handler, cursors


def find(handler: Handler, taken: frozenset[str] = frozenset()) -> str | None:
    earlier = EarlierSubmit(
        ref="row", since=SINCE, items=len(JOBS), job_ids=frozenset(JOBS), taken=taken
    )
    with client_for(handler) as client:
        return AnthropicBatch().find(client, ROUTE, earlier)


def test_find_takes_the_ended_batch_whose_results_name_the_rows_jobs() -> None:
    later = SINCE + timedelta(seconds=5)
    handler, _ = lister(
        [[batch("other", later, 3, "ended"), batch("mine", later, 3, "ended")]],
        {"mine": "job-b"},
    )
    assert find(handler) == "mine"


def test_find_takes_a_single_unfinished_batch_of_the_rows_size() -> None:
    later = SINCE + timedelta(seconds=5)
    handler, _ = lister([[batch("bigger", later, 4), batch("mine", later, 3)]])
    assert find(handler) == "mine"


def test_find_prefers_a_proved_batch_over_an_unfinished_one() -> None:
    later = SINCE + timedelta(seconds=5)
    handler, _ = lister(
        [[batch("running", later, 3), batch("mine", later, 3, "ended")]], {"mine": "job-a"}
    )
    assert find(handler) == "mine"


def test_find_does_not_guess_between_unfinished_batches_of_the_same_size() -> None:
    later = SINCE + timedelta(seconds=5)
    handler, _ = lister([[batch("x", later, 3), batch("y", later, 3)]])
    with pytest.raises(AmbiguousBatch) as info:
        find(handler)
    assert is_retryable(info.value)


def test_find_never_takes_a_batch_of_the_same_size_made_before_since() -> None:
    before = SINCE - timedelta(minutes=10)
    handler, cursors = lister(
        [[batch("old-running", before, 3)], [batch("older-ended", before, 3, "ended")]],
        {"older-ended": "job-a"},
    )
    assert find(handler) is None
    # Newest first: the first page already reached back before the row; no second one.
    assert cursors == [None]


def test_find_allows_a_minute_of_clock_skew() -> None:
    handler, _ = lister([[batch("mine", SINCE - timedelta(seconds=30), 3)]])
    assert find(handler) == "mine"


def test_find_pages_by_after_id_until_the_listing_is_older_than_since() -> None:
    later = SINCE + timedelta(seconds=5)
    handler, cursors = lister(
        [
            [
                batch("n1", later + timedelta(hours=2), 1),
                batch("n2", later + timedelta(hours=1), 1),
            ],
            [batch("mine", later, 3, "ended"), batch("old", SINCE - timedelta(hours=1), 3)],
        ],
        {"mine": "job-c"},
    )
    assert find(handler) == "mine"
    assert cursors == [None, "n2"]
    nothing, cursors = lister([[batch("n1", later, 1)], [batch("n2", later, 2)], []])
    assert find(nothing) is None and cursors == [None, "n1", "n2"]


def test_find_skips_a_candidate_whose_results_are_gone() -> None:
    later = SINCE + timedelta(seconds=5)
    listing, _ = lister([[batch("archived", later, 3, "ended"), batch("mine", later, 3)]])

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/results"):
            return httpx.Response(404, json={"type": "error", "error": {"type": "not_found_error"}})
        return listing(request)

    assert find(handler) == "mine"


def test_find_ignores_an_ended_batch_of_the_same_size_holding_other_jobs() -> None:
    later = SINCE + timedelta(seconds=5)
    handler, _ = lister([[batch("theirs", later, 3, "ended")]], {"theirs": "job-z"})
    assert find(handler) is None


def test_find_never_takes_a_batch_another_row_recorded() -> None:
    later = SINCE + timedelta(seconds=5)
    handler, _ = lister([[batch("recorded", later, 3), batch("mine", later, 3)]])
    assert find(handler, taken=frozenset({"recorded"})) == "mine"
    alone, _ = lister([[batch("recorded", later, 3)]])
    assert find(alone, taken=frozenset({"recorded"})) is None


def test_find_looks_for_as_many_requests_as_the_create_sent() -> None:
    # Four jobs gathered, one cancelled before the create: it sent three.
    later = SINCE + timedelta(seconds=5)
    handler, _ = lister(
        [[batch("four", later, 4), batch("mine", later, 3, "ended")]], {"mine": "x"}
    )
    earlier = EarlierSubmit(
        ref="row", since=SINCE, items=3, job_ids=frozenset({*JOBS, "x"}), taken=frozenset()
    )
    with client_for(handler) as client:
        assert AnthropicBatch().find(client, ROUTE, earlier) == "mine"


def test_the_registry_names_this_implementation() -> None:
    assert "anthropic-batch" in available()
    upstream = batch_upstream("anthropic-batch")
    assert isinstance(upstream, AnthropicBatch)
    assert (upstream.max_items, upstream.max_bytes) == (100_000, 256 * 1024 * 1024)
