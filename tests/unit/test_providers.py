"""Provider adapters against recorded answers (tests/fixtures/providers, each naming its
source) and httpx.MockTransport: the request each builds, the answers and errors each reads."""

from __future__ import annotations

import asyncio
import json
import pickle
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatjobs.errors import UpstreamStatusError, is_retryable
from chatjobs.jobs.attempts import error_record
from chatjobs.providers import ADAPTERS, CallContext, for_route
from chatjobs.providers.ai_gateway import METADATA_KEYS
from chatjobs.providers.workers_ai import NativeStream
from chatjobs.routing import ModelEntry, ModelsFileError, Route, _build_route, load_models_file
from chatjobs.settings import get_settings
from chatjobs.upstream import Completion, chat_completion
from worker.execute import token_counts

FIXTURES = Path(__file__).parent.parent / "fixtures" / "providers"
REQUEST = {
    "model": "gpt-4.1",
    "messages": [{"role": "user", "content": "What are the three laws of thermodynamics?"}],
    "max_tokens": 64,
}
CONTEXT = CallContext(
    job_id="0192-job",
    batch_id="batch_1",
    schedule_id=None,
    tenant="t-1",
    attempt=2,
    gateway={"cache_ttl": 3600, "skip_cache": True, "cache_key": "summary-2026-12-01"},
    timeout_seconds=30.0,
)


