"""A deep, healthy backlog is never republished: at most one broker message per job, and a
message that really was lost is republished.

A real api, beat (dispatch and reconcile every fraction of a second, a 3 s stale interval)
and a slow worker; the broker's Redis is read directly to count the messages of each job.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.conftest import MiniStack
from tests.integration.test_reliability import job_body, sql

pytestmark = pytest.mark.integration


def messages_per_job(client: redis.Redis, queue: str) -> Counter[str]:
    """Job ids of every run_job message the broker holds: waiting, or handed out unacked."""
    held: Counter[str] = Counter()
    # One atomic snapshot: read apart, a message moving from the list to the unacked hash
    # between the two reads would be counted twice.
    pipe = client.pipeline(transaction=True)
    pipe.lrange(queue, 0, -1)
    pipe.hvals("unacked")
    waiting, handed_out = pipe.execute()
    raw = [json.loads(m) for m in waiting] + [json.loads(v)[0] for v in handed_out]
    for message in raw:
        headers = message.get("headers") or {}
        if headers.get("task") == "chatjobs.run_job":
            held[headers["argsrepr"].strip("[]()'\", ")] += 1
    return held


def test_a_backlog_waiting_longer_than_the_stale_interval_gets_no_duplicates(
    make_stack: Callable[..., MiniStack], api_key: str
) -> None:
    stack = make_stack(workers=[["--concurrency", "2"]])
    broker = redis.Redis.from_url(stack.env["CHATJOBS_REDIS_URL"])
    marker = uuid.uuid4().hex

    def post(i: int) -> str:
        with stack.client(api_key) as client:
            body = job_body(f"{marker}-{i}", x_sim={"latency": 2.0})
            return str(client.post("/v1/jobs", json=body).json()["id"])

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(post, range(500)))
    # One message really lost (as a flush or a failed publish would): the newest in the list,
    # the last a worker would reach. The reconciler must find it, and only it.
    newest = broker.lindex(stack.queue, 0)
    assert newest is not None
    lost = json.loads(newest)["headers"]["argsrepr"].strip("[]()'\", ")
    assert broker.lrem(stack.queue, 1, newest) == 1
    broker.zrem(f"chatjobs:published:{stack.queue}", lost)
    # Three stale intervals with the backlog waiting (2 slots x 2 s: ~1 job/s drain).
    worst = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        held = messages_per_job(broker, stack.queue)
        worst = max(worst, max(held.values(), default=0))
        time.sleep(1)
    held = messages_per_job(broker, stack.queue)
    queued = [
        str(r[0])
        for r in sql(
            "SELECT id FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'queued'",
            ids=ids,
        )
    ]
    assert len(queued) > 300, "the backlog drained: the test did not test anything"
    assert worst == 1
    assert all(held[job_id] == 1 for job_id in queued), "a waiting job lost its message"
    assert lost in queued and held[lost] == 1, "the lost message was not republished"
    sql(
        "UPDATE jobs SET status = 'cancelled', completed_at = now() "
        "WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('queued', 'retrying') RETURNING id",
        ids=ids,
    )
    with httpx.Client(base_url=stack.url) as client:
        assert client.get("/healthz").status_code == 200
