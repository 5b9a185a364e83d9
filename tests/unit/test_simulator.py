"""Unit tests of the OpenAI-compatible upstream simulator (in-process ASGI, one real-HTTP test)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from chatjobs.simulator import (
    SimConfig,
    add_arguments,
    config_from_args,
    config_from_env,
    count_prompt_tokens,
    count_text_tokens,
    create_app,
)
from chatjobs.tokens import MESSAGE_PART_TOKENS, count_messages, count_text, lookup_model

pytestmark = pytest.mark.timeout(30)

URL = "/v1/chat/completions"
HELLO: dict[str, Any] = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}


class FakeClock:
    """A settable monotonic clock for the rate limiter."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@contextlib.asynccontextmanager
async def sim_client(
    config: SimConfig | None = None, clock: Callable[[], float] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config, clock=clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        yield client


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


def chat(**extra: Any) -> dict[str, Any]:
    return {**HELLO, **extra}


def sse_events(text: str) -> list[dict[str, Any]]:
    """Parse an SSE body; checks the [DONE] terminator and returns the JSON chunks."""
    data = [block[len("data: ") :] for block in text.split("\n\n") if block.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(item) for item in data[:-1]]


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code


# --------------------------------------------------------------------------------------------
# Tokens and content


def test_token_counting_matches_chatjobs_o200k() -> None:
    assert count_text_tokens("") == 0
    assert count_text_tokens("hello world") == 2
    assert count_text_tokens("abcdefgh") == count_text("abcdefgh", "o200k_base")
    # 3 priming + per message 3 + role + content (+ name + 1).
    assert count_prompt_tokens([{"role": "user", "content": "hi"}]) == 3 + 3 + 1 + 1
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief", "name": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}, {"type": "image_url"}]},
        {"role": "assistant", "content": None},
    ]
    t = count_text_tokens
    expected = (
        3
        + (3 + t("system") + t("be brief") + t("rules") + 1)
        + (3 + t("user") + t("abcdefgh") + MESSAGE_PART_TOKENS)
        + (3 + t("assistant"))
    )
    assert count_prompt_tokens(messages) == expected
    assert expected == count_messages(messages, lookup_model("gpt-4.1")).tokens


def test_deterministic_content_and_usage() -> None:
    async def body() -> None:
        async with sim_client() as client:
            first = (await client.post(URL, json=chat())).json()
            second = (await client.post(URL, json=chat(x_sim={"latency": 0}))).json()
            other = await client.post(URL, json=chat(messages=[{"role": "user", "content": "yo"}]))
        assert first["object"] == "chat.completion"
        assert first["id"].startswith("chatcmpl-") and first["system_fingerprint"] == "fp_sim"
        assert first["model"] == "gpt-4.1"
        choice = first["choices"][0]
        assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
        message = choice["message"]
        assert message["role"] == "assistant" and message["refusal"] is None
        assert message["content"].startswith("Simulated reply ")
        usage = first["usage"]
        assert 16 <= usage["completion_tokens"] <= 64
        assert usage["completion_tokens"] == count_text_tokens(message["content"])
        assert usage["prompt_tokens"] == count_prompt_tokens(HELLO["messages"])
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        # x_sim is not part of the content hash; other messages give other content.
        assert second["choices"] == first["choices"] and second["usage"] == usage
        assert other.json()["choices"][0]["message"]["content"] != message["content"]

        async with sim_client(SimConfig(seed=7)) as client:
            reseeded = (await client.post(URL, json=chat())).json()
        assert reseeded["choices"][0]["message"]["content"] != message["content"]

    run(body)


def test_default_model_and_alias_path() -> None:
    async def body() -> None:
        async with sim_client() as client:
            response = await client.post("/chat/completions", json={"messages": HELLO["messages"]})
        assert response.status_code == 200
        assert response.json()["model"] == "gpt-4.1"

    run(body)