def fixture(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    assert loaded["source"]  # every recording says where it came from
    return loaded


def route(model: str = "gpt-4.1", **fields: Any) -> Route:
    return _build_route(model, get_settings(), {model: ModelEntry.model_validate(fields)})


def send(
    route_: Route,
    answer: httpx.Response,
    request: dict[str, Any] | None = None,
    context: CallContext = CONTEXT,
    api_key: str = "key-1",
) -> tuple[httpx.Request, Completion]:
    """One call through chat_completion with a transport that records what was sent."""
    seen: list[httpx.Request] = []

    def handler(sent: httpx.Request) -> httpx.Response:
        seen.append(sent)
        return answer

    async def run() -> Completion:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await chat_completion(
                request or REQUEST,
                model=route_.model,
                client=client,
                api_key=api_key,
                route=route_,
                context=context,
            )

    completion = asyncio.run(run())
    return seen[0], completion


def recorded(name: str, headers: dict[str, str] | None = None) -> httpx.Response:
    data = fixture(name)
    return httpx.Response(
        data["status"], json=data["body"], headers={**data["headers"], **(headers or {})}
    )


def sent_json(sent: httpx.Request) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(sent.content)
    return body


# --- the request each provider builds ------------------------------------------------------


def test_openai_is_the_default_and_keeps_todays_url_and_bearer() -> None:
    r = route(base_url="http://up.test/v1")
    assert r.provider == "openai" and for_route(r).name == "openai"
    sent, completion = send(r, recorded("openai_chat_completion.json"))
    assert str(sent.url) == "http://up.test/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer key-1"
    assert sent_json(sent)["model"] == "gpt-4.1"
    assert not any(name.startswith("cf-aig-") for name in sent.headers)
    assert completion.usage["total_tokens"] == 23 and not completion.cached


def test_workers_ai_openai_mode_url_model_and_default_host() -> None:
    r = route(provider="workers-ai", account_id="acc123", upstream_model="openai/gpt-4.1")
    sent, completion = send(r, recorded("openai_chat_completion.json"))
    assert str(sent.url) == (
        "https://api.cloudflare.com/client/v4/accounts/acc123/ai/v1/chat/completions"
    )
    assert sent.headers["authorization"] == "Bearer key-1"
    assert sent_json(sent)["model"] == "openai/gpt-4.1"
    assert completion.body["choices"][0]["message"]["content"] == "Three laws."
    assert not completion.usage_estimated


def test_workers_ai_native_mode_sends_the_seed_body_without_model_to_run() -> None:
    r = route(
        provider="workers-ai",
        account_id="acc123",
        mode="native",
        upstream_model="@cf/meta/llama-3.1-8b-instruct",
        base_url="http://127.0.0.1:8100",
        gateway_id="default",
    )
    sent, _ = send(r, recorded("workers_ai_native_rest_api.json"))
    assert str(sent.url) == (
        "http://127.0.0.1:8100/client/v4/accounts/acc123/ai/run/@cf/meta/llama-3.1-8b-instruct"
    )
    body = sent_json(sent)
    assert "model" not in body
    assert body == {k: v for k, v in REQUEST.items() if k != "model"}
    assert sent.headers["cf-aig-gateway-id"] == "default"


def test_ai_gateway_urls_for_workers_ai_and_openai() -> None:
    for provider, path in (
        ("workers-ai", "workers-ai/v1/chat/completions"),
        ("openai", "openai/chat/completions"),
    ):
        r = route(
            provider="ai-gateway",
            account_id="acc123",
            gateway_id="gw1",
            gateway_provider=provider,
        )
        sent, _ = send(r, recorded("openai_chat_completion.json"))
        assert str(sent.url) == f"https://gateway.ai.cloudflare.com/v1/acc123/gw1/{path}"
        assert sent.headers["authorization"] == "Bearer key-1"


def test_ai_gateway_headers_retries_metadata_cache_options_timeout_and_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CF_AIG_TOKEN_FOR_TEST", "aig-secret")
    r = route(
        provider="ai-gateway",
        account_id="acc123",
        gateway_id="gw1",
        gateway_token_env="CF_AIG_TOKEN_FOR_TEST",
    )
    sent, _ = send(r, recorded("openai_chat_completion.json"))
    assert sent.headers["cf-aig-max-attempts"] == "1"  # chatjobs owns retries
    assert sent.headers["cf-aig-authorization"] == "Bearer aig-secret"
    metadata = json.loads(sent.headers["cf-aig-metadata"])
    assert metadata == {"job_id": "0192-job", "batch_id": "batch_1", "tenant": "t-1", "attempt": 2}
    assert set(metadata) <= set(METADATA_KEYS) and len(METADATA_KEYS) == 5
    assert all(isinstance(v, str | int | float | bool) for v in metadata.values())
    assert sent.headers["cf-aig-cache-ttl"] == "3600"
    assert sent.headers["cf-aig-skip-cache"] == "true"
    assert sent.headers["cf-aig-cache-key"] == "summary-2026-12-01"
    assert sent.headers["cf-aig-request-timeout"] == "30000"


def test_ai_gateway_without_token_or_options_sends_only_max_attempts_and_metadata() -> None:
    r = route(provider="ai-gateway", account_id="a", gateway_id="g", gateway_max_attempts=3)
    sent, _ = send(r, recorded("openai_chat_completion.json"), context=CallContext(attempt=1))
    assert sent.headers["cf-aig-max-attempts"] == "3"
    assert json.loads(sent.headers["cf-aig-metadata"]) == {"attempt": 1}
    assert not {"cf-aig-authorization", "cf-aig-cache-ttl", "cf-aig-cache-key"} & set(sent.headers)


def test_azure_deployment_path_api_version_and_key_header() -> None:
    r = route(
        provider="azure",
        endpoint="https://res.openai.azure.com/",
        deployment="gpt41",
        api_key_env="AZURE_KEY",
    )
    sent, completion = send(r, recorded("openai_chat_completion.json"))
    assert str(sent.url) == (
        "https://res.openai.azure.com/openai/deployments/gpt41/chat/completions"
        "?api-version=2024-10-21"
    )
    assert sent.headers["api-key"] == "key-1"
    assert "authorization" not in sent.headers
    assert "model" not in sent_json(sent)  # the deployment is the model
    assert completion.usage["total_tokens"] == 23


def test_azure_api_version_is_configurable() -> None:
    r = route(provider="azure", endpoint="https://e.test", deployment="d", api_version="2025-01-01")
    sent, _ = send(r, recorded("openai_chat_completion.json"))
    assert sent.url.params["api-version"] == "2025-01-01"


# --- answers ---------------------------------------------------------------------------


def test_native_envelope_without_usage_is_a_completion_with_estimated_usage() -> None:
    r = route(provider="workers-ai", account_id="a", mode="native", upstream_model="@cf/m")
    _, completion = send(r, recorded("workers_ai_native_rest_api.json"))
    message = completion.body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"].startswith("Hello, World first appeared in 1974")
    assert completion.body["object"] == "chat.completion"
    assert completion.body["choices"][0]["finish_reason"] == "stop"
    assert completion.usage_estimated
    usage = completion.usage
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_native_envelope_tool_calls_and_usage() -> None:
    r = route(provider="workers-ai", account_id="a", mode="native")
    _, completion = send(r, recorded("workers_ai_native_tool_calls.json"))
    choice = completion.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "getWeather"
    assert json.loads(call["function"]["arguments"]) == {
        "latitude": "51.5074",
        "longitude": "-0.1278",
    }
    assert completion.usage == {"prompt_tokens": 118, "completion_tokens": 25, "total_tokens": 143}
    assert not completion.usage_estimated


def test_native_answer_without_result_is_malformed_and_retryable() -> None:
    r = route(provider="workers-ai", account_id="a", mode="native")
    from chatjobs.errors import UpstreamMalformedResponse

    with pytest.raises(UpstreamMalformedResponse) as caught:
        send(r, httpx.Response(200, json={"success": True, "result": None}))
    assert is_retryable(caught.value)


def stream_lines() -> list[str]:
    return (FIXTURES / "workers_ai_native_stream.txt").read_text().splitlines()


def test_native_stream_assembles_text_usage_and_openai_deltas() -> None:
    deltas: list[dict[str, Any]] = []
    parser = NativeStream(model="@cf/m", on_delta=deltas.append)
    assert stream_lines()[0].startswith(": source:")
    for line in stream_lines():
        if parser.feed(line):
            break
    completion = parser.result()
    assert completion["choices"][0]["message"]["content"] == "Hello, World!"
    assert completion["usage"]["total_tokens"] == 16
    assert [d["delta"]["content"] for d in deltas] == ["Hello", ", World", "!"]


def test_native_stream_through_the_client_and_cut_stream() -> None:
    r = route(provider="workers-ai", account_id="a", mode="native", upstream_model="@cf/m")
    text = "\n".join(stream_lines()) + "\n"
    answer = httpx.Response(200, text=text, headers={"content-type": "text/event-stream"})
    sent, completion = send(r, answer, request={**REQUEST, "stream": True})
    assert sent_json(sent)["stream"] is True
    assert completion.body["choices"][0]["message"]["content"] == "Hello, World!"
    assert completion.usage["total_tokens"] == 16 and not completion.usage_estimated
    cut = NativeStream(model="m", on_delta=None)
    cut.feed('data: {"response":"Hel"}')
    from chatjobs.errors import UpstreamConnectionError

    with pytest.raises(UpstreamConnectionError):
        cut.result()


def test_native_stream_without_usage_is_estimated() -> None:
    r = route(provider="workers-ai", account_id="a", mode="native")
    text = 'data: {"response":"Hi there"}\n\ndata: [DONE]\n\n'
    _, completion = send(r, httpx.Response(200, text=text), request={**REQUEST, "stream": True})
    assert completion.usage_estimated and completion.usage["completion_tokens"] > 0


def test_gateway_cache_hit_marks_the_call_cached_and_keeps_usage() -> None:
    r = route(provider="ai-gateway", account_id="a", gateway_id="g")
    _, hit = send(r, recorded("openai_chat_completion.json", {"cf-aig-cache-status": "HIT"}))
    _, miss = send(r, recorded("openai_chat_completion.json", {"cf-aig-cache-status": "MISS"}))
    assert hit.cached and not miss.cached
    assert hit.usage["total_tokens"] == 23  # the returned usage is kept
    # Provider tokens are not counted for a cached call, only as gateway_cached.
    assert token_counts(hit) == {"gateway_cached": 23}
    assert token_counts(miss)["prompt"] == 20


# --- errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", fixture("cloudflare_errors.json")["cases"], ids=lambda c: c["code"]
)
def test_cloudflare_error_codes_are_classified(case: dict[str, Any]) -> None:
    body = {
        "success": False,
        "errors": [{"code": case["code"], "message": case["message"]}],
        "result": None,
        "messages": [],
    }
    for r in (
        route(provider="workers-ai", account_id="a", mode="native"),
        route(provider="workers-ai", account_id="a"),
        route(provider="ai-gateway", account_id="a", gateway_id="g"),
    ):
        with pytest.raises(UpstreamStatusError) as caught:
            send(r, httpx.Response(case["status"], json=body))
        err = caught.value
        assert err.status_code == case["status"]
        assert err.code == str(case["code"])
        assert case["message"][:20] in err.message
        assert is_retryable(err) is case["retryable"], case


