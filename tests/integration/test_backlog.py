"""A deep, healthy backlog waits in Postgres, not in the broker: the broker holds at most the
dispatch window, never more than one message per job, and a message that really was lost is
published again.

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
from tests.integration.test_reliability import job_body, sql, wait_until

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


# A job that waited in the broker longer than dispatch._LOST_AFTER (10 s; here a 16-deep
# window drains at ~1 job/s) is taken by a worker, which marks its record taken
# (``consumed``) before its claim commits; a dispatcher pass in between (woken by the very
# job end that freed the slot) must not take it for lost and publish it again.
@pytest.mark.timeout(300)
def test_a_backlog_waiting_longer_than_the_stale_interval_gets_no_duplicates(
    make_stack: Callable[..., MiniStack], api_key: str
) -> None:
    window = 16
    stack = make_stack(
        workers=[["--concurrency", "2"]],
        # No per-tenant submission rate: 500 posts from 8 threads outrun its default 200/s.
        env={"CHATJOBS_DISPATCH_WINDOW": str(window), "CHATJOBS_TENANT_SUBMIT_RPS": "0"},
    )
    broker = redis.Redis.from_url(stack.env["CHATJOBS_REDIS_URL"])
    marker = uuid.uuid4().hex

    def post(i: int) -> str:
        body = job_body(f"{marker}-{i}", x_sim={"latency": 2.0})
        return str(client.post("/v1/jobs", json=body).json()["id"])

    with stack.client(api_key) as client, ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(post, range(500)))
    # One message really lost (as a flush or a failed publish would): the newest in the list,
    # the last a worker would reach. The dispatcher or the reconciler must find it, only it.
    wait_until(lambda: broker.llen(stack.queue) > 0, 30, "messages in the broker")
    newest = broker.lindex(stack.queue, 0)
    assert isinstance(newest, bytes)
    lost = json.loads(newest)["headers"]["argsrepr"].strip("[]()'\", ")
    assert broker.lrem(stack.queue, 1, newest.decode()) == 1
    broker.zrem(f"chatjobs:published:{stack.queue}", lost)

    # Three stale intervals with the backlog waiting (2 slots x 2 s: ~1 job/s drain), and
    # until the lost job has a message again.
    worst, deepest = 0, 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline or messages_per_job(broker, stack.queue)[lost] == 0:
        assert time.monotonic() < deadline + 30, "the lost message was not published again"
        held = messages_per_job(broker, stack.queue)
        worst = max(worst, max(held.values(), default=0))
        deepest = max(deepest, broker.llen(stack.queue))
        time.sleep(0.5)
    held = messages_per_job(broker, stack.queue)
    rows = sql(
        "SELECT id, next_attempt_at IS NULL FROM jobs "
        "WHERE id = ANY(CAST(:ids AS uuid[])) AND status = 'queued'",
        ids=ids,
    )
    admitted = [str(r[0]) for r in rows if r[1]]
    waiting = [str(r[0]) for r in rows if not r[1]]
    assert len(rows) > 300, "the backlog drained: the test did not test anything"
    assert worst == 1
    assert deepest <= window, "the broker held more than the dispatch window"
    assert all(held[job_id] == 1 for job_id in admitted), "an admitted job lost its message"
    assert all(held[job_id] == 0 for job_id in waiting), "a job not admitted has a message"
    assert held[lost] == 1
    sql(
        "UPDATE jobs SET status = 'cancelled', completed_at = now() "
        "WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('queued', 'retrying') RETURNING id",
        ids=ids,
    )
    with httpx.Client(base_url=stack.url) as client:
        assert client.get("/healthz").status_code == 200
