"""A job routed through an AI Gateway, in-process against real Postgres and Redis: the worker's
attempt code (worker.execute._call) with the real adapter and client, the gateway answered by
httpx.MockTransport. A cache HIT refunds the token reservation in the shared limiter and is
reported apart in the usage; a MISS is charged as before."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select

from api.routes.usage import UsageRead
from chatjobs import jobs, usage
from chatjobs.db import session_scope
from chatjobs.limiter import RateLimiter
from chatjobs.models import Job, JobStatus, UpstreamCall
from chatjobs.routing import Route, model_entries, route_for
from chatjobs.schemas import JobCreate
from chatjobs.settings import get_settings
from chatjobs.upstream import Completion, chat_completion
from tests.integration.test_state_machine import claim, submit
from worker import execute
from worker.runtime import call_context

pytestmark = pytest.mark.integration

ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1764500000,
    "model": "gpt-4.1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
}
RESERVED = 1000


class Gateway:
    """A runtime whose calls go through the real adapter to a gateway stand-in."""

    worker_id = "test:providers"

    def __init__(self, limiter: RateLimiter, cache_status: str) -> None:
        self.limiter = limiter
        self.cache_status = cache_status
        self.sent: list[httpx.Request] = []

    def call(self, claim: jobs.Claim, route: Route) -> Completion:
        def answer(request: httpx.Request) -> httpx.Response:
            self.sent.append(request)
            return httpx.Response(
                200, json=ANSWER, headers={"cf-aig-cache-status": self.cache_status}
            )

        async def run() -> Completion:
            async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
                return await chat_completion(
                    claim.request,
                    model=claim.model,
                    client=client,
                    api_key="cf-token",
                    route=route,
                    context=call_context(claim),
                )

        return asyncio.run(run())


@pytest.fixture
def gateway_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    models = tmp_path / "models.toml"
    models.write_text(
        '[models."*"]\nprovider = "ai-gateway"\naccount_id = "acc-test"\n'
        f'gateway_id = "gw-{uuid.uuid4().hex[:8]}"\ntpm = 60000\n'
    )
    monkeypatch.setenv("CHATJOBS_MODELS_FILE", str(models))
    get_settings.cache_clear()
    model_entries.cache_clear()
    yield
    monkeypatch.delenv("CHATJOBS_MODELS_FILE")
    get_settings.cache_clear()
    model_entries.cache_clear()


@pytest.fixture
def limiter() -> Iterator[RateLimiter]:
    client = redis.Redis.from_url(get_settings().redis_url)
    prefix = f"test-providers-{uuid.uuid4().hex}"
    yield RateLimiter(client, prefix=prefix)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


def run_one(tenant: uuid.UUID, limiter: RateLimiter, cache_status: str) -> tuple[float, Gateway]:
    """Reserve, call, correct; returns the tokens the call gave back to the limiter's schedule
    (its reservation less what it was charged), in seconds of the schedule."""
    job_id = submit(tenant, gateway={"cache_ttl": 600, "cache_key": "k-1"})
    c = claim(job_id)
    assert c is not None
    route = route_for(c.model)
    assert route.provider == "ai-gateway" and route.limits.tpm == 60000
    key, limits = route.limit_key, route.limits
    # Someone's earlier call fills the schedule, so a refund has room to show.
    assert limiter.acquire(key, limits, tokens=5000, call_id="x", max_wait=60).granted
    assert limiter.acquire(key, limits, tokens=RESERVED, call_id="c", max_wait=60).granted
    reserved_at = float(limiter.state(key)["tokens_tat"])
    runtime = Gateway(limiter, cache_status)
    outcome = execute._call(runtime, c, route, reserved=RESERVED)  # type: ignore[arg-type]
    assert outcome == "succeeded"
    return reserved_at - float(limiter.state(key)["tokens_tat"]), runtime


def test_a_cache_hit_refunds_its_reservation_and_is_reported_apart(
    tenant: uuid.UUID, limiter: RateLimiter, gateway_route: None
) -> None:
    pace = 60 / (60000 * get_settings().limiter_headroom)  # seconds per token
    hit_refund, runtime = run_one(tenant, limiter, "HIT")
    miss_refund, _ = run_one(tenant, limiter, "MISS")
    # A HIT gives back its whole reservation; a MISS keeps the 23 tokens it used.
    assert hit_refund == pytest.approx(RESERVED * pace, abs=pace)
    assert miss_refund == pytest.approx((RESERVED - 23) * pace, abs=pace)

    sent = runtime.sent[0]
    assert sent.headers["cf-aig-max-attempts"] == "1"
    assert sent.headers["cf-aig-cache-ttl"] == "600"
    assert sent.headers["cf-aig-cache-key"] == "k-1"
    metadata = json.loads(sent.headers["cf-aig-metadata"])
    assert metadata["attempt"] == 1 and metadata["tenant"] == str(tenant)

    with session_scope() as session:
        logged = session.execute(
            select(UpstreamCall.cached, UpstreamCall.total_tokens)
            .where(UpstreamCall.tenant_id == tenant)
            .order_by(UpstreamCall.id)
        ).all()
        assert [tuple(r) for r in logged] == [(True, 23), (False, 23)]
        now = datetime.now(UTC)
        (row,) = usage.usage(
            session=session,
            tenant_id=tenant,
            start=now - timedelta(hours=1),
            end=now + timedelta(minutes=1),
            group_by=(),
        )
    shown: dict[str, Any] = UsageRead.of(row, ()).model_dump(exclude_none=True)
    assert shown["requests"] == 2 and shown["total_tokens"] == 46  # returned usage, as before
    assert shown["cached_requests"] == 1 and shown["cached_tokens"] == 23
    assert shown["billed_tokens"] == 23


# --- one models file, two providers --------------------------------------------------------------

MIXED = """
[models."llama"]
provider = "workers-ai"
mode = "native"
account_id = "acc-mixed"
upstream_model = "@cf/meta/llama-3.1-8b-instruct"