def test_max_tokens_caps_with_finish_reason_length() -> None:
    async def body() -> None:
        async with sim_client() as client:
            capped = (await client.post(URL, json=chat(max_tokens=5))).json()
            preferred = (
                await client.post(URL, json=chat(max_tokens=3, max_completion_tokens=9))
            ).json()
            roomy = (await client.post(URL, json=chat(max_tokens=1000))).json()
        choice = capped["choices"][0]
        assert choice["finish_reason"] == "length"
        assert capped["usage"]["completion_tokens"] == 5
        assert count_text_tokens(choice["message"]["content"]) == 5
        assert preferred["usage"]["completion_tokens"] == 9
        assert roomy["choices"][0]["finish_reason"] == "stop"

    run(body)


def test_n_choices_multiply_completion_usage() -> None:
    async def body() -> None:
        async with sim_client() as client:
            single = (await client.post(URL, json=chat())).json()
            triple = (await client.post(URL, json=chat(n=3))).json()
        assert [c["index"] for c in triple["choices"]] == [0, 1, 2]
        assert triple["usage"]["completion_tokens"] == 3 * single["usage"]["completion_tokens"]

    run(body)


@pytest.mark.parametrize("delay", [0.0, 0.002])
def test_stream_equals_non_stream(delay: float) -> None:
    async def body() -> None:
        async with sim_client(SimConfig(stream_chunk_delay=delay)) as client:
            # 20, not 10: the "Simulated reply <hex>:" prefix alone can take 10 o200k tokens.
            for extra in ({}, {"max_tokens": 20}, {"n": 2}):
                plain = (await client.post(URL, json=chat(**extra))).json()
                streamed = await client.post(
                    URL, json=chat(stream=True, stream_options={"include_usage": True}, **extra)
                )
                assert streamed.status_code == 200
                assert streamed.headers["content-type"].startswith("text/event-stream")
                chunks = sse_events(streamed.text)
                assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
                assert all("usage" in chunk for chunk in chunks)
                *body_chunks, final = chunks
                assert final["choices"] == [] and final["usage"] == plain["usage"]
                for choice in plain["choices"]:
                    mine = [
                        c["choices"][0]
                        for c in body_chunks
                        if c["choices"][0]["index"] == choice["index"]
                    ]
                    assert mine[0]["delta"] == {"role": "assistant", "content": ""}
                    assert len(mine) > 4  # content arrives in several pieces
                    text = "".join(c["delta"].get("content") or "" for c in mine)
                    assert text == choice["message"]["content"]
                    assert mine[-1]["delta"] == {}
                    assert mine[-1]["finish_reason"] == choice["finish_reason"]
                    assert all(c["finish_reason"] is None for c in mine[:-1])

            without_usage = await client.post(URL, json=chat(stream=True))
        assert all("usage" not in chunk for chunk in sse_events(without_usage.text))

    run(body)


WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}
OTHER_TOOL: dict[str, Any] = {"type": "function", "function": {"name": "noop"}}


