"""Fault injection around the outcome of a paid call: it is written first, and exactly once.

The worker's attempt code (worker.execute) runs in-process against real Postgres; the
upstream call and the Redis-backed limiter are replaced by stand-ins that answer or fail on
cue, which is the point: the faults land exactly between the answer and the write.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from chatjobs import jobs
from chatjobs.db import session_scope
from chatjobs.models import Job, JobStatus, UpstreamCall
from chatjobs.routing import route_for
from chatjobs.upstream import Completion
from tests.integration.test_state_machine import claim, submit
from worker import execute

pytestmark = pytest.mark.integration

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


class BrokenLimiter:
    """A limiter whose Redis went away after the call was granted."""

    def __getattr__(self, name: str) -> Any:
        def fail(*_: Any, **__: Any) -> None:
            raise redis.ConnectionError("Redis went away")

        return fail


class Answering:
    """A runtime whose upstream answers at once."""

    worker_id = "test:fault"
    limiter = BrokenLimiter()

    def __init__(self, usage: Any = USAGE) -> None:
        self.usage = usage
        self.calls = 0

    def call(self, claim: jobs.Claim, route: Any) -> Completion:
        self.calls += 1
        body = {
            "choices": [{"message": {"role": "assistant", "content": "hi"}}],
            "usage": self.usage,
        }
        return Completion(
            body=body,
            usage=self.usage,
            status_code=200,
            request_id="req-1",
            latency_ms=3,
            ratelimit={"x-ratelimit-remaining-requests": "5"},
        )


def state(job_id: uuid.UUID) -> tuple[JobStatus, int, int]:
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        calls = session.scalar(select(func.count()).where(UpstreamCall.job_id == job_id)) or 0
        return job.status, job.total_tokens, calls


def test_redis_down_after_the_answer_still_records_the_job_once(tenant: uuid.UUID) -> None:
    job_id = submit(tenant)
    c = claim(job_id)
    assert c is not None
    runtime = Answering()
    outcome = execute._call(runtime, c, route_for(c.model), reserved=500)  # type: ignore[arg-type]
    assert outcome == "succeeded"
    assert state(job_id) == (JobStatus.succeeded, 10, 1)
    assert runtime.calls == 1


def test_a_malformed_usage_is_recorded_not_raised(tenant: uuid.UUID) -> None:
    job_id = submit(tenant)
    c = claim(job_id)
    assert c is not None
    usage = {"prompt_tokens": "many", "completion_tokens": -4, "total_tokens": float("nan")}
    outcome = execute._call(Answering(usage), c, route_for(c.model), reserved=500)  # type: ignore[arg-type]
    assert outcome == "succeeded"
    assert state(job_id) == (JobStatus.succeeded, 0, 1)


def test_an_ambiguous_commit_retried_counts_usage_once(
    tenant: uuid.UUID,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = submit(tenant)
    c = claim(job_id)
    assert c is not None
    failures = iter([True])

    @contextmanager
    def commit_then_lose_the_answer() -> Iterator[Session]:
        with session_scope() as session:
            yield session
        # The commit went through, but the client never heard back.
        if next(failures, False):
            raise OperationalError("COMMIT", {}, ConnectionError("server closed the connection"))

    monkeypatch.setattr(execute, "session_scope", commit_then_lose_the_answer)
    outcome = execute._call(Answering(), c, route_for(c.model))  # type: ignore[arg-type]
    assert outcome.startswith("recorded already")
    assert state(job_id) == (JobStatus.succeeded, 10, 1)


def test_an_unexpected_error_before_the_call_fails_the_attempt_not_the_lease(
    tenant: uuid.UUID,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = submit(tenant, max_attempts=1)

    def explode(*_: Any, **__: Any) -> str:
        raise RuntimeError("a bug")

    class Runtime:
        worker_id = "test:fault"

    monkeypatch.setattr(execute, "get_runtime", lambda: Runtime())
    monkeypatch.setattr(execute, "_run_claimed", explode)
    assert execute.run_job(job_id) == "failed"
    with session_scope() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
    assert job.status == JobStatus.failed and job.lease_expires_at is None
    assert job.error == {
        "type": "internal_error",
        "message": "chatjobs could not run this attempt: RuntimeError",
    }