def test_capacity_error_carries_retry_after_for_the_backoff() -> None:
    body = {"success": False, "errors": [{"code": 3040, "message": "Out of capacity"}]}
    r = route(provider="workers-ai", account_id="a")
    with pytest.raises(UpstreamStatusError) as caught:
        send(r, httpx.Response(429, json=body, headers={"retry-after": "7"}))
    assert caught.value.retry_after == 7.0 and is_retryable(caught.value)


def test_openai_shape_errors_keep_todays_classification_on_every_provider() -> None:
    quota = {"error": {"message": "quota", "type": "insufficient_quota", "code": None}}
    limited = {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}
    for name in ADAPTERS:
        assert not is_retryable(ADAPTERS[name].parse_error(429, {}, json.dumps(quota).encode()))
        assert is_retryable(ADAPTERS[name].parse_error(429, {}, json.dumps(limited).encode()))
        assert is_retryable(ADAPTERS[name].parse_error(503, {}, b"<html>busy</html>"))
        assert not is_retryable(ADAPTERS[name].parse_error(400, {}, b"{}"))


def test_azure_content_filter_is_terminal_and_its_result_is_kept_on_the_job() -> None:
    r = route(provider="azure", endpoint="https://e.test", deployment="d")
    with pytest.raises(UpstreamStatusError) as caught:
        send(r, recorded("azure_content_filter.json"))
    err = caught.value
    assert err.status_code == 400 and err.code == "content_filter"
    assert not is_retryable(err)
    assert err.request_id == "a1b2c3"
    record = error_record(pickle.loads(pickle.dumps(err)))
    assert record["code"] == "content_filter"
    assert record["detail"]["innererror_code"] == "ResponsibleAIPolicyViolation"
    assert record["detail"]["content_filter_result"]["hate"] == {
        "filtered": True,
        "severity": "medium",
    }
    from chatjobs.schemas import JobError

    shown = JobError.from_stored(record)
    assert shown is not None and shown.detail == record["detail"]  # GET /v1/jobs/{id} shows it