def test_tool_calls() -> None:
    async def body() -> None:
        async with sim_client() as client:
            required = (
                await client.post(URL, json=chat(tools=[WEATHER_TOOL], tool_choice="required"))
            ).json()
            named = (
                await client.post(
                    URL,
                    json=chat(
                        tools=[WEATHER_TOOL, OTHER_TOOL],
                        tool_choice={"type": "function", "function": {"name": "noop"}},
                    ),
                )
            ).json()
            auto = (await client.post(URL, json=chat(tools=[WEATHER_TOOL]))).json()
            unknown = await client.post(
                URL,
                json=chat(
                    tools=[WEATHER_TOOL],
                    tool_choice={"type": "function", "function": {"name": "nope"}},
                ),
            )
            streamed = await client.post(
                URL,
                json=chat(
                    tools=[WEATHER_TOOL],
                    tool_choice="required",
                    stream=True,
                    stream_options={"include_usage": True},
                ),
            )
        choice = required["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "sim", "unit": "c"}
        assert required["usage"]["completion_tokens"] > 0

        assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "noop"
        assert (
            json.loads(named["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
            == {}
        )
        assert auto["choices"][0]["finish_reason"] == "stop"
        assert_openai_error(unknown, 400)

        *chunks, final = sse_events(streamed.text)
        head = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
        assert head["id"] == call["id"] and head["function"] == {
            "name": "get_weather",
            "arguments": "",
        }
        arguments = "".join(
            c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
            for c in chunks[1:]
            if "tool_calls" in c["choices"][0]["delta"]
        )
        assert arguments == call["function"]["arguments"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert final["usage"] == required["usage"]

    run(body)


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}},
    ],
)
def test_json_response_format(response_format: dict[str, Any]) -> None:
    async def body() -> None:
        async with sim_client() as client:
            data = (await client.post(URL, json=chat(response_format=response_format))).json()
        content = data["choices"][0]["message"]["content"]
        assert json.loads(content)["reply"].startswith("Simulated reply ")
        assert data["usage"]["completion_tokens"] == count_text_tokens(content)

    run(body)


# --------------------------------------------------------------------------------------------
# Validation and auth


def test_request_validation() -> None:
    async def body() -> None:
        async with sim_client() as client:
            not_json = await client.post(
                URL, content=b"{nope", headers={"content-type": "application/json"}
            )
            not_object = await client.post(URL, json=[1, 2])
            missing = await client.post(URL, json={"model": "gpt-4.1"})
            empty = await client.post(URL, json={"messages": []})
            bad_role = await client.post(URL, json={"messages": [{"role": "x", "content": "a"}]})
            bad_max = await client.post(URL, json=chat(max_tokens=0))
            bad_xsim = await client.post(URL, json=chat(x_sim={"status": "x"}))
            wrong_method = await client.get(URL)
            nowhere = await client.post("/v1/nowhere", json=chat())
            stats = (await client.get("/_sim/stats")).json()
            calls = (await client.get("/_sim/calls")).json()
        # Unparseable or non-object bodies are logged raw, still inside a dict.
        assert [c["body"] for c in calls[:2]] == [{"_raw": "{nope"}, {"_raw": "[1,2]"}]
        for response in (not_json, not_object, missing, empty, bad_role, bad_max, bad_xsim):
            assert_openai_error(response, 400)
            assert response.json()["error"]["type"] == "invalid_request_error"
        assert missing.json()["error"]["param"] == "messages"
        assert_openai_error(wrong_method, 405)
        assert_openai_error(nowhere, 404)
        assert stats["requests"] == 7 and stats["client_errors"] == 7

    run(body)


def test_api_key_required() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(api_key="sk-secret")) as client:
            missing = await client.post(URL, json=chat())
            wrong = await client.post(URL, json=chat(), headers={"Authorization": "Bearer nope"})
            right = await client.post(
                URL, json=chat(), headers={"Authorization": "Bearer sk-secret"}
            )
            models = await client.get("/v1/models")
        assert_openai_error(missing, 401)
        assert_openai_error(wrong, 401, "invalid_api_key")
        assert right.status_code == 200
        assert_openai_error(models, 401)

    run(body)


def test_context_length_exceeded() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(context_window=50)) as client:
            fits = await client.post(URL, json=chat(max_tokens=42))  # 8 + 42 = 50
            too_long = await client.post(URL, json=chat(max_tokens=43))
        assert fits.status_code == 200
        assert_openai_error(too_long, 400, "context_length_exceeded")
        error = too_long.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == "messages"
        assert error["message"].startswith(
            "This model's maximum context length is 50 tokens. However, you requested 51 tokens "
            "(8 in the messages, 43 in the completion)."
        )

    run(body)


# --------------------------------------------------------------------------------------------
# Rate limits


