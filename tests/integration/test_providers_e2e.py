"""Providers end to end: an api and a worker of their own, a models file mixing Workers AI
(OpenAI-compatible and native), AI Gateway and Azure OpenAI, every route pointed at the suite's
simulator, which answers each provider's path in that provider's shape."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from chatjobs.limiter import RateLimiter
from chatjobs.routing import model_entries, route_for
from chatjobs.settings import get_settings
from chatjobs.testing import wait_job
from tests.conftest import MiniStack
from tests.integration.test_execution import SEED_EXAMPLES, calls_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

Make = Callable[..., MiniStack]
ACCOUNT = "acc-e2e"
GATEWAY = "gw-e2e"
NATIVE = "@cf/meta/llama-3.1-8b-instruct"
DEPLOYMENT = "az-dep"
CF_TOKEN = "cf-e2e-token"
AZ_KEY = "az-e2e-key"
SECRETS = {"E2E_CF_TOKEN": CF_TOKEN, "E2E_AZ_KEY": AZ_KEY}

# model -> (path the simulator should see, the model the simulator answers as)
ROUTED = {
    "gpt-4.1": (f"/client/v4/accounts/{ACCOUNT}/ai/v1/chat/completions", "openai/gpt-4.1"),
    "native-model": (f"/client/v4/accounts/{ACCOUNT}/ai/run/{NATIVE}", NATIVE),
    "gw-model": (f"/v1/{ACCOUNT}/{GATEWAY}/workers-ai/v1/chat/completions", "openai/gpt-4.1"),
    "az-model": (f"/openai/deployments/{DEPLOYMENT}/chat/completions", DEPLOYMENT),
}


def models_toml(sim_base: str) -> str:
    cf = f'base_url = "{sim_base}"\naccount_id = "{ACCOUNT}"\napi_key_env = "E2E_CF_TOKEN"\n'
    return (
        '[models."gpt-4.1"]\nprovider = "workers-ai"\nupstream_model = "openai/gpt-4.1"\n'
        + cf
        + '\n[models."native-model"]\nprovider = "workers-ai"\nmode = "native"\n'
        + f'upstream_model = "{NATIVE}"\n'
        + cf
        + '\n[models."gw-model"]\nprovider = "ai-gateway"\ngateway_provider = "workers-ai"\n'
        + f'gateway_id = "{GATEWAY}"\nupstream_model = "openai/gpt-4.1"\n'
        + cf
        # A gateway route of its own with a small token budget, so a refund shows in the limiter.
        + '\n[models."gw-cache-model"]\nprovider = "ai-gateway"\ngateway_provider = "workers-ai"\n'
        + f'gateway_id = "{GATEWAY}-cache"\nupstream_model = "openai/gpt-4.1"\ntpm = 1200\n'
        + cf
        + '\n[models."az-model"]\nprovider = "azure"\n'
        + f'endpoint = "{sim_base}"\ndeployment = "{DEPLOYMENT}"\napi_key_env = "E2E_AZ_KEY"\n'
    )


@pytest.fixture
def models_file(tmp_path: Path, simulator: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(models_toml(simulator.removesuffix("/v1")))
    return path


@pytest.fixture
def stack(make_stack: Make, models_file: Path) -> MiniStack:
    return make_stack(env={"CHATJOBS_MODELS_FILE": str(models_file), **SECRETS})


@pytest.fixture
def api(stack: MiniStack, api_key: str) -> Iterator[httpx.Client]:
    with stack.client(api_key) as client:
        yield client


def direct(sim: httpx.Client, model: str, request: dict[str, Any]) -> dict[str, Any]:
    """The simulator's own answer for this request as `model`, without chatjobs."""
    plain = {k: v for k, v in request.items() if k not in ("stream", "stream_options", "x_test")}
    return sim.post("/v1/chat/completions", json={**plain, "model": model}).json()


def submit(api: httpx.Client, model: str, request: dict[str, Any], **job: Any) -> str:
    response = api.post("/v1/jobs", json={"request": {**request, "model": model}, **job})
    assert response.status_code in (200, 201, 202), response.text
    return str(response.json()["id"])


def provider_calls(sim: httpx.Client, marker: str) -> list[dict[str, Any]]:
    return [c for c in calls_for(sim, marker) if "provider" in c]


