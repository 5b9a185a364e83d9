"""The simulator's Anthropic Message Batches API (chatjobs.simulator_anthropic): in-process
over ASGI, and one round trip of AnthropicBatch against a real simulator over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from chatjobs.errors import is_retryable
from chatjobs.limiter import Limits
from chatjobs.offload.anthropic_batch import AnthropicBatch
from chatjobs.offload.upstream import EarlierSubmit, Item
from chatjobs.routing import Route
from chatjobs.simulator import SimConfig, count_text_tokens, create_app
from tests.unit.test_simulator import running_server

pytestmark = pytest.mark.timeout(30)

BATCHES = "/v1/messages/batches"


def request(custom_id: str, **params: Any) -> dict[str, Any]:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": f"hello {custom_id}"}],
        **params,
    }
    return {"custom_id": custom_id, "params": body}


@contextlib.asynccontextmanager
async def sim_client(config: SimConfig | None = None) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(config or SimConfig(anthropic_batch_delay=0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
        yield client


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(test())


async def results(client: httpx.AsyncClient, batch: dict[str, Any]) -> dict[str, Any]:
    response = await client.get(batch["results_url"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-jsonl")
    lines = [json.loads(line) for line in response.text.splitlines()]
    return {line["custom_id"]: line["result"] for line in lines}


def test_create_validates_custom_ids_and_params_with_anthropics_error_shape() -> None:
    async def test() -> None:
        async with sim_client() as client:
            bad = [
                ({"requests": []}, "requests"),
                ({"requests": [request("has space")]}, "custom_id"),
                ({"requests": [request("x" * 65)]}, "custom_id"),
                ({"requests": [request("a"), request("a")]}, "Duplicate"),
                ({"requests": [request("a", max_tokens=None)]}, "max_tokens"),
                ({"requests": [request("a", model="")]}, "model"),
                ({"requests": [request("a", messages=[])]}, "messages"),
                ({"requests": [{"custom_id": "a"}]}, "params"),
                ({}, "requests"),
            ]
            for body, needle in bad:
                response = await client.post(BATCHES, json=body)
                assert response.status_code == 400, body
                error = response.json()
                assert error["type"] == "error"
                assert error["error"]["type"] == "invalid_request_error"
                assert needle in error["error"]["message"]
            ok = await client.post(BATCHES, json={"requests": [request("A_b-1" + "x" * 59)]})
            assert ok.status_code == 200

    run(test)


def test_a_batch_is_in_progress_then_ends_with_deterministic_messages() -> None:
    async def test() -> None:
        async with sim_client(SimConfig(anthropic_batch_delay=0.2)) as client:
            created = (await client.post(BATCHES, json={"requests": [request("a")]})).json()
            assert created["type"] == "message_batch" and created["id"].startswith("msgbatch_")
            assert created["processing_status"] == "in_progress"
            assert created["results_url"] is None and created["ended_at"] is None
            assert created["request_counts"] == {
                "processing": 1,
                "succeeded": 0,
                "errored": 0,
                "canceled": 0,
                "expired": 0,
            }
            early = await client.get(f"{BATCHES}/{created['id']}/results")
            assert early.status_code == 400
            await asyncio.sleep(0.25)
            ended = (await client.get(f"{BATCHES}/{created['id']}")).json()
            assert ended["processing_status"] == "ended" and ended["ended_at"] is not None
            assert ended["request_counts"]["succeeded"] == 1
            assert ended["results_url"] == f"http://sim{BATCHES}/{created['id']}/results"
            message = (await results(client, ended))["a"]["message"]
            assert message["type"] == "message" and message["role"] == "assistant"
            assert message["stop_reason"] == "end_turn"
            text = message["content"][0]["text"]
            assert text.startswith("Simulated reply ")
            assert message["usage"]["output_tokens"] == count_text_tokens(text)
            assert message["usage"]["input_tokens"] > 0
            again = (await client.post(BATCHES, json={"requests": [request("a")]})).json()
            await asyncio.sleep(0.25)
            retrieved = (await client.get(f"{BATCHES}/{again['id']}")).json()
            assert (await results(client, retrieved))["a"]["message"]["content"][0]["text"] == text

    run(test)


def test_max_tokens_and_forced_tools_shape_the_message() -> None:
    async def test() -> None:
        tool = {
            "name": "weather",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
        requests = [
            request("short", max_tokens=3),
            request("tool", tools=[tool], tool_choice={"type": "any"}),
        ]
        async with sim_client() as client:
            batch = (await client.post(BATCHES, json={"requests": requests})).json()
            batch = (await client.get(f"{BATCHES}/{batch['id']}")).json()
            got = await results(client, batch)
            short = got["short"]["message"]
            assert short["stop_reason"] == "max_tokens" and short["usage"]["output_tokens"] <= 3
            called = got["tool"]["message"]
            assert called["stop_reason"] == "tool_use"
            assert called["content"][0]["type"] == "tool_use"
            assert called["content"][0]["name"] == "weather"
            assert called["content"][0]["input"] == {"city": "sim"}

    run(test)


def test_x_sim_forces_errored_expired_and_canceled_results_and_the_knob_expires_all() -> None:
    async def test() -> None:
        requests = [
            request("ok"),
            request("busy", x_sim={"status": 529}),
            request("limited", x_sim={"status": 429, "message": "slow down"}),
            request("bad", x_sim={"status": 400}),
            request("hot", temperature=1.5),
            request("late", x_sim={"batch_result": "expired"}),
            request("gone", x_sim={"batch_result": "canceled"}),
        ]
        async with sim_client() as client:
            batch = (await client.post(BATCHES, json={"requests": requests})).json()
            batch = (await client.get(f"{BATCHES}/{batch['id']}")).json()
            assert batch["request_counts"] == {
                "processing": 0,
                "succeeded": 1,
                "errored": 4,
                "canceled": 1,
                "expired": 1,
            }
            got = await results(client, batch)
            kinds = {key: value["type"] for key, value in got.items()}
            assert kinds == {
                "ok": "succeeded",
                "busy": "errored",
                "limited": "errored",
                "bad": "errored",
                "hot": "errored",
                "late": "expired",
                "gone": "canceled",
            }
            assert got["busy"]["error"]["error"]["type"] == "overloaded_error"
            assert got["limited"]["error"]["error"] == {
                "type": "rate_limit_error",
                "message": "slow down",
            }
            assert got["bad"]["error"]["error"]["type"] == "invalid_request_error"
            assert got["hot"]["error"]["error"]["type"] == "invalid_request_error"

            await client.post("/_sim/config", json={"anthropic_batch_expire": True})
            batch = (await client.post(BATCHES, json={"requests": [request("a")]})).json()
            batch = (await client.get(f"{BATCHES}/{batch['id']}")).json()
            assert batch["request_counts"]["expired"] == 1
            assert (await results(client, batch))["a"] == {"type": "expired"}

    run(test)


def test_list_is_newest_first_and_pages_by_after_id() -> None:
    async def test() -> None:
        async with sim_client(SimConfig(anthropic_batch_delay=60)) as client:
            ids = []
            for i in range(5):
                created = await client.post(BATCHES, json={"requests": [request(f"r{i}")]})
                ids.append(created.json()["id"])
            newest = list(reversed(ids))
            first = (await client.get(BATCHES, params={"limit": 2})).json()
            assert [b["id"] for b in first["data"]] == newest[:2]
            assert (first["has_more"], first["first_id"], first["last_id"]) == (
                True,
                newest[0],
                newest[1],
            )
            rest = (await client.get(BATCHES, params={"limit": 10, "after_id": newest[1]})).json()
            assert [b["id"] for b in rest["data"]] == newest[2:] and rest["has_more"] is False
            back = (await client.get(BATCHES, params={"limit": 1, "before_id": newest[2]})).json()
            assert [b["id"] for b in back["data"]] == [newest[1]] and back["has_more"] is True
            assert (await client.get(BATCHES, params={"limit": 0})).status_code == 400
            default = (await client.get(BATCHES)).json()
            assert len(default["data"]) == 5 and default["has_more"] is False

    run(test)


def test_cancel_ends_the_batch_with_its_requests_canceled() -> None:
    async def test() -> None:
        async with sim_client(SimConfig(anthropic_batch_delay=60)) as client:
            batch = (await client.post(BATCHES, json={"requests": [request("a")]})).json()
            canceling = await client.post(f"{BATCHES}/{batch['id']}/cancel")
            assert canceling.status_code == 200
            assert canceling.json()["processing_status"] == "canceling"
            assert canceling.json()["cancel_initiated_at"] is not None
            ended = (await client.get(f"{BATCHES}/{batch['id']}")).json()
            assert ended["processing_status"] == "ended"
            assert ended["request_counts"]["canceled"] == 1
            assert (await results(client, ended))["a"] == {"type": "canceled"}
            again = await client.post(f"{BATCHES}/{batch['id']}/cancel")
            assert again.status_code == 400
            missing = await client.get(f"{BATCHES}/msgbatch_nope")
            assert missing.status_code == 404
            assert missing.json()["error"]["type"] == "not_found_error"

    run(test)


def test_the_api_key_is_checked_in_x_api_key_when_configured() -> None:
    async def test() -> None:
        async with sim_client(SimConfig(api_key="sk-ant", anthropic_batch_delay=0)) as client:
            body = {"requests": [request("a")]}
            for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Bearer sk-ant"}):
                refused = await client.post(BATCHES, json=body, headers=headers)
                assert refused.status_code == 401
                assert refused.json()["error"]["type"] == "authentication_error"
            ok = await client.post(BATCHES, json=body, headers={"x-api-key": "sk-ant"})
            assert ok.status_code == 200
            listed = await client.get(BATCHES, headers={"x-api-key": "sk-ant"})
            assert listed.status_code == 200 and len(listed.json()["data"]) == 1

    run(test)


def test_the_delay_and_expire_knobs_come_from_the_environment() -> None:
    from chatjobs.simulator import config_from_env

    config = config_from_env(
        {"CHATJOBS_SIM_ANTHROPIC_BATCH_DELAY": "2.5", "CHATJOBS_SIM_ANTHROPIC_BATCH_EXPIRE": "yes"}
    )
    assert (config.anthropic_batch_delay, config.anthropic_batch_expire) == (2.5, True)
    assert SimConfig().anthropic_batch_delay == 1.0
    with pytest.raises(ValueError, match="anthropic_batch_delay"):
        SimConfig(anthropic_batch_delay=-1)


# --- a round trip over real HTTP -------------------------------------------------------------


def test_round_trip_anthropic_batch_against_the_simulator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_ANTH_KEY", "sk-ant-sim")
    upstream = AnthropicBatch()
    jobs = {
        "job-ok": {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ],
            "max_tokens": 50,
        },
        "job-tool": {
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "weather", "parameters": {"type": "object"}},
                }
            ],
            "tool_choice": "required",
        },
        "job-busy": {"messages": [{"role": "user", "content": "x"}], "x_sim": {"status": 529}},
        "job-bad": {"messages": [{"role": "user", "content": "x"}], "x_sim": {"status": 400}},
        "job-late": {
            "messages": [{"role": "user", "content": "x"}],
            "x_sim": {"batch_result": "expired"},
        },
    }
    since = datetime.now(UTC) - timedelta(seconds=1)
    config = SimConfig(api_key="sk-ant-sim", anthropic_batch_delay=0.3)
    with running_server(config) as base, httpx.Client(timeout=10) as client:
        route = Route(
            model="claude",
            base_url=f"{base}/v1",
            api_key_env="SIM_ANTH_KEY",
            limits=Limits(1, 1, 1),
            offload="anthropic-batch",
        )
        encoded = [
            upstream.encode(Item(job_id, {"model": "claude-sonnet-4-5", **body}, 200))
            for job_id, body in jobs.items()
        ]
        # Another row's batch of the same size, made earlier, is never taken for this one.
        other = [
            upstream.encode(
                Item(f"other-{i}", {"model": "c", "messages": [{"role": "user", "content": "o"}]})
            )
            for i in range(len(jobs))
        ]
        taken = upstream.submit(client, route, other, ref="row-other").upstream_batch_id
        time.sleep(0.4)
        since = datetime.now(UTC)
        earlier = EarlierSubmit(
            ref="row",
            since=since,
            items=len(jobs),
            job_ids=frozenset(jobs),
            taken=frozenset({taken}),
        )
        assert upstream.find(client, route, earlier) is None

        submitted = upstream.submit(client, route, encoded, ref="row")
        batch_id = submitted.upstream_batch_id
        # Unfinished and the only candidate since the row's submit: found.
        assert upstream.find(client, route, earlier) == batch_id
        polled = upstream.poll(client, route, batch_id)
        assert (polled.status, polled.ended) == ("in_progress", False)
        deadline = time.monotonic() + 10
        while not polled.ended:
            assert time.monotonic() < deadline
            time.sleep(0.1)
            polled = upstream.poll(client, route, batch_id)
        assert polled.status == "ended" and polled.output_ref
        # Ended: proved by its results.
        assert upstream.find(client, route, earlier) == batch_id
        got = {r.job_id: r for r in upstream.results(client, route, polled)}
        upstream.cancel(client, route, batch_id)  # ended: no error

    assert set(got) == set(jobs)
    ok = got["job-ok"].completion
    assert ok is not None and ok["object"] == "chat.completion"
    assert ok["choices"][0]["finish_reason"] == "stop"
    assert ok["choices"][0]["message"]["content"].startswith("Simulated reply ")
    assert ok["usage"]["total_tokens"] == (
        ok["usage"]["prompt_tokens"] + ok["usage"]["completion_tokens"]
    )
    tool = got["job-tool"].completion
    assert tool is not None and tool["choices"][0]["finish_reason"] == "tool_calls"
    assert tool["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "weather"
    busy, bad = got["job-busy"].error, got["job-bad"].error
    assert busy is not None and busy.status_code == 529 and is_retryable(busy)
    assert bad is not None and bad.status_code == 400 and not is_retryable(bad)
    assert got["job-late"].unfinished