def test_rpm_minute_window() -> None:
    clock = FakeClock()

    async def body() -> None:
        async with sim_client(SimConfig(rpm=5), clock=clock) as client:
            answers = [await client.post(URL, json=chat()) for _ in range(5)]
            clock.now += 10
            limited = await client.post(URL, json=chat())
            clock.now += 50.001  # the first five have left the 60 s window
            after = [await client.post(URL, json=chat()) for _ in range(6)]
        assert [a.status_code for a in answers] == [200] * 5
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == [
            "4",
            "3",
            "2",
            "1",
            "0",
        ]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "5"
        assert answers[0].headers["x-ratelimit-reset-requests"] == "1m0s"
        assert "x-ratelimit-limit-tokens" not in answers[0].headers

        assert_openai_error(limited, 429, "rate_limit_exceeded")
        error = limited.json()["error"]
        assert error["type"] == "requests" and error["param"] is None
        assert error["message"].startswith("Rate limit reached for requests")
        assert "Limit 5, Used 5, Requested 1. Please try again in 50s." in error["message"]
        assert limited.headers["retry-after"] == "50"
        assert limited.headers["retry-after-ms"] == "50000"
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert limited.headers["x-ratelimit-reset-requests"] == "50s"
        # The rejected request was not counted: five fit again, the sixth does not.
        assert [a.status_code for a in after] == [200] * 5 + [429]

    run(body)


def test_rpm_second_buckets() -> None:
    clock = FakeClock(1000.25)

    async def body() -> None:
        async with sim_client(SimConfig(rpm=120, limit_window="second"), clock=clock) as client:
            first = [await client.post(URL, json=chat()) for _ in range(3)]
            clock.now = 1001.0
            next_second = await client.post(URL, json=chat())
            async with sim_client(SimConfig(rpm=30, limit_window="second"), clock=clock) as slow:
                floor_one = [await slow.post(URL, json=chat()) for _ in range(2)]
        assert [a.status_code for a in first] == [200, 200, 429]
        assert first[0].headers["x-ratelimit-limit-requests"] == "2"
        assert first[1].headers["x-ratelimit-remaining-requests"] == "0"
        assert first[2].headers["retry-after"] == "1"
        assert first[2].headers["retry-after-ms"] == "750"
        assert first[2].headers["x-ratelimit-reset-requests"] == "750ms"
        assert "per sec" in first[2].json()["error"]["message"]
        assert next_second.status_code == 200
        # rpm below 60 still admits one request per second.
        assert [a.status_code for a in floor_one] == [200, 429]

    run(body)


def test_rpm_sliding_window_refuses_a_burst_across_a_second_boundary() -> None:
    clock = FakeClock(1000.75)

    async def body() -> None:
        async with sim_client(SimConfig(rpm=120, limit_window="sliding"), clock=clock) as client:
            first = [await client.post(URL, json=chat()) for _ in range(3)]
            clock.now = 1001.25  # a new calendar second, but both are within the last second
            straddling = await client.post(URL, json=chat())
            clock.now = 1001.75  # the first two have just left the window
            after = [await client.post(URL, json=chat()) for _ in range(3)]
        assert [a.status_code for a in first] == [200, 200, 429]
        assert first[0].headers["x-ratelimit-limit-requests"] == "2"
        assert first[0].headers["x-ratelimit-remaining-requests"] == "1"
        assert first[0].headers["x-ratelimit-reset-requests"] == "1s"
        assert_openai_error(first[2], 429, "rate_limit_exceeded")
        error = first[2].json()["error"]
        assert error["type"] == "requests" and error["param"] is None
        assert error["message"].startswith("Rate limit reached for requests per sec (RPS)")
        assert "Limit 2, Used 2, Requested 1. Please try again in 1s." in error["message"]
        assert first[2].headers["retry-after"] == "1"
        assert first[2].headers["retry-after-ms"] == "1000"

        # Fixed buckets would admit this one: the sliding window still holds two.
        assert_openai_error(straddling, 429, "rate_limit_exceeded")
        assert straddling.headers["retry-after-ms"] == "500"
        assert straddling.headers["x-ratelimit-reset-requests"] == "500ms"
        assert [a.status_code for a in after] == [200, 200, 429]

    run(body)


