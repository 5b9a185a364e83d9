"""Reliable execution: retries, leases, crashes, lost messages and outages.

Real Postgres, Redis, Celery worker processes and the simulator over HTTP. Timeouts are
shortened (tests.conftest.FAST_RECOVERY) so every test is bounded in seconds.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import text

from chatjobs.devservices import Server
from chatjobs.testing import Proc, wait_job
from tests.conftest import MiniStack
from tests.integration.test_execution import calls_for, wait_for_log

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]


def sql(query: str, **params: Any) -> list[Any]:
    from chatjobs.db import session_scope

    with session_scope() as session:
        return list(session.execute(text(query), params).all())


def job_body(marker: str, *, x_sim: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "messages": [{"role": "user", "content": f"job {marker}"}],
        "x_test": marker,
    }
    if x_sim is not None:
        request["x_sim"] = x_sim
    return {"request": request, **extra}


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll until predicate holds; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def statuses(ids: list[str]) -> dict[str, int]:
    rows = sql(
        "SELECT status, count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) GROUP BY status",
        ids=ids,
    )
    return {str(r[0]): int(r[1]) for r in rows}


def successful_calls(ids: list[str]) -> dict[str, int]:
    rows = sql(
        "SELECT job_id::text, count(*) FROM upstream_calls WHERE status_code = 200 "
        "AND job_id = ANY(CAST(:ids AS uuid[])) GROUP BY job_id",
        ids=ids,
    )
    return {r[0]: int(r[1]) for r in rows}


# --- one retry decision --------------------------------------------------------------------


def recovered(stack: MiniStack, reason: str) -> float:
    from tests.integration.test_metrics import scrape, value

    with httpx.Client(base_url=stack.url, timeout=10) as client:
        _, samples = scrape(client)
    return value(samples, "chatjobs_recovered_total", reason=reason)


def test_429_with_retry_after_delays_the_next_call(
    client: httpx.Client, sim: httpx.Client, worker: Proc
) -> None:
    marker = uuid.uuid4().hex
    body = job_body(marker, x_sim={"fail_times": 1, "status": 429, "retry_after": 2, "key": marker})
    job = client.post("/v1/jobs", json=body).json()
    done = wait_job(client, job["id"], timeout=20)
    assert done["status"] == "succeeded"
    calls = calls_for(sim, marker)
    assert [c["status"] for c in calls] == [429, 200]
    assert calls[1]["t"] - calls[0]["t"] >= 2.0


@pytest.mark.parametrize("status", [500, 502, 503, 504, 529])
def test_server_errors_are_retried_up_to_max_attempts(
    client: httpx.Client, sim: httpx.Client, worker: Proc, status: int
) -> None:
    marker = uuid.uuid4().hex
    job = client.post(
        "/v1/jobs", json=job_body(marker, x_sim={"status": status}, max_attempts=3)
    ).json()
    done = wait_job(client, job["id"], timeout=20)
    assert done["status"] == "failed"
    assert done["attempts"] == 3
    assert done["error"]["status_code"] == status
    assert [c["status"] for c in calls_for(sim, marker)] == [status] * 3


def test_read_timeouts_are_retried_up_to_max_attempts(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    # A read timeout of 2 s; the simulator hangs far longer.
    stack = make_stack(env={"CHATJOBS_UPSTREAM_READ_TIMEOUT": "2"})
    marker = uuid.uuid4().hex
    with stack.client(api_key) as client:
        body = job_body(marker, x_sim={"hang": 60}, max_attempts=2)
        job = client.post("/v1/jobs", json=body).json()
        done = wait_job(client, job["id"], timeout=30)
    assert done["status"] == "failed"
    assert done["attempts"] == 2
    assert done["error"]["type"] == "upstream_timeout"
    rows = sql("SELECT count(*) FROM upstream_calls WHERE job_id = :id", id=job["id"])
    assert rows[0][0] == 2


@pytest.mark.parametrize(
    "x_sim",
    [
        {"status": 400},
        {"status": 401},
        {"status": 404},
        {"status": 422},
        {"status": 429, "code": "insufficient_quota"},
    ],
    ids=["400", "401", "404", "422", "429-insufficient_quota"],
)
def test_permanent_errors_make_exactly_one_call(
    client: httpx.Client, sim: httpx.Client, worker: Proc, x_sim: dict[str, Any]
) -> None:
    marker = uuid.uuid4().hex
    job = client.post("/v1/jobs", json=job_body(marker, x_sim=x_sim)).json()
    done = wait_job(client, job["id"])
    assert done["status"] == "failed"
    assert done["attempts"] == 1
    time.sleep(0.5)  # room for a wrong retry to show up
    assert len(calls_for(sim, marker)) == 1


def test_malformed_body_is_retried_with_a_message_saying_what_was_wrong(
    client: httpx.Client, sim: httpx.Client, worker: Proc
) -> None:
    marker = uuid.uuid4().hex
    job = client.post(
        "/v1/jobs", json=job_body(marker, x_sim={"malformed": True}, max_attempts=2)
    ).json()
    done = wait_job(client, job["id"], timeout=20)
    assert done["status"] == "failed"
    assert done["attempts"] == 2
    assert done["error"]["type"] == "upstream_malformed_response"
    assert "not JSON" in done["error"]["message"]
    assert len(calls_for(sim, marker)) == 2


# --- duplicates and fencing ----------------------------------------------------------------


def test_the_same_job_delivered_twice_at_once_is_run_once(
    client: httpx.Client, sim: httpx.Client, worker: Proc
) -> None:
    from chatjobs.queue import enqueue_jobs

    marker = uuid.uuid4().hex
    job = client.post("/v1/jobs", json=job_body(marker, x_sim={"latency": 0.5})).json()
    enqueue_jobs([uuid.UUID(job["id"])] * 3)
    order = ["queued", "running", "succeeded"]
    seen: list[str] = []
    while not seen or seen[-1] != "succeeded":
        status = client.get(f"/v1/jobs/{job['id']}").json()["status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.02)
    assert seen == sorted(seen, key=order.index), f"status moved backwards: {seen}"
    time.sleep(0.5)
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert len(calls_for(sim, marker)) == 1
    assert successful_calls([job["id"]]) == {job["id"]: 1}


def test_an_expired_lease_reruns_the_job_and_refuses_the_first_workers_late_write(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    # The heartbeat is off, so the first attempt's lease (3 s) runs out while its 6-second
    # call is still going; the reconciler hands the job to a second attempt.
    stack = make_stack(env={"CHATJOBS_HEARTBEAT_SECONDS": "1000"})
    marker = uuid.uuid4().hex
    with stack.client(api_key) as client:
        job = client.post(
            "/v1/jobs", json=job_body(marker, x_sim={"latency": 6, "slow_times": 1, "key": marker})
        ).json()
        done = wait_job(client, job["id"], timeout=20)
        assert done["status"] == "succeeded"
        assert done["attempts"] == 2
        wait_for_log(stack.procs[-1], f"job {job['id']} attempt 1: result refused", timeout=15)
        after = client.get(f"/v1/jobs/{job['id']}").json()
    for key in ("status", "result", "attempts", "completed_at", "error"):
        assert after[key] == done[key], key
    # Both calls were made and paid for: usage counts them both.
    assert after["usage"]["total_tokens"] == 2 * done["result"]["usage"]["total_tokens"]
    calls = sql(
        "SELECT attempt, status_code FROM upstream_calls WHERE job_id = :id ORDER BY attempt",
        id=job["id"],
    )
    assert [tuple(c) for c in calls] == [(1, 200), (2, 200)]


def test_cancelling_a_running_job_abandons_its_call_and_writes_no_result(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    stack = make_stack(env={"CHATJOBS_HEARTBEAT_SECONDS": "0.5"})
    marker = uuid.uuid4().hex
    with stack.client(api_key) as client:
        job = client.post("/v1/jobs", json=job_body(marker, x_sim={"latency": 30})).json()
        wait_job(client, job["id"], until={"running"})
        cancelled = client.post(f"/v1/jobs/{job['id']}/cancel").json()
        assert cancelled["status"] == "cancelled"
        wait_for_log(stack.procs[-1], f"job {job['id']} attempt 1: lease lost, abandoning")
        wait_until(
            lambda: [c["status"] for c in calls_for(sim, marker)] == [499],
            10,
            "the simulator saw the call's connection closed",
        )
        final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled"
    assert final["result"] is None


def test_a_running_job_past_its_deadline_ends_expired_and_its_call_is_abandoned(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    stack = make_stack(env={"CHATJOBS_HEARTBEAT_SECONDS": "0.5"})
    marker = uuid.uuid4().hex
    # Far enough ahead that a loaded machine's slow first request still lands before it.
    deadline = (datetime.now(UTC) + timedelta(seconds=5)).isoformat()
    with stack.client(api_key) as client:
        response = client.post(
            "/v1/jobs", json=job_body(marker, x_sim={"latency": 30}, deadline=deadline)
        )
        assert response.status_code == 202, response.text
        done = wait_job(client, response.json()["id"], timeout=20)
        assert done["status"] == "expired"
        assert done["error"]["type"] == "deadline_exceeded"
        wait_until(
            lambda: [c["status"] for c in calls_for(sim, marker)] == [499],
            10,
            "the call was abandoned",
        )


def test_a_deadline_in_the_past_is_refused_at_submit(client: httpx.Client) -> None:
    response = client.post("/v1/jobs", json=job_body("x", deadline="2000-01-01T00:00:00Z"))
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "deadline"


# --- crashes -------------------------------------------------------------------------------


def submit_many(
    client: httpx.Client, n: int, x_sim: dict[str, Any] | None, marker: str
) -> list[str]:
    ids = []
    for i in range(n):
        key = f"{marker}-{i}"
        sim_opts = {**x_sim, "key": key} if x_sim else None
        body = job_body(key, x_sim=sim_opts)
        ids.append(client.post("/v1/jobs", json=body).json()["id"])
    return ids


def test_sigkill_of_the_whole_worker_mid_call_loses_no_job(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    stack = make_stack(workers=[["--concurrency", "64"]])
    with stack.client(api_key) as client:
        ids = submit_many(client, 50, {"latency": 5, "slow_times": 1}, uuid.uuid4().hex)
        wait_until(lambda: statuses(ids).get("running") == 50, 20, "50 jobs mid-call")
        stack.procs[-1].stop(signal.SIGKILL)
        killed_at = time.monotonic()
        stack.start_worker("--concurrency", "64", name="replacement")
        wait_until(lambda: statuses(ids).get("succeeded") == 50, 30, "all 50 succeeded")
        recovery = time.monotonic() - killed_at
    assert successful_calls(ids) == dict.fromkeys(ids, 1)
    rows = sql(
        "SELECT min(attempts), max(attempts) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=ids,
    )
    assert tuple(rows[0]) == (2, 2)
    print(f"recovery after killing the worker: {recovery:.1f}s")
    wait_until(lambda: recovered(stack, "lost_lease") == 50, 10, "/metrics counted 50 leases")


def test_sigkill_of_one_pool_process_mid_call_loses_no_job(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    stack = make_stack(workers=[["--pool", "prefork", "--concurrency", "4"]])
    with stack.client(api_key) as client:
        ids = submit_many(client, 50, {"latency": 2, "slow_times": 1}, uuid.uuid4().hex)

        def running_pids() -> list[int]:
            rows = sql(
                "SELECT claimed_by FROM jobs WHERE status = 'running' "
                "AND id = ANY(CAST(:ids AS uuid[]))",
                ids=ids,
            )
            return [int(r[0].rsplit(":", 1)[1]) for r in rows]

        wait_until(lambda: len(running_pids()) >= 2, 20, "pool processes mid-call")
        victim = running_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: statuses(ids).get("succeeded") == 50, 60, "all 50 succeeded")
    assert successful_calls(ids) == dict.fromkeys(ids, 1)


def test_a_job_that_kills_its_worker_every_time_fails_after_max_attempts(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    """The poison job's pool process is killed on every attempt (as a crash in native code
    would); the worker replaces the process and keeps serving the other jobs."""
    stack = make_stack(workers=[["--pool", "prefork", "--concurrency", "2"]])
    stop = threading.Event()
    with stack.client(api_key) as client:
        poison = client.post(
            "/v1/jobs", json=job_body(uuid.uuid4().hex, x_sim={"latency": 30}, max_attempts=3)
        ).json()["id"]

        def killer() -> None:
            killed: set[int] = set()
            while not stop.is_set():
                try:
                    rows = sql(
                        "SELECT attempts, claimed_by FROM jobs "
                        "WHERE id = :id AND status = 'running'",
                        id=poison,
                    )
                    if rows and rows[0][0] not in killed:
                        killed.add(rows[0][0])
                        os.kill(int(rows[0][1].rsplit(":", 1)[1]), signal.SIGKILL)
                        print(f"killed attempt {rows[0][0]} in {rows[0][1]}")
                except Exception as exc:  # keep going: a missed attempt would hang the test
                    print(f"killer: {exc!r}")
                time.sleep(0.1)

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        try:
            others = submit_many(client, 10, None, uuid.uuid4().hex)
            done = wait_job(client, poison, timeout=60)
            wait_until(lambda: statuses(others).get("succeeded") == 10, 30, "others succeed")
        finally:
            stop.set()
            thread.join()
    assert done["status"] == "failed"
    assert done["attempts"] == 3
    assert done["error"]["type"] == "worker_lost"
    assert "no attempts left" in done["error"]["message"]


# --- lost messages -------------------------------------------------------------------------


def test_flushing_redis_with_100_jobs_queued_loses_none(
    make_stack: Make, api_key: str, sim: httpx.Client, private_redis: Server
) -> None:
    """FLUSHALL on the suite's own Redis, never on a server the suite did not start."""
    stack = make_stack(workers=[])
    broker = redis.Redis.from_url(private_redis.url)
    with stack.client(api_key) as client:
        ids = submit_many(client, 100, None, uuid.uuid4().hex)
        # Beat's dispatcher admits a window of them (no worker registered: the minimum);
        # the rest wait in Postgres.
        wait_until(lambda: broker.llen(stack.queue) > 0, 10, "some jobs admitted")
        broker.flushall()
        flushed_at = time.monotonic()
        stack.start_worker("--concurrency", "32")
        wait_until(lambda: statuses(ids).get("succeeded") == 100, 30, "all 100 succeeded")
        recovery = time.monotonic() - flushed_at
    assert successful_calls(ids) == dict.fromkeys(ids, 1)
    print(f"recovery after flushing Redis: {recovery:.1f}s")
    # The flush took the counts with it; the republished messages were counted after.
    wait_until(lambda: recovered(stack, "lost_message") >= 1, 10, "/metrics counted them")


