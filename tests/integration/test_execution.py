"""Jobs run end to end: api -> Postgres -> Redis -> a real Celery worker -> the simulator."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import redis

from chatjobs.queue import RUN_JOB, make_celery
from chatjobs.settings import Settings
from chatjobs.testing import Proc, wait_job
from tests.conftest import REDIS, MiniStack

pytestmark = pytest.mark.integration

# The five examples of the seed (GPT-4.1 on Workers AI), as chat-completion bodies.
SEED_EXAMPLES: dict[str, dict[str, Any]] = {
    "basic": {
        "messages": [{"role": "user", "content": "What are the three laws of thermodynamics?"}]
    },
    "system_message": {
        "messages": [
            {
                "role": "system",
                "content": "You are a helpful coding assistant specializing in Python.",
            },
            {"role": "user", "content": "How do I read a JSON file in Python?"},
        ],
        "temperature": 0.3,
    },
    "multi_turn": {
        "messages": [
            {
                "role": "user",
                "content": "I need help planning a road trip from San Francisco to Los Angeles.",
            },
            {
                "role": "assistant",
                "content": "I'd be happy to help! The drive is about 380 miles and takes roughly "
                "5-6 hours. Would you like suggestions for scenic routes or interesting "
                "stops along the way?",
            },
            {"role": "user", "content": "Yes, what are some good places to stop?"},
        ],
        "max_tokens": 500,
    },
    "creative": {
        "messages": [
            {
                "role": "user",
                "content": "Write a short story opening about a detective finding an unusual clue.",
            }
        ],
        "temperature": 0.8,
        "max_tokens": 300,
    },
    "streaming": {
        "messages": [
            {"role": "user", "content": "Explain the concept of recursion with a simple example."}
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}


def calls_for(sim: httpx.Client, marker: str) -> list[dict[str, Any]]:
    """The simulator's log of calls whose body carries this test's marker."""
    calls = sim.get("/_sim/calls", params={"limit": 100000, "x_test": marker}).json()
    return [c for c in calls if c["body"].get("x_test") == marker]


def direct_answer(sim: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """What the simulator answers for this body when called without chatjobs."""
    plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    return sim.post("/v1/chat/completions", json={"model": "gpt-4.1", **plain}).json()


@pytest.mark.parametrize("name", list(SEED_EXAMPLES))
def test_seed_example_succeeds_with_the_simulators_content_and_usage(
    client: httpx.Client, sim: httpx.Client, worker: Proc, name: str
) -> None:
    marker = uuid.uuid4().hex
    request = {**SEED_EXAMPLES[name], "x_test": marker}
    job = client.post("/v1/jobs", json={"request": request}).json()
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    expected = direct_answer(sim, request)
    result = done["result"]
    assert result["object"] == "chat.completion"
    assert (
        result["choices"][0]["message"]["content"] == (expected["choices"][0]["message"]["content"])
    )
    assert result["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]
    assert result["usage"] == expected["usage"]
    assert done["usage"] == expected["usage"]
    assert done["attempts"] == 1
    assert done["started_at"] and done["completed_at"]
    calls = calls_for(sim, marker)
    # One call through chatjobs, one direct call made above for comparison.
    assert [c["status"] for c in calls] == [200, 200]
    sent = calls[0]["body"]
    assert sent["model"] == "gpt-4.1"
    assert sent["messages"] == request["messages"]
    if request.get("stream"):
        assert sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}


def test_streamed_request_ends_with_the_same_shape_and_usage_as_unstreamed(
    client: httpx.Client, sim: httpx.Client, worker: Proc
) -> None:
    messages = [{"role": "user", "content": "Stream me a haiku about queues."}]
    streamed = client.post(
        "/v1/jobs", json={"request": {"messages": messages, "stream": True}}
    ).json()
    plain = client.post("/v1/jobs", json={"request": {"messages": messages}}).json()
    a, b = wait_job(client, streamed["id"]), wait_job(client, plain["id"])
    assert a["status"] == b["status"] == "succeeded"
    assert a["result"]["choices"][0]["message"] == b["result"]["choices"][0]["message"]
    assert a["result"]["usage"] == b["result"]["usage"]
    assert a["usage"] == b["usage"]
    assert set(a["result"]) >= {"id", "object", "created", "model", "choices", "usage"}


def test_unknown_top_level_key_is_forwarded_to_the_upstream(
    client: httpx.Client, sim: httpx.Client, worker: Proc
) -> None:
    marker = uuid.uuid4().hex
    request = {
        "messages": [{"role": "user", "content": "hi"}],
        "x_test": marker,
        "vendor_flag": {"nested": [1, 2]},
        "max_tokens": 40,
    }
    job = client.post("/v1/jobs", json={"request": request}).json()
    assert wait_job(client, job["id"])["status"] == "succeeded"
    (call,) = calls_for(sim, marker)
    assert call["body"]["vendor_flag"] == {"nested": [1, 2]}
    assert call["body"]["max_tokens"] == 40
    assert isinstance(call["body"]["max_tokens"], int)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_permanent_upstream_error_fails_at_once_with_its_message(
    client: httpx.Client, sim: httpx.Client, worker: Proc, status: int
) -> None:
    marker = uuid.uuid4().hex
    request = {
        "messages": [{"role": "user", "content": "x"}],
        "x_test": marker,
        "x_sim": {"status": status},
    }
    job = client.post("/v1/jobs", json={"request": request}).json()
    done = wait_job(client, job["id"])
    assert done["status"] == "failed"
    assert done["error"]["status_code"] == status
    assert done["error"]["type"] == "upstream_status_error"
    assert str(status) in done["error"]["message"]
    assert done["attempts"] == 1
    assert len(calls_for(sim, marker)) == 1


def test_transient_error_is_retried_and_then_succeeds(
    client: httpx.Client, sim: httpx.Client, worker: Proc
) -> None:
    marker = uuid.uuid4().hex
    request = {
        "messages": [{"role": "user", "content": "x"}],
        "x_test": marker,
        "x_sim": {"fail_times": 2, "status": 503, "key": marker},
    }
    job = client.post("/v1/jobs", json={"request": request}).json()
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 3
    assert [c["status"] for c in calls_for(sim, marker)] == [503, 503, 200]


def test_a_second_message_for_a_finished_job_changes_nothing(
    client: httpx.Client, sim: httpx.Client, worker: Proc
) -> None:
    from chatjobs.queue import enqueue_jobs

    marker = uuid.uuid4().hex
    request = {"messages": [{"role": "user", "content": "once"}], "x_test": marker}
    job = client.post("/v1/jobs", json={"request": request}).json()
    done = wait_job(client, job["id"])
    assert done["status"] == "succeeded"
    enqueue_jobs([uuid.UUID(job["id"])])
    wait_for_log(worker, f"job {job['id']}: nothing to claim")
    assert client.get(f"/v1/jobs/{job['id']}").json() == done
    assert len(calls_for(sim, marker)) == 1


def wait_for_log(proc: Proc, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in proc.log_path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{proc.name} never logged {text!r}:\n{proc.log_tail()}")


# --- cancelling before a worker sees the job -------------------------------------------


def test_cancelled_queued_job_never_reaches_the_upstream(
    make_stack: Callable[..., MiniStack], api_key: str, sim: httpx.Client
) -> None:
    # An api, and no dispatcher yet: the job waits in Postgres.
    stack = make_stack(workers=[], beat=False)
    marker = uuid.uuid4().hex
    with stack.client(api_key) as client:
        request = {"messages": [{"role": "user", "content": "never"}], "x_test": marker}
        job = client.post("/v1/jobs", json={"request": request}).json()
        assert job["status"] == "queued"
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["completed_at"]
        again = client.post(f"/v1/jobs/{job['id']}/cancel")
        assert again.status_code == 409

        # Never admitted: no message. A stale one (as from an admission just before the
        # cancel) reaches a worker, which must claim nothing.
        broker = redis.Redis.from_url(REDIS)
        assert broker.llen(stack.queue) == 0
        producer = make_celery(Settings(redis_url=REDIS, queue_name=stack.queue))
        producer.send_task(RUN_JOB, args=[job["id"]], queue=stack.queue)
        assert broker.llen(stack.queue) == 1
        late = stack.start_worker("--pool", "solo", name="late-worker")
        wait_for_log(late, f"job {job['id']}: nothing to claim", timeout=30)
        assert broker.llen(stack.queue) == 0
        assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert calls_for(sim, marker) == []