def test_tpm_sliding_window_counts_tokens_of_the_last_second() -> None:
    clock = FakeClock(1000.5)

    async def body() -> None:
        # 6,000 TPM: 100 tokens in any second. Each call costs 8 prompt tokens + 40 = 48.
        async with sim_client(SimConfig(tpm=6000, limit_window="sliding"), clock=clock) as client:
            answers = [await client.post(URL, json=chat(max_tokens=40)) for _ in range(3)]
            clock.now = 1001.2
            still = await client.post(URL, json=chat(max_tokens=40))
            clock.now = 1001.5  # both have left the window
            large = await client.post(URL, json=chat(max_tokens=150))
            clock.now = 1002.0
            behind_large = await client.post(URL, json=chat(max_tokens=1))
            clock.now = 1002.5
            later = await client.post(URL, json=chat(max_tokens=40))
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit-tokens"] == "100"
        assert answers[1].headers["x-ratelimit-remaining-tokens"] == "4"
        error = answers[2].json()["error"]
        assert error["type"] == "tokens"
        assert error["message"].startswith("Rate limit reached for tokens per sec (TPS)")
        assert "Limit 100, Used 96, Requested 48." in error["message"]
        assert answers[2].headers["retry-after-ms"] == "1000"
        assert_openai_error(still, 429, "rate_limit_exceeded")
        # Larger than a second's tokens, it goes alone into an empty window...
        assert large.status_code == 200
        # ...and nothing else goes until it has left the window.
        assert_openai_error(behind_large, 429, "rate_limit_exceeded")
        assert behind_large.headers["retry-after-ms"] == "500"
        assert later.status_code == 200

    run(body)


def test_tpm_limit() -> None:
    clock = FakeClock()

    async def body() -> None:
        async with sim_client(SimConfig(tpm=110), clock=clock) as client:
            # Each costs 8 prompt tokens + 40 requested = 48.
            answers = [await client.post(URL, json=chat(max_tokens=40)) for _ in range(3)]
            small = await client.post(URL, json=chat(max_tokens=1))  # 9 of the 14 left fit
            too_large = await client.post(URL, json=chat(max_tokens=500))
            clock.now += 60.5
            later = await client.post(URL, json=chat(max_tokens=40))
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[0].headers["x-ratelimit-limit-tokens"] == "110"
        assert answers[0].headers["x-ratelimit-remaining-tokens"] == "62"
        assert_openai_error(answers[2], 429, "rate_limit_exceeded")
        error = answers[2].json()["error"]
        assert error["type"] == "tokens"
        assert "Limit 110, Used 96, Requested 48." in error["message"]
        assert answers[2].headers["retry-after"] == "60"
        assert small.status_code == 200
        assert_openai_error(too_large, 429, "rate_limit_exceeded")
        assert later.status_code == 200

    run(body)


# --------------------------------------------------------------------------------------------
# Faults and per-request overrides


def test_xsim_status_and_retry_headers() -> None:
    async def body() -> None:
        async with sim_client() as client:
            bad = await client.post(URL, json=chat(x_sim={"status": 400}))
            quota = await client.post(
                URL,
                json=chat(x_sim={"status": 429, "code": "insufficient_quota", "retry_after": 2}),
            )
            limited = await client.post(
                URL, json=chat(x_sim={"status": 429, "retry_after_ms": 1500})
            )
            overloaded = await client.post(URL, json=chat(x_sim={"status": 529}))
        assert_openai_error(bad, 400, "invalid_request_error")
        assert bad.json()["error"]["type"] == "invalid_request_error"
        assert_openai_error(quota, 429, "insufficient_quota")
        assert quota.headers["retry-after"] == "2"
        assert "retry-after-ms" not in quota.headers
        assert_openai_error(limited, 429, "rate_limit_exceeded")
        assert limited.headers["retry-after-ms"] == "1500"
        assert_openai_error(overloaded, 529)
        assert overloaded.json()["error"]["type"] == "overloaded_error"

    run(body)