def test_a_submission_while_the_apis_redis_is_down_still_runs_the_job(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    # The api's broker is unreachable; beat and the worker use the real one.
    stack = make_stack(workers=[])
    dead_port = "redis://127.0.0.1:1/0"
    api_env = {**stack.env, "CHATJOBS_REDIS_URL": dead_port}
    from chatjobs.testing import free_port, python_cli, wait_http

    port = free_port()
    api = Proc(
        "broken-api",
        python_cli("api", "--host", "127.0.0.1", "--port", str(port)),
        api_env,
        stack.run_dir / f"{stack.queue}-broken-api.log",
    ).start()
    stack.procs.append(api)
    wait_http(f"http://127.0.0.1:{port}/healthz", proc=api)
    stack.start_worker()
    with httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=30,
    ) as client:
        response = client.post("/v1/jobs", json=job_body(uuid.uuid4().hex))
        # Stored; the API's poke was lost, and a dispatcher's tick admits it anyway.
        assert response.status_code == 202
        done = wait_job(client, response.json()["id"], timeout=30)
    assert done["status"] == "succeeded"


# --- Postgres restart (runs last) ----------------------------------------------------------


@pytest.mark.disruptive
def test_postgres_restart_while_jobs_run(
    make_stack: Make, api_key: str, sim: httpx.Client, private_postgres: Server
) -> None:
    from chatjobs.db import reset_engine

    stack = make_stack(workers=[["--concurrency", "32"]])
    with stack.client(api_key) as client:
        ids = submit_many(client, 20, {"latency": 3, "slow_times": 1}, uuid.uuid4().hex)
        wait_until(lambda: statuses(ids).get("running") == 20, 20, "20 jobs mid-call")
        private_postgres.stop()
        stopped_at = time.monotonic()
        try:
            ready = httpx.get(f"{stack.url}/readyz", timeout=10)
            assert ready.status_code == 503
            assert ready.json()["checks"]["postgres"].startswith("unreachable")
            assert client.get(f"/v1/jobs/{ids[0]}").status_code == 503
            time.sleep(2)
        finally:
            private_postgres.start()
        reset_engine()
        wait_until(
            lambda: httpx.get(f"{stack.url}/readyz").status_code == 200,
            20,
            "the api ready again without a restart",
        )
        wait_until(lambda: statuses(ids).get("succeeded") == 20, 40, "all 20 succeeded")
        recovery = time.monotonic() - stopped_at
        assert client.get(f"/v1/jobs/{ids[0]}").status_code == 200
    assert successful_calls(ids) == dict.fromkeys(ids, 1) or all(
        v >= 1 for v in successful_calls(ids).values()
    )
    assert statuses(ids) == {"succeeded": 20}
    print(f"recovery after a Postgres outage: {recovery:.1f}s")