[models."gpt-azure"]
provider = "azure"
endpoint = "https://res.openai.azure.com"
deployment = "gpt41"
"""
NATIVE = {"result": {"response": "from workers ai"}, "success": True, "errors": [], "messages": []}


def _submit_model(tenant: uuid.UUID, model: str) -> uuid.UUID:
    body = JobCreate.model_validate(
        {"request": {"model": model, "messages": [{"role": "user", "content": "hello"}]}}
    )
    with session_scope() as session:
        return jobs.create_job(session=session, tenant_id=tenant, body=body).job.id


class ByHost:
    """A runtime whose calls go through the real adapters to stand-ins for both providers."""

    worker_id = "test:mixed"
    limiter = None

    def __init__(self) -> None:
        self.urls: list[str] = []

    def call(self, claim: jobs.Claim, route: Route) -> Completion:
        def answer(request: httpx.Request) -> httpx.Response:
            self.urls.append(str(request.url))
            if request.url.host == "api.cloudflare.com":
                return httpx.Response(200, json=NATIVE)
            assert request.headers["api-key"] == "az-key"
            azure = {**ANSWER, "choices": [{"index": 0, "message": {"content": "from azure"}}]}
            return httpx.Response(200, json=azure)

        async def run() -> Completion:
            async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
                return await chat_completion(
                    claim.request,
                    model=claim.model,
                    client=client,
                    api_key="az-key" if route.provider == "azure" else "cf-key",
                    route=route,
                    context=call_context(claim),
                )

        return asyncio.run(run())


def test_jobs_of_one_models_file_route_to_two_providers_by_model(
    tenant: uuid.UUID, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs submitted together, not a batch: a batch holds one model (OpenAI's rule, kept in
    chatjobs.batches.lines), and one model routes to one provider."""
    models = tmp_path / "models.toml"
    models.write_text(MIXED)
    monkeypatch.setenv("CHATJOBS_MODELS_FILE", str(models))
    get_settings.cache_clear()
    model_entries.cache_clear()
    try:
        job_ids = [
            _submit_model(tenant, model) for model in ("llama", "gpt-azure", "llama", "gpt-azure")
        ]
        runtime = ByHost()
        for job_id in job_ids:
            c = claim(job_id)
            assert c is not None
            assert execute._call(runtime, c, route_for(c.model)) == "succeeded"  # type: ignore[arg-type]
        with session_scope() as session:
            done = session.execute(
                select(Job.model, Job.status, Job.result, UpstreamCall.usage_estimated)
                .join(UpstreamCall, UpstreamCall.job_id == Job.id)
                .where(Job.id.in_(job_ids))
            ).all()
    finally:
        monkeypatch.delenv("CHATJOBS_MODELS_FILE")
        get_settings.cache_clear()
        model_entries.cache_clear()
    assert len(done) == 4
    for model, status, result, estimated in done:
        assert status == JobStatus.succeeded
        content = result["choices"][0]["message"]["content"]
        # The native answer carried no usage: counted by chatjobs and marked so.
        assert (content, estimated) == (
            ("from workers ai", True) if model == "llama" else ("from azure", False)
        )
    assert sorted(set(runtime.urls)) == [
        "https://api.cloudflare.com/client/v4/accounts/acc-mixed/ai/run/@cf/meta/llama-3.1-8b-instruct",
        "https://res.openai.azure.com/openai/deployments/gpt41/chat/completions?api-version=2024-10-21",
    ]


class Filtered:
    """A runtime whose Azure deployment refuses every prompt with its content filter."""

    worker_id = "test:filtered"
    limiter = None

    def __init__(self) -> None:
        self.calls = 0

    def call(self, claim: jobs.Claim, route: Route) -> Completion:
        recorded = json.loads(
            (
                Path(__file__).parent.parent / "fixtures/providers/azure_content_filter.json"
            ).read_text()
        )

        def answer(request: httpx.Request) -> httpx.Response:
            self.calls += 1
            return httpx.Response(recorded["status"], json=recorded["body"])

        async def run() -> Completion:
            async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
                return await chat_completion(
                    claim.request, model=claim.model, client=client, route=route
                )

        return asyncio.run(run())


def test_an_azure_content_filter_fails_the_job_at_once_keeping_the_filter_result(
    tenant: uuid.UUID, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(MIXED)
    monkeypatch.setenv("CHATJOBS_MODELS_FILE", str(models))
    get_settings.cache_clear()
    model_entries.cache_clear()
    try:
        job_id = _submit_model(tenant, "gpt-azure")
        c = claim(job_id)
        assert c is not None and c.max_attempts > 1
        runtime = Filtered()
        assert execute._call(runtime, c, route_for(c.model)) == "failed"  # type: ignore[arg-type]
        with session_scope() as session:
            error = session.scalars(select(Job.error).where(Job.id == job_id)).one()
    finally:
        monkeypatch.delenv("CHATJOBS_MODELS_FILE")
        get_settings.cache_clear()
        model_entries.cache_clear()
    assert runtime.calls == 1
    assert error is not None
    assert (error["status_code"], error["code"]) == (400, "content_filter")
    assert error["detail"]["innererror_code"] == "ResponsibleAIPolicyViolation"
    assert error["detail"]["content_filter_result"]["hate"]["filtered"] is True