def test_xsim_fail_times_per_key() -> None:
    async def body() -> None:
        async with sim_client() as client:
            flaky = {"fail_times": 2, "status": 503, "key": "abc"}
            statuses = [
                (await client.post(URL, json=chat(x_sim=flaky))).status_code for _ in range(4)
            ]
            other_key = await client.post(URL, json=chat(x_sim={**flaky, "key": "def"}))
            await client.post("/_sim/reset")
            after_reset = await client.post(URL, json=chat(x_sim=flaky))
        assert statuses == [503, 503, 200, 200]
        assert other_key.status_code == 503
        assert after_reset.status_code == 503
        assert after_reset.json()["error"] == {
            "message": "The server had an error while processing your request.",
            "type": "server_error",
            "param": None,
            "code": None,
        }

    run(body)


def test_xsim_malformed_latency_and_hang() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(hang_seconds=0.05)) as client:
            malformed = await client.post(URL, json=chat(x_sim={"malformed": True}))
            started = time.monotonic()
            slow = await client.post(URL, json=chat(x_sim={"latency": 0.1}))
            slow_elapsed = time.monotonic() - started
            started = time.monotonic()
            hung = await client.post(URL, json=chat(x_sim={"hang": True}))
            hung_elapsed = time.monotonic() - started
            stats = (await client.get("/_sim/stats")).json()
        assert malformed.status_code == 200
        assert malformed.headers["content-type"] == "application/json"
        with pytest.raises(json.JSONDecodeError):
            malformed.json()
        assert slow.status_code == 200 and slow_elapsed >= 0.1
        assert hung.status_code == 200 and hung_elapsed >= 0.05
        assert stats["malformed"] == 1 and stats["hung"] == 1 and stats["succeeded"] == 2

    run(body)


def test_error_rate_injects_deterministic_5xx() -> None:
    async def statuses(config: SimConfig) -> list[int]:
        async with sim_client(config) as client:
            answers = [await client.post(URL, json=chat()) for _ in range(12)]
            stats = (await client.get("/_sim/stats")).json()
        for answer in answers:
            assert_openai_error(answer, answer.status_code)
            expected = "overloaded_error" if answer.status_code == 529 else "server_error"
            assert answer.json()["error"]["type"] == expected
        assert stats["errors"] == 12 and stats["succeeded"] == 0
        return [answer.status_code for answer in answers]

    async def body() -> None:
        first = await statuses(SimConfig(error_rate=1.0))
        again = await statuses(SimConfig(error_rate=1.0))
        assert first == again
        assert set(first) <= {500, 502, 503, 529} and len(set(first)) > 1
        assert set(await statuses(SimConfig(error_rate=1.0, error_statuses=(502,)))) == {502}

    run(body)


def test_malformed_and_timeout_rates() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(malformed_rate=1.0)) as client:
            broken = await client.post(URL, json=chat())
        assert broken.status_code == 200
        assert broken.content == b'{"id": "chatcmpl-broken", "choices": ['
        async with sim_client(SimConfig(timeout_rate=1.0, hang_seconds=0.05)) as client:
            started = time.monotonic()
            slow = await client.post(URL, json=chat())
        assert slow.status_code == 200 and time.monotonic() - started >= 0.05

    run(body)


# --------------------------------------------------------------------------------------------
# Admin endpoints