@pytest.mark.parametrize("model", list(ROUTED))
def test_the_seed_examples_through_each_provider_mode(
    api: httpx.Client, sim: httpx.Client, model: str
) -> None:
    path, seen_model = ROUTED[model]
    markers = {name: uuid.uuid4().hex for name in SEED_EXAMPLES}
    jobs = {
        name: submit(api, model, {**example, "x_test": markers[name]})
        for name, example in SEED_EXAMPLES.items()
    }
    for name, job_id in jobs.items():
        done = wait_job(api, job_id, timeout=60)
        assert done["status"] == "succeeded", done
        expected = direct(sim, seen_model, SEED_EXAMPLES[name])
        result = done["result"]
        assert result["object"] == "chat.completion"
        content = result["choices"][0]["message"]["content"]
        assert content == expected["choices"][0]["message"]["content"]
        assert done["usage"] == expected["usage"]
        assert done["attempts"] == 1

        (call,) = provider_calls(sim, markers[name])
        assert call["status"] == 200 and call["path"] == path
        sent = call["body"]
        assert sent["messages"] == SEED_EXAMPLES[name]["messages"]
        if name == "streaming":
            assert sent["stream"] is True
        if model == "native-model" or model == "az-model":
            assert "model" not in sent  # the path names the model
        else:
            assert sent["model"] == "openai/gpt-4.1"
        if model == "az-model":
            assert call["provider"] == "azure"
            assert call["api_key"] is True and call["authorization"] is False
            assert call["api_version"] == "2024-10-21"
        else:
            assert call["authorization"] is True and call["api_key"] is False
        if model == "gw-model":
            assert call["cf_aig"]["cf-aig-max-attempts"] == "1"
            assert call["gateway_attempts"] == 1
            assert call["metadata"]["job_id"] == job_id


@pytest.mark.parametrize("model", ["gpt-4.1", "native-model"])
def test_cloudflare_error_codes_are_classified(
    api: httpx.Client, sim: httpx.Client, model: str
) -> None:
    def job(cf_code: int, **xsim: Any) -> tuple[str, str]:
        marker = uuid.uuid4().hex
        request = {
            "messages": [{"role": "user", "content": f"error {cf_code}"}],
            "x_test": marker,
            "x_sim": {"cf_code": cf_code, "key": marker, **xsim},
        }
        return marker, submit(api, model, request)

    capacity = job(3040, fail_times=1)
    quota = job(3036)
    no_model = job(5007)

    done = wait_job(api, capacity[1], timeout=60)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert [c["status"] for c in provider_calls(sim, capacity[0])] == [429, 200]

    for (marker, job_id), code, status in ((quota, "3036", 429), (no_model, "5007", 400)):
        done = wait_job(api, job_id, timeout=60)
        assert done["status"] == "failed", done
        assert (done["error"]["status_code"], done["error"]["code"]) == (status, code)
        assert [c["status"] for c in provider_calls(sim, marker)] == [status]


def test_azure_content_filter_and_a_native_answer_without_usage(
    api: httpx.Client, sim: httpx.Client
) -> None:
    marker = uuid.uuid4().hex
    messages = [{"role": "user", "content": f"filtered {marker}"}]
    filtered = submit(
        api, "az-model", {"messages": messages, "x_test": marker, "x_sim": {"content_filter": True}}
    )
    done = wait_job(api, filtered, timeout=60)
    assert done["status"] == "failed", done
    assert (done["error"]["status_code"], done["error"]["code"]) == (400, "content_filter")
    assert done["error"]["detail"]["innererror_code"] == "ResponsibleAIPolicyViolation"
    assert [c["status"] for c in provider_calls(sim, marker)] == [400]

    # No usage in the native answer: chatjobs counts the tokens itself and says so.
    marker = uuid.uuid4().hex
    request = {"messages": messages, "x_test": marker, "x_sim": {"omit_usage": True}}
    done = wait_job(api, submit(api, "native-model", request), timeout=60)
    assert done["status"] == "succeeded", done
    expected = direct(sim, NATIVE, request)
    assert (
        done["result"]["choices"][0]["message"]["content"]
        == (expected["choices"][0]["message"]["content"])
    )
    assert done["usage"]["completion_tokens"] > 0
    rows = api.get("/v1/usage").json()["data"]
    assert sum(r.get("estimated_requests", 0) for r in rows) == 1