# --- the models file -------------------------------------------------------------------


def test_models_file_mixing_providers_routes_by_model(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        """
[models."gpt-4.1"]
provider = "azure"
endpoint = "https://res.openai.azure.com"
deployment = "gpt41"
api_key_env = "AZURE_OPENAI_KEY"

[models."llama"]
provider = "workers-ai"
account_id = "acc123"
mode = "native"
upstream_model = "@cf/meta/llama-3.1-8b-instruct"

[models."*"]
base_url = "http://openai.test/v1"
"""
    )
    entries = load_models_file(models)
    settings = get_settings()
    azure = _build_route("gpt-4.1", settings, entries)
    llama = _build_route("llama", settings, entries)
    other = _build_route("gpt-4o", settings, entries)
    assert (azure.provider, llama.provider, other.provider) == ("azure", "workers-ai", "openai")
    # The * table's OpenAI base URL does not leak into another provider's host.
    assert llama.base_url == "https://api.cloudflare.com"
    assert other.base_url == "http://openai.test/v1"
    assert llama.limits.rpm == 300  # Workers AI's documented text-generation default
    assert llama.limit_key != azure.limit_key != other.limit_key
    # Every text model of a Workers AI account shares the account's limit.
    assert _build_route("m2", settings, {"m2": entries["llama"]}).limit_key == llama.limit_key


def test_models_file_names_a_providers_missing_setting(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text('[models."x"]\nprovider = "ai-gateway"\naccount_id = "a"\n')
    with pytest.raises(ModelsFileError, match=r"models\.x: provider ai-gateway needs gateway_id"):
        load_models_file(models)
    models.write_text('[models."x"]\nprovider = "bedrock"\n')
    with pytest.raises(ModelsFileError, match=r"models\.x\.provider"):
        load_models_file(models)


# --- the job's gateway options ------------------------------------------------------------


def test_job_gateway_options_are_validated() -> None:
    from pydantic import ValidationError

    from chatjobs.schemas import JobCreate

    base = {"request": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}
    ok = JobCreate.model_validate({**base, "gateway": {"cache_ttl": 60, "cache_key": "k-1"}})
    assert ok.gateway is not None and ok.gateway.cache_ttl == 60
    for bad in (
        {"cache_ttl": 59},
        {"cache_ttl": "600"},
        {"skip_cache": "yes"},
        {"cache_key": "x" * 257},
        {"cache_key": "has space"},
        {"cache_ttl_seconds": 60},
    ):
        with pytest.raises(ValidationError):
            JobCreate.model_validate({**base, "gateway": bad})