def test_admin_stats_calls_reset_config() -> None:
    async def body() -> None:
        async with sim_client() as client:
            assert (await client.get("/healthz")).json() == {"ok": True}
            models = (await client.get("/v1/models")).json()
            assert models["object"] == "list"
            assert "gpt-4.1" in [m["id"] for m in models["data"]]

            before = time.time()
            ok = await client.post(URL, json=chat())
            await client.post(URL, json=chat(x_sim={"status": 503}))
            stats = (await client.get("/_sim/stats")).json()
            assert stats == {
                **stats,
                "requests": 2,
                "succeeded": 1,
                "errors": 1,
                "rate_limited": 0,
                "in_flight": 0,
                "max_in_flight": 1,
                "prompt_tokens": ok.json()["usage"]["prompt_tokens"],
                "completion_tokens": ok.json()["usage"]["completion_tokens"],
            }

            calls = (await client.get("/_sim/calls")).json()
            assert [c["status"] for c in calls] == [200, 503]
            assert calls[0]["body"] == chat()
            assert calls[0]["request_id"] == ok.headers["x-request-id"]
            assert before <= calls[0]["t"] <= calls[1]["t"] <= time.time()
            last = (await client.get("/_sim/calls", params={"limit": 1})).json()
            assert [c["status"] for c in last] == [503]
            # A test's own calls, by the prefix of its x_test marker.
            assert (await client.post(URL, json={**chat(), "x_test": "mine-1"})).status_code == 200
            mine = (await client.get("/_sim/calls", params={"x_test": "mine"})).json()
            assert [c["body"]["x_test"] for c in mine] == ["mine-1"]
            assert (await client.get("/_sim/calls", params={"x_test": "other"})).json() == []

            config = (await client.get("/_sim/config")).json()
            assert config["rpm"] is None and config["error_statuses"] == [500, 502, 503, 529]
            updated = await client.post("/_sim/config", json={"rpm": 1, "latency": 0.01})
            assert updated.status_code == 200
            assert updated.json()["rpm"] == 1 and updated.json()["latency"] == 0.01
            assert (await client.post(URL, json=chat())).status_code == 200
            assert (await client.post(URL, json=chat())).status_code == 429
            assert_openai_error(await client.post("/_sim/config", json={"bogus": 1}), 400)
            assert_openai_error(await client.post("/_sim/config", json={"error_rate": 2}), 400)
            assert (await client.get("/_sim/config")).json()["rpm"] == 1

            assert (await client.post("/_sim/reset")).status_code == 200
            stats = (await client.get("/_sim/stats")).json()
            assert stats["requests"] == 0 and stats["max_in_flight"] == 0
            assert (await client.get("/_sim/calls")).json() == []
            # Limiter state is cleared too, while the live config stays.
            assert (await client.post(URL, json=chat())).status_code == 200
            assert (await client.post("/_sim/reset?config=true")).json()["config"]["rpm"] is None

    run(body)


def test_max_in_flight_counts_concurrent_requests() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(latency=0.2)) as client:
            started = time.monotonic()
            answers = await asyncio.gather(*(client.post(URL, json=chat()) for _ in range(20)))
            elapsed = time.monotonic() - started
            stats = (await client.get("/_sim/stats")).json()
        assert all(answer.status_code == 200 for answer in answers)
        assert elapsed < 1.0  # they slept concurrently
        assert stats["max_in_flight"] == 20 and stats["in_flight"] == 0

    run(body)


def test_reset_while_requests_are_in_flight() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(latency=0.2)) as client:
            pending = asyncio.ensure_future(client.post(URL, json=chat()))
            await asyncio.sleep(0.05)
            assert (await client.get("/_sim/stats")).json()["in_flight"] == 1
            await client.post("/_sim/reset")
            assert (await pending).status_code == 200
            stats = (await client.get("/_sim/stats")).json()
            calls = (await client.get("/_sim/calls")).json()
        # The old request neither leaks in_flight nor pollutes the fresh counters.
        assert stats["in_flight"] == 0 and stats["requests"] == 0 and stats["succeeded"] == 0
        assert calls == []

    run(body)


# --------------------------------------------------------------------------------------------
# Configuration sources


