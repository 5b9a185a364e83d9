"""The upstream client against httpx.MockTransport: error mapping and stream assembly."""

from __future__ import annotations

import asyncio
import json
import pickle
from typing import Any

import httpx
import pytest

from chatjobs.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamMalformedResponse,
    UpstreamStatusError,
    UpstreamTimeout,
    is_retryable,
)
from chatjobs.upstream import assemble_stream, chat_completion, retry_after

REQUEST = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4.1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello there"},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10},
}


def client_for(handler: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


def call(request: dict[str, Any], *, model: str, client: httpx.AsyncClient) -> Any:
    async def run() -> Any:
        async with client:
            return await chat_completion(
                request, model=model, client=client, base_url="http://up/v1", api_key="sk-1"
            )

    return asyncio.run(run())


def test_success_returns_completion_and_usage_and_sends_model() -> None:
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["url"] = str(request.url)
        seen["auth"] = request.headers.get("authorization")
        seen["body"] = json.loads(request.content)
        return httpx.Response(200, json=COMPLETION, headers={"x-request-id": "req_1"})

    result = call(REQUEST, model="gpt-4.1", client=client_for(handler))
    assert seen["url"] == "http://up/v1/chat/completions"
    assert seen["auth"] == "Bearer sk-1"
    assert seen["body"] == {**REQUEST, "model": "gpt-4.1"}
    assert result.body == COMPLETION
    assert result.usage == {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
    assert result.request_id == "req_1"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_permanent_statuses_carry_the_upstream_message(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"error": {"message": "bad thing", "type": "invalid_request_error", "code": "x"}}
        return httpx.Response(status, json=body)

    with pytest.raises(UpstreamStatusError) as info:
        call(REQUEST, model="m", client=client_for(handler))
    assert info.value.status_code == status
    assert "bad thing" in info.value.message
    assert not is_retryable(info.value)


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503, 504, 529])
def test_transient_statuses_are_retryable(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "busy"}})

    with pytest.raises(UpstreamStatusError) as info:
        call(REQUEST, model="m", client=client_for(handler))
    assert is_retryable(info.value)


def test_insufficient_quota_429_is_not_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {
            "error": {
                "message": "quota",
                "type": "insufficient_quota",
                "code": "insufficient_quota",
            }
        }
        return httpx.Response(429, json=body)

    with pytest.raises(UpstreamStatusError) as info:
        call(REQUEST, model="m", client=client_for(handler))
    assert not is_retryable(info.value)


def test_invalid_json_and_missing_choices_are_malformed_and_retryable() -> None:
    for body in (b'{"id": "x", "choices": [', b'{"id": "x"}'):
        client = client_for(lambda request, body=body: httpx.Response(200, content=body))
        with pytest.raises(UpstreamMalformedResponse) as info:
            call(REQUEST, model="m", client=client)
        assert is_retryable(info.value)


def test_connection_and_timeout_errors_are_mapped() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(UpstreamConnectionError):
        call(REQUEST, model="m", client=client_for(refuse))
    with pytest.raises(UpstreamTimeout):
        call(REQUEST, model="m", client=client_for(slow))


def test_retry_after_prefers_milliseconds_and_reads_seconds() -> None:
    assert retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after(httpx.Headers({"retry-after": "2"})) == 2.0
    assert retry_after(httpx.Headers({})) is None


def test_garbled_retry_after_is_ignored() -> None:
    for value in ("after lunch", "inf", "nan", ""):
        assert retry_after(httpx.Headers({"retry-after": value})) is None
    assert retry_after(httpx.Headers({"retry-after-ms": "inf", "retry-after": "3"})) == 3.0


def test_errors_pickle_without_losing_fields() -> None:
    err = UpstreamStatusError(
        "no", status_code=429, code="rate_limit_exceeded", request_id="req_9", retry_after=2.0
    )
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, UpstreamStatusError)
    assert (back.status_code, back.code, back.request_id, back.retry_after) == (
        429,
        "rate_limit_exceeded",
        "req_9",
        2.0,
    )
    assert isinstance(back, UpstreamError)


def sse(*chunks: Any) -> list[str]:
    return [f"data: {json.dumps(c)}" for c in chunks] + ["data: [DONE]"]


def test_stream_assembles_content_tool_calls_and_usage() -> None:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "gpt-4.1"}
    lines = sse(
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "Hel"}}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"a"'},
                            }
                        ]
                    },
                }
            ],
        },
        {
            **head,
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                }
            ],
        },
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {
            **head,
            "choices": [],
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
        },
    )
    deltas: list[dict[str, Any]] = []
    out = assemble_stream(iter(lines), on_delta=deltas.append)
    assert out["object"] == "chat.completion"
    assert out["id"] == "c1"
    choice = out["choices"][0]
    assert choice["message"]["content"] == "Hello"
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    ]
    assert choice["finish_reason"] == "tool_calls"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert len(deltas) == 6


def test_stream_cut_before_done_is_a_connection_error() -> None:
    lines = sse({"id": "c", "choices": [{"index": 0, "delta": {"content": "x"}}]})[:-1]
    with pytest.raises(UpstreamConnectionError):
        assemble_stream(iter(lines))


def test_streamed_request_asks_for_usage() -> None:
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(request.content)
        text = (
            "\n\n".join(
                sse(
                    {
                        "id": "c",
                        "created": 1,
                        "model": "m",
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": "ok"},
                                "finish_reason": "stop",
                            }
                        ],
                    },
                    {
                        "id": "c",
                        "choices": [],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )
            )
            + "\n\n"
        )
        return httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})

    request = {**REQUEST, "stream": True}
    result = call(request, model="m", client=client_for(handler))
    assert seen["body"]["stream_options"] == {"include_usage": True}
    assert result.usage["total_tokens"] == 2
    assert result.body["choices"][0]["message"]["content"] == "ok"