def test_a_gateway_cache_hit_is_marked_refunded_and_reported_apart(
    api: httpx.Client, sim: httpx.Client, models_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATJOBS_MODELS_FILE", str(models_file))
    get_settings.cache_clear()
    model_entries.cache_clear()
    try:
        route = route_for("gw-cache-model")
    finally:
        monkeypatch.delenv("CHATJOBS_MODELS_FILE")
        get_settings.cache_clear()
        model_entries.cache_clear()
    client = redis.Redis.from_url(get_settings().redis_url)
    limiter = RateLimiter(client)
    marker = uuid.uuid4().hex
    request = {
        "messages": [{"role": "user", "content": f"Summarise today {marker}"}],
        "max_tokens": 60,
        "x_test": marker,
    }

    def run(options: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """Run one job; return it and the token schedule's backlog after it (seconds)."""
        done = wait_job(api, submit(api, "gw-cache-model", request, gateway=options), timeout=60)
        assert done["status"] == "succeeded", done
        time.sleep(0.5)  # the worker corrects the limiter just after recording the outcome
        state = limiter.state(route.limit_key)
        return done, max(0.0, state["tokens_tat"] - state["now"])

    # The limiter paces: each call starts at the schedule's end and reserves its tokens past
    # it. The correction then keeps what the provider counted: a MISS its used tokens, a HIT
    # none (its whole reservation given back), so a HIT leaves those tokens' time less behind.
    miss, _ = run({"cache_ttl": 600})
    hit, hit_backlog = run({"cache_ttl": 600})
    again, miss_backlog = run({"skip_cache": True})
    client.close()
    used = miss["usage"]["total_tokens"] * 60 / (1200 * get_settings().limiter_headroom)
    assert hit_backlog < miss_backlog - used / 2, (hit_backlog, miss_backlog, used)

    assert hit["result"]["choices"] == miss["result"]["choices"]
    assert hit["usage"] == miss["usage"]
    calls = provider_calls(sim, marker)
    assert [c["cache_status"] for c in calls] == ["MISS", "HIT", "SKIP"]
    assert [c["cf_aig"].get("cf-aig-cache-ttl") for c in calls] == ["600", "600", None]
    assert calls[2]["cf_aig"]["cf-aig-skip-cache"] == "true"
    assert again["usage"] == miss["usage"]
    assert all(c["cf_aig"]["cf-aig-max-attempts"] == "1" for c in calls)

    (row,) = api.get("/v1/usage").json()["data"]
    assert row["requests"] == 3
    assert row["cached_requests"] == 1
    assert row["cached_tokens"] == miss["usage"]["total_tokens"]
    assert row["billed_tokens"] == row["total_tokens"] - row["cached_tokens"]


def test_a_gateway_without_max_attempts_retries_inside_and_counts_it(sim: httpx.Client) -> None:
    """What chatjobs avoids by sending cf-aig-max-attempts: 1, seen from a raw client."""
    path = ROUTED["gw-model"][0]
    marker = uuid.uuid4().hex
    body = {
        "model": "openai/gpt-4.1",
        "messages": [{"role": "user", "content": "retry me"}],
        "x_test": marker,
        "x_sim": {"cf_code": 3040, "fail_times": 2, "key": marker},
    }
    answer = sim.post(path, json=body, headers={"authorization": f"Bearer {CF_TOKEN}"})
    assert answer.status_code == 200
    assert answer.headers["x-sim-gateway-attempts"] == "3"


def jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def test_one_batch_per_model_and_two_batches_route_to_two_providers(
    stack: MiniStack, api_key: str, sim: httpx.Client
) -> None:
    """A batch holds one model (OpenAI's rule, kept by chatjobs.batches.lines): a file mixing
    two models is refused line by line, and two batches sent together, one per model, each go to
    their model's provider."""
    oai = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key, max_retries=0)
    marker = uuid.uuid4().hex

    def rows(model: str, n: int) -> list[dict[str, Any]]:
        return [
            {
                "custom_id": f"{model}-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": model,
                    "messages": [{"role": "user", "content": f"line {i}"}],
                    "x_test": marker,
                },
            }
            for i in range(n)
        ]

    def create(lines: list[dict[str, Any]]) -> Any:
        upload = oai.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        return oai.batches.create(
            input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

    mixed = create(rows("native-model", 2) + rows("az-model", 2))
    native = create(rows("native-model", 3))
    azure = create(rows("az-model", 3))
    final = ("completed", "failed", "expired", "cancelled")
    deadline = time.monotonic() + 90
    done: dict[str, Any] = {}
    while time.monotonic() < deadline and len(done) < 3:
        for batch in (mixed, native, azure):
            got = oai.batches.retrieve(batch.id)
            if got.status in final:
                done[batch.id] = got
        time.sleep(0.3)
    assert len(done) == 3, done
    for batch in (native, azure):
        counts = done[batch.id].request_counts
        assert done[batch.id].status == "completed"
        assert (counts.total, counts.completed, counts.failed) == (3, 3, 0)
    refused = done[mixed.id]
    assert refused.status == "failed"
    assert refused.errors is not None
    assert any(e.code == "model_mismatch" for e in refused.errors.data or [])

    paths = sorted({c["path"] for c in provider_calls(sim, marker)})
    assert paths == sorted({ROUTED["native-model"][0], ROUTED["az-model"][0]})
    by_path: dict[str, int] = {}
    for c in provider_calls(sim, marker):
        by_path[c["path"]] = by_path.get(c["path"], 0) + 1
    assert by_path == {ROUTED["native-model"][0]: 3, ROUTED["az-model"][0]: 3}