def test_config_from_env() -> None:
    env = {
        "CHATJOBS_SIM_LATENCY": "0.25",
        "CHATJOBS_SIM_RPM": "600",
        "CHATJOBS_SIM_TPM": "0",
        "CHATJOBS_SIM_LIMIT_WINDOW": "second",
        "CHATJOBS_SIM_ERROR_RATE": "0.1",
        "CHATJOBS_SIM_CONTEXT_WINDOW": "",
        "CHATJOBS_SIM_API_KEY": "sk-x",
        "CHATJOBS_SIM_SEED": "3",
    }
    config = config_from_env(env)
    assert config == SimConfig(
        latency=0.25, rpm=600, limit_window="second", error_rate=0.1, api_key="sk-x", seed=3
    )
    assert config_from_env({}) == SimConfig()
    for var, value in [
        ("CHATJOBS_SIM_RPM", "many"),
        ("CHATJOBS_SIM_ERROR_RATE", "1.5"),
        ("CHATJOBS_SIM_LIMIT_WINDOW", "hour"),
    ]:
        with pytest.raises(ValueError, match=var):
            config_from_env({var: value})
    assert config_from_env({"CHATJOBS_SIM_LIMIT_WINDOW": "Sliding"}).limit_window == "sliding"
    with pytest.raises(ValueError, match="latency"):
        SimConfig(latency=-1)


def test_argparse_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATJOBS_SIM_LATENCY", "0.5")
    monkeypatch.setenv("CHATJOBS_SIM_RPM", "100")
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8100)
    add_arguments(parser)
    ns = parser.parse_args(["--port", "9", "--rpm", "0", "--error-statuses", "502,503"])
    config = config_from_args(ns)
    assert config.latency == 0.5  # from the env
    assert config.rpm is None  # the flag beats the env
    assert config.error_statuses == (502, 503)


# --------------------------------------------------------------------------------------------
# Real HTTP


@contextlib.contextmanager
def running_server(config: SimConfig) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), log_level="warning", access_log=False, lifespan="off", ws="none"
        )
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "simulator did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_real_server_with_openai_sdk() -> None:
    with running_server(SimConfig(api_key="sk-test", hang_seconds=3600)) as base:
        with openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0) as client:
            completion = client.chat.completions.create(
                model="gpt-4.1", messages=[{"role": "user", "content": "hi"}]
            )
            content = completion.choices[0].message.content
            assert content is not None and content.startswith("Simulated reply ")
            assert completion.choices[0].finish_reason == "stop"
            assert completion.usage is not None
            assert completion.usage.completion_tokens == count_text_tokens(content)

            pieces: list[str] = []
            usage = None
            finish = None
            with client.chat.completions.create(
                model="gpt-4.1",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            ) as stream:
                for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        pieces.append(choice.delta.content or "")
                        finish = choice.finish_reason or finish
            assert "".join(pieces) == content
            assert finish == "stop"
            assert usage is not None and usage.model_dump() == completion.usage.model_dump()

            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(
                    model="gpt-4.1",
                    messages=[{"role": "user", "content": "hi"}],
                    extra_body={"x_sim": {"status": 429, "retry_after": 1}},
                )
            assert caught.value.code == "rate_limit_exceeded"

        # A client giving up on a hanging request frees its slot instead of leaking it.
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                f"{base}/v1/chat/completions",
                json=chat(x_sim={"hang": True}),
                headers={"Authorization": "Bearer sk-test"},
                timeout=0.3,
            )
        deadline = time.monotonic() + 5
        while True:
            stats = httpx.get(f"{base}/_sim/stats").json()
            if stats["in_flight"] == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert stats["in_flight"] == 0 and stats["disconnected"] == 1
        assert httpx.get(f"{base}/_sim/calls", params={"limit": 1}).json()[0]["status"] == 499


def test_a_call_whose_client_left_before_its_body_is_logged_with_an_empty_body() -> None:
    from chatjobs.simulator import _Call

    assert _Call("req_1").body == {}
