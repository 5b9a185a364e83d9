"""Unit tests of the simulator's provider shapes: Workers AI, AI Gateway and Azure OpenAI."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import httpx
import pytest

from chatjobs.simulator import SimConfig, add_arguments, config_from_args, create_app

pytestmark = pytest.mark.timeout(30)

ACCOUNT = "acct123"
CF_OPENAI = f"/client/v4/accounts/{ACCOUNT}/ai/v1/chat/completions"
NATIVE_MODEL = "@cf/meta/llama-3.1-8b-instruct"
CF_NATIVE = f"/client/v4/accounts/{ACCOUNT}/ai/run/{NATIVE_MODEL}"
GW_WORKERS = f"/v1/{ACCOUNT}/gw1/workers-ai/v1/chat/completions"
GW_OPENAI = f"/v1/{ACCOUNT}/gw1/openai/chat/completions"
AZURE = "/openai/deployments/az-dep/chat/completions"
AZURE_Q = {"api-version": "2024-10-21"}
BEARER = {"authorization": "Bearer cf-token"}
AZ_KEY = {"api-key": "az-secret-key"}
MESSAGES = [{"role": "user", "content": "What are the three laws of thermodynamics?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


class FakeClock:
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
    return {"model": "openai/gpt-4.1", "messages": MESSAGES, **extra}


def sse_data(text: str) -> list[Any]:
    data = [block[len("data: ") :] for block in text.split("\n\n") if block.startswith("data: ")]
    assert data[-1] == "[DONE]" and text.endswith("data: [DONE]\n\n")
    return [json.loads(item) for item in data[:-1]]


def assert_cf_error(response: httpx.Response, status: int, code: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["result"] is None and body["messages"] == []
    assert [e["code"] for e in body["errors"]] == [code]
    assert isinstance(body["errors"][0]["message"], str) and body["errors"][0]["message"]


# --------------------------------------------------------------------------------------------
# Paths and success shapes


@pytest.mark.parametrize(
    ("path", "headers", "params"),
    [
        ("/v1/chat/completions", {}, {}),
        (CF_OPENAI, BEARER, {}),
        (GW_WORKERS, BEARER, {}),
        (GW_OPENAI, {}, {}),
        (AZURE, AZ_KEY, AZURE_Q),
    ],
)
def test_openai_shaped_paths_answer_chat_completions(
    path: str, headers: dict[str, str], params: dict[str, str]
) -> None:
    async def body() -> None:
        async with sim_client() as client:
            response = await client.post(path, json=chat(), headers=headers, params=params)
            assert response.status_code == 200, response.text
            data = response.json()
            assert data["object"] == "chat.completion"
            assert data["choices"][0]["message"]["content"]
            usage = data["usage"]
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            # Azure answers with the deployment as the model; the others echo the body's.
            assert data["model"] == ("az-dep" if path == AZURE else "openai/gpt-4.1")

            streamed = await client.post(
                path,
                json=chat(stream=True, stream_options={"include_usage": True}),
                headers=headers,
                params=params,
            )
            events = sse_data(streamed.text)
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1])
            assert text == data["choices"][0]["message"]["content"]
            assert events[-1]["usage"] == usage

    run(body)


def test_native_envelope_model_from_path_and_same_content() -> None:
    async def body() -> None:
        async with sim_client() as client:
            native = await client.post(CF_NATIVE, json={"messages": MESSAGES}, headers=BEARER)
            assert native.status_code == 200, native.text
            data = native.json()
            assert set(data) == {"result", "success", "errors", "messages"}
            assert data["success"] is True and data["errors"] == [] and data["messages"] == []
            usage = data["result"]["usage"]
            assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens"}
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            # The path's model (with slashes) is the model: same content as the compat path.
            compat = await client.post(
                CF_OPENAI, json={"model": NATIVE_MODEL, "messages": MESSAGES}, headers=BEARER
            )
            assert data["result"]["response"] == compat.json()["choices"][0]["message"]["content"]
            calls = (await client.get("/_sim/calls")).json()
            assert calls[0]["path"] == CF_NATIVE and calls[0]["shape"] == "workers-ai-native"
            assert "model" not in calls[0]["body"]

    run(body)


def test_native_stream_framing_usage_on_last_line() -> None:
    async def body() -> None:
        async with sim_client() as client:
            plain = (
                await client.post(CF_NATIVE, json={"messages": MESSAGES}, headers=BEARER)
            ).json()
            streamed = await client.post(
                CF_NATIVE, json={"messages": MESSAGES, "stream": True}, headers=BEARER
            )
            assert streamed.headers["content-type"].startswith("text/event-stream")
            events = sse_data(streamed.text)
            assert all(set(e) <= {"response", "usage"} for e in events)
            assert all("usage" not in e for e in events[:-1])
            assert events[-1]["usage"] == plain["result"]["usage"]
            assert "".join(e["response"] for e in events) == plain["result"]["response"]
            assert len(events) > 2

    run(body)


def test_native_usage_can_be_omitted_by_config_or_request() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(native_usage=False)) as client:
            data = (
                await client.post(CF_NATIVE, json={"messages": MESSAGES}, headers=BEARER)
            ).json()
            assert "usage" not in data["result"] and data["result"]["response"]
            streamed = await client.post(
                CF_NATIVE, json={"messages": MESSAGES, "stream": True}, headers=BEARER
            )
            assert all("usage" not in e for e in sse_data(streamed.text))
        async with sim_client() as client:
            data = (
                await client.post(
                    CF_NATIVE,
                    json={"messages": MESSAGES, "x_sim": {"omit_usage": True}},
                    headers=BEARER,
                )
            ).json()
            assert "usage" not in data["result"]

    run(body)


def test_native_tool_calls_in_workers_ai_shape() -> None:
    async def body() -> None:
        async with sim_client() as client:
            request = {"messages": MESSAGES, "tools": [WEATHER_TOOL], "tool_choice": "required"}
            data = (await client.post(CF_NATIVE, json=request, headers=BEARER)).json()
            # Workers AI: [{"name", "arguments": <object>}], not OpenAI's id/type/function string.
            assert data["result"]["tool_calls"] == [
                {"name": "get_weather", "arguments": {"city": "sim"}}
            ]
            assert data["result"]["response"] is None

    run(body)


# --------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    ("code", "status"), [(3040, 429), (3036, 429), (5007, 400), (3042, 404), (3007, 408)]
)
@pytest.mark.parametrize("path", [CF_OPENAI, CF_NATIVE, GW_WORKERS])
def test_cloudflare_error_codes(path: str, code: int, status: int) -> None:
    async def body() -> None:
        async with sim_client() as client:
            headers = {**BEARER, "cf-aig-max-attempts": "1"}
            response = await client.post(path, json=chat(x_sim={"cf_code": code}), headers=headers)
            assert_cf_error(response, status, code)
            if code == 3040:
                message = response.json()["errors"][0]["message"]
                assert "Capacity temporarily exceeded" in message

    run(body)


def test_cf_code_with_fail_times_then_success() -> None:
    async def body() -> None:
        async with sim_client() as client:
            request = chat(x_sim={"cf_code": 3040, "fail_times": 2, "key": "k1"})
            first = await client.post(CF_OPENAI, json=request, headers=BEARER)
            second = await client.post(CF_OPENAI, json=request, headers=BEARER)
            third = await client.post(CF_OPENAI, json=request, headers=BEARER)
            assert_cf_error(first, 429, 3040)
            assert_cf_error(second, 429, 3040)
            assert third.status_code == 200

    run(body)


def test_other_errors_on_workers_ai_paths_use_cloudflare_envelope() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(rpm=1)) as client:
            assert (await client.post(CF_OPENAI, json=chat(), headers=BEARER)).status_code == 200
            limited = await client.post(CF_OPENAI, json=chat(), headers=BEARER)
            assert_cf_error(limited, 429, 3040)
            assert "retry-after" in limited.headers
        async with sim_client() as client:
            bad = await client.post(CF_NATIVE, json={"messages": []}, headers=BEARER)
            assert bad.status_code == 400 and bad.json()["success"] is False
            missing = await client.post(CF_OPENAI, json=chat())
            assert_cf_error(missing, 401, 10000)

    run(body)


def test_workers_ai_bearer_must_match_api_key_when_configured() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(api_key="cf-token")) as client:
            ok = await client.post(CF_NATIVE, json={"messages": MESSAGES}, headers=BEARER)
            assert ok.status_code == 200
            wrong = await client.post(
                CF_NATIVE, json={"messages": MESSAGES}, headers={"authorization": "Bearer x"}
            )
            assert_cf_error(wrong, 401, 10000)

    run(body)


# --------------------------------------------------------------------------------------------
# AI Gateway


def test_gateway_cache_miss_then_hit_not_counted() -> None:
    async def body() -> None:
        clock = FakeClock()
        async with sim_client(SimConfig(tpm=100_000), clock) as client:
            headers = {**BEARER, "cf-aig-cache-ttl": "60"}
            first = await client.post(GW_WORKERS, json=chat(), headers=headers)
            assert first.headers["cf-aig-cache-status"] == "MISS"
            stats = (await client.get("/_sim/stats")).json()
            hit = await client.post(GW_WORKERS, json=chat(), headers=headers)
            assert hit.status_code == 200
            assert hit.headers["cf-aig-cache-status"] == "HIT"
            assert hit.json() == first.json()
            after = (await client.get("/_sim/stats")).json()
            # The hit used no tokens upstream (and no limiter capacity).
            assert after["prompt_tokens"] == stats["prompt_tokens"]
            assert after["completion_tokens"] == stats["completion_tokens"]
            assert "x-ratelimit-remaining-tokens" not in hit.headers
            calls = (await client.get("/_sim/calls")).json()
            assert [c["cache_status"] for c in calls] == ["MISS", "HIT"]
            assert calls[1]["cached"] is True and calls[1]["gateway_attempts"] == 0

            # A different body misses; skip-cache bypasses; the entry expires with its TTL.
            other = await client.post(GW_WORKERS, json=chat(temperature=0.5), headers=headers)
            assert other.headers["cf-aig-cache-status"] == "MISS"
            skip = {**headers, "cf-aig-skip-cache": "true"}
            skipped = await client.post(GW_WORKERS, json=chat(), headers=skip)
            assert skipped.headers["cf-aig-cache-status"] == "MISS"
            clock.now += 61
            expired = await client.post(GW_WORKERS, json=chat(), headers=headers)
            assert expired.headers["cf-aig-cache-status"] == "MISS"

    run(body)


def test_gateway_cache_key_header_and_config_switch() -> None:
    async def body() -> None:
        async with sim_client() as client:
            keyed = {"cf-aig-cache-key": "summary-1"}
            first = await client.post(GW_OPENAI, json=chat(), headers=keyed)
            # The same key answers the stored body even for a different request body.
            second = await client.post(GW_OPENAI, json=chat(temperature=1.0), headers=keyed)
            assert second.headers["cf-aig-cache-status"] == "HIT"
            assert second.json() == first.json()
            # Without cache headers and with gateway_cache off, nothing is cached.
            plain = [await client.post(GW_OPENAI, json=chat()) for _ in range(2)]
            assert [r.headers["cf-aig-cache-status"] for r in plain] == ["MISS", "MISS"]
            await client.post("/_sim/config", json={"gateway_cache": True})
            cached = [await client.post(GW_OPENAI, json=chat(seed=7)) for _ in range(2)]
            assert [r.headers["cf-aig-cache-status"] for r in cached] == ["MISS", "HIT"]

    run(body)


def test_gateway_caches_streamed_answers() -> None:
    async def body() -> None:
        async with sim_client() as client:
            headers = {**BEARER, "cf-aig-cache-ttl": "300"}
            request = chat(stream=True, stream_options={"include_usage": True})
            first = await client.post(GW_WORKERS, json=request, headers=headers)
            second = await client.post(GW_WORKERS, json=request, headers=headers)
            assert second.headers["cf-aig-cache-status"] == "HIT"
            assert second.text == first.text
            assert second.headers["content-type"].startswith("text/event-stream")

    run(body)


def test_gateway_retries_internally_unless_max_attempts_is_one() -> None:
    async def body() -> None:
        async with sim_client() as client:
            failing = chat(x_sim={"status": 503, "fail_times": 2, "key": "gw"})
            response = await client.post(GW_OPENAI, json=failing)
            assert response.status_code == 200
            assert response.headers["x-sim-gateway-attempts"] == "3"
            call = (await client.get("/_sim/calls")).json()[-1]
            assert call["gateway_attempts"] == 3

            always = chat(x_sim={"cf_code": 3040})
            exhausted = await client.post(GW_WORKERS, json=always, headers=BEARER)
            assert_cf_error(exhausted, 429, 3040)
            assert exhausted.headers["x-sim-gateway-attempts"] == "5"

            once = {**BEARER, "cf-aig-max-attempts": "1"}
            single = await client.post(GW_WORKERS, json=always, headers=once)
            assert single.headers["x-sim-gateway-attempts"] == "1"
            call = (await client.get("/_sim/calls")).json()[-1]
            assert call["cf_aig"]["cf-aig-max-attempts"] == "1"

            # A client error is not retried.
            bad = await client.post(GW_WORKERS, json=chat(x_sim={"cf_code": 5007}), headers=BEARER)
            assert bad.headers["x-sim-gateway-attempts"] == "1"

            await client.post("/_sim/config", json={"gateway_default_attempts": 2})
            two = await client.post(GW_WORKERS, json=always, headers=BEARER)
            assert two.headers["x-sim-gateway-attempts"] == "2"

    run(body)


def test_gateway_auth_token() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(gateway_token="gw-secret")) as client:
            missing = await client.post(GW_OPENAI, json=chat())
            assert_cf_error(missing, 401, 2009)
            wrong = await client.post(
                GW_OPENAI, json=chat(), headers={"cf-aig-authorization": "Bearer nope"}
            )
            assert_cf_error(wrong, 401, 2009)
            ok = await client.post(
                GW_OPENAI, json=chat(), headers={"cf-aig-authorization": "Bearer gw-secret"}
            )
            assert ok.status_code == 200
            calls = (await client.get("/_sim/calls")).json()
            assert calls[-1]["cf_aig"]["cf-aig-authorization"] is True
            assert "gw-secret" not in json.dumps(calls)
            # The token guards only the gateway's paths.
            assert (await client.post(CF_OPENAI, json=chat(), headers=BEARER)).status_code == 200

    run(body)


def test_gateway_headers_recorded() -> None:
    async def body() -> None:
        async with sim_client() as client:
            metadata = {"job_id": "j1", "batch_id": "b1", "tenant": "t", "attempt": 1}
            headers = {
                **BEARER,
                "cf-aig-metadata": json.dumps(metadata),
                "cf-aig-request-timeout": "5000",
                "cf-aig-max-attempts": "1",
            }
            await client.post(GW_WORKERS, json=chat(), headers=headers)
            call = (await client.get("/_sim/calls")).json()[-1]
            assert call["provider"] == "ai-gateway" and call["shape"] == "gateway-workers-ai"
            assert call["path"] == GW_WORKERS
            assert call["metadata"] == metadata
            assert call["cf_aig"]["cf-aig-request-timeout"] == "5000"
            assert call["authorization"] is True and call["api_key"] is False
            assert "cf-token" not in json.dumps(call)

    run(body)


# --------------------------------------------------------------------------------------------
# Azure


def test_azure_requires_api_key_and_api_version() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(api_key="az-secret-key")) as client:
            no_key = await client.post(AZURE, json=chat(), params=AZURE_Q)
            assert no_key.status_code == 401
            assert no_key.json()["error"]["code"] == "401"
            assert "Access denied" in no_key.json()["error"]["message"]
            wrong = await client.post(
                AZURE, json=chat(), params=AZURE_Q, headers={"api-key": "nope"}
            )
            assert wrong.status_code == 401
            no_version = await client.post(AZURE, json=chat(), headers=AZ_KEY)
            assert no_version.status_code == 404
            assert no_version.json() == {"error": {"code": "404", "message": "Resource not found"}}
            ok = await client.post(AZURE, json=chat(), params=AZURE_Q, headers=AZ_KEY)
            assert ok.status_code == 200
            call = (await client.get("/_sim/calls")).json()[-1]
            assert call["provider"] == "azure" and call["path"] == AZURE
            assert call["api_key"] is True and call["api_version"] == "2024-10-21"
            assert len(call["api_key_sha256"]) == 12
            assert "az-secret-key" not in json.dumps(call)

    run(body)


def test_azure_content_filter_shape() -> None:
    async def body() -> None:
        async with sim_client() as client:
            response = await client.post(
                AZURE, json=chat(x_sim={"content_filter": True}), params=AZURE_Q, headers=AZ_KEY
            )
            assert response.status_code == 400
            error = response.json()["error"]
            assert error["code"] == "content_filter" and error["status"] == 400
            assert error["param"] == "prompt"
            assert "content management policy" in error["message"]
            inner = error["innererror"]
            assert inner["code"] == "ResponsibleAIPolicyViolation"
            result = inner["content_filter_result"]
            assert set(result) == {"hate", "self_harm", "sexual", "violence"}
            assert result["hate"] == {"filtered": True, "severity": "high"}

    run(body)


# --------------------------------------------------------------------------------------------
# --provider restriction and config


def test_provider_restriction_and_live_config() -> None:
    async def body() -> None:
        async with sim_client(SimConfig(provider="azure")) as client:
            assert (await client.post("/v1/chat/completions", json=chat())).status_code == 404
            assert (await client.post(CF_OPENAI, json=chat(), headers=BEARER)).status_code == 404
            assert (await client.post(GW_OPENAI, json=chat())).status_code == 404
            ok = await client.post(AZURE, json=chat(), params=AZURE_Q, headers=AZ_KEY)
            assert ok.status_code == 200
            await client.post("/_sim/config", json={"provider": "all"})
            assert (await client.post("/v1/chat/completions", json=chat())).status_code == 200
            bad = await client.post("/_sim/config", json={"provider": "bedrock"})
            assert bad.status_code == 400

    run(body)


def test_cli_flags_and_env() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(
        ["--provider", "workers-ai", "--gateway-cache", "true", "--gateway-default-attempts", "3"]
    )
    config = config_from_args(ns, SimConfig())
    assert config.provider == "workers-ai" and config.gateway_cache is True
    assert config.gateway_default_attempts == 3 and config.native_usage is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--provider", "bedrock"])
    with pytest.raises(SystemExit):
        parser.parse_args(["--gateway-default-attempts", "9"])


def test_openai_call_log_entries_keep_their_shape() -> None:
    async def body() -> None:
        async with sim_client() as client:
            await client.post("/v1/chat/completions", json=chat())
            call = (await client.get("/_sim/calls")).json()[0]
            assert set(call) == {"t", "status", "body", "request_id"}

    run(body)
