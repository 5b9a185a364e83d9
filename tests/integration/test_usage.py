"""GET /v1/usage and `chatjobs usage`: a tenant's upstream calls summed from upstream_calls,
grouped by model and UTC day, priced from the models file, never another tenant's."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.app import create_app
from chatjobs import cli, usage
from chatjobs.db import session_scope
from chatjobs.models import Job, JobStatus, Tenant, UpstreamCall
from chatjobs.routing import model_entries
from chatjobs.settings import get_settings
from tests.conftest import new_key

pytestmark = pytest.mark.integration

DAY1 = datetime(2026, 6, 1, tzinfo=UTC)
DAY2 = datetime(2026, 6, 2, tzinfo=UTC)
RANGE = {"start": "2026-06-01T00:00:00Z", "end": "2026-06-03T00:00:00Z"}


def at(day: datetime, hour: int, minute: int = 0) -> datetime:
    return day.replace(hour=hour, minute=minute)


def _tenant(name: str) -> uuid.UUID:
    with session_scope() as session:
        return session.scalars(select(Tenant.id).where(Tenant.name == name)).one()


def _job(tenant_id: uuid.UUID, model: str, calls: list[tuple[datetime, int | None, int]]) -> None:
    """A job of ``model`` and its calls: (when, status, prompt tokens); completion is half."""
    with session_scope() as session:
        job = Job(
            tenant_id=tenant_id,
            status=JobStatus.succeeded,
            model=model,
            request={"model": model, "messages": []},
            created_at=datetime(2026, 5, 30, tzinfo=UTC),
        )
        session.add(job)
        session.flush()
        for seq, (when, status, prompt) in enumerate(calls, start=1):
            ok = status == 200
            session.add(
                UpstreamCall(
                    job_id=job.id,
                    tenant_id=job.tenant_id,
                    claim_seq=seq,
                    attempt=seq,
                    model=model,
                    status_code=status,
                    latency_ms=10,
                    prompt_tokens=prompt if ok else None,
                    completion_tokens=prompt // 2 if ok else None,
                    total_tokens=prompt + prompt // 2 if ok else None,
                    created_at=when,
                )
            )


@pytest.fixture
def names(stack_env: dict[str, str]) -> dict[str, str]:
    """Two tenants' names and the first one's key; their calls over two days, two models."""
    a, b = f"usage-a-{uuid.uuid4().hex[:8]}", f"usage-b-{uuid.uuid4().hex[:8]}"
    key = new_key(a)
    new_key(b)
    ta, tb = _tenant(a), _tenant(b)
    _job(
        ta,
        "m-a",
        [
            (datetime(2026, 5, 31, 23, 59, tzinfo=UTC), 200, 7000),  # before the range
            (at(DAY1, 23, 30), 200, 10),
            (at(DAY1, 23, 40), 429, 0),
            (at(DAY2, 0, 30), 200, 20),
        ],
    )
    _job(ta, "m-b", [(at(DAY2, 1), None, 0), (at(DAY2, 2), 200, 100)])
    _job(tb, "m-a", [(at(DAY1, 12), 200, 1000)])
    return {"a": a, "b": b, "key": key}


@pytest.fixture
def http(names: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The API in process, as tenant a, with prices for m-a only."""
    models = tmp_path / "models.toml"
    models.write_text('[models."m-a"]\ninput_per_mtok = 2.0\noutput_per_mtok = 8.0\n')
    monkeypatch.setenv("CHATJOBS_MODELS_FILE", str(models))
    get_settings.cache_clear()
    model_entries.cache_clear()
    with TestClient(create_app()) as client:
        client.headers["Authorization"] = f"Bearer {names['key']}"
        yield client
    monkeypatch.delenv("CHATJOBS_MODELS_FILE")
    get_settings.cache_clear()
    model_entries.cache_clear()


def sums(row: dict[str, Any]) -> tuple[int, ...]:
    keys = ("requests", "failures", "prompt_tokens", "completion_tokens", "total_tokens")
    return tuple(row[k] for k in keys)


def test_usage_by_model_and_day_sums_the_tenants_calls_in_range(http: Any) -> None:
    answer = http.get("/v1/usage", params={**RANGE, "group_by": "model,day"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "list"
    assert body["group_by"] == ["model", "day"]
    assert body["start"].startswith("2026-06-01T00:00:00")
    got = [(r["day"], r["model"], sums(r)) for r in body["data"]]
    assert got == [
        ("2026-06-01", "m-a", (2, 1, 10, 5, 15)),
        ("2026-06-02", "m-a", (1, 0, 20, 10, 30)),
        ("2026-06-02", "m-b", (2, 1, 100, 50, 150)),
    ]


def test_usage_by_model_is_priced_where_the_models_file_has_prices(http: Any) -> None:
    rows = http.get("/v1/usage", params={**RANGE, "group_by": "model"}).json()["data"]
    assert [(r["model"], sums(r), r["cost_usd"]) for r in rows] == [
        ("m-a", (3, 1, 30, 15, 45), round(30 / 1e6 * 2 + 15 / 1e6 * 8, 6)),
        ("m-b", (2, 1, 100, 50, 150), None),
    ]
    assert all("day" not in r for r in rows)


def test_usage_by_day_or_nothing_has_no_model_or_cost(http: Any) -> None:
    by_day = http.get("/v1/usage", params={**RANGE, "group_by": "day"}).json()["data"]
    assert [(r["day"], sums(r)) for r in by_day] == [
        ("2026-06-01", (2, 1, 10, 5, 15)),
        ("2026-06-02", (3, 1, 120, 60, 180)),
    ]
    total = http.get("/v1/usage", params={**RANGE, "group_by": ""}).json()["data"]
    assert [sums(r) for r in total] == [(5, 2, 130, 65, 195)]
    assert set(total[0]) == {"requests", "failures", "prompt_tokens", "completion_tokens"} | {
        "total_tokens",
        "cached_requests",
        "cached_tokens",
        "billed_tokens",
        "estimated_requests",
        "offloaded_requests",
        "offloaded_tokens",
    }
    # No call here came from a gateway cache or had its usage estimated.
    assert total[0]["billed_tokens"] == total[0]["total_tokens"]
    assert total[0]["cached_requests"] == total[0]["estimated_requests"] == 0


def test_usage_never_shows_another_tenants_calls(http: Any, names: dict[str, str]) -> None:
    other = new_key(names["b"])
    http.headers["Authorization"] = f"Bearer {other}"
    rows = http.get("/v1/usage", params={**RANGE, "group_by": "model"}).json()["data"]
    assert [(r["model"], sums(r)) for r in rows] == [("m-a", (1, 0, 1000, 500, 1500))]


def test_usage_defaults_to_the_last_seven_days(http: Any) -> None:
    body = http.get("/v1/usage").json()
    assert body["data"] == []  # the calls are months old
    start, end = (datetime.fromisoformat(body[k]) for k in ("start", "end"))
    assert (end - start).days == 7
    assert body["group_by"] == ["model", "day"]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start": "2026-06-03T00:00:00Z", "end": "2026-06-01T00:00:00Z"}, "query.end"),
        ({"start": "2026-06-01T00:00:00Z", "end": "2026-06-01T00:00:00Z"}, "query.end"),
        ({"start": "2025-01-01T00:00:00Z", "end": "2026-06-01T00:00:00Z"}, "query.start"),
        ({"start": "2026-06-01T00:00:00"}, "query.start"),  # no zone
        ({"end": "0.5"}, "query.end"),  # Unix seconds, which pydantic alone would take
        ({"group_by": "model,week"}, "query.group_by"),
    ],
)
def test_usage_refuses_a_bad_range_or_group_with_422_naming_it(
    http: Any, params: dict[str, str], param: str
) -> None:
    answer = http.get("/v1/usage", params=params)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["param"] == param


def test_usage_with_more_groups_than_the_cap_asks_for_a_narrower_range(
    http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage, "MAX_ROWS", 2)
    answer = http.get("/v1/usage", params={**RANGE, "group_by": "model,day"})
    assert answer.status_code == 422
    assert "narrower range" in answer.json()["error"]["message"]


def test_usage_command_prints_the_groups_and_the_totals(
    http: Any, names: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    ns = cli.build_parser().parse_args(["usage", "--tenant", names["a"], "--since", "366d"])
    ns.func(ns)
    out = capsys.readouterr().out
    assert "2026-06-02" in out and "m-b" in out
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines()]
    total = next(cells for cells in rows if cells[:1] == ["total"])
    # 366 days back reaches the call before the API tests' range too; m-b has no prices.
    assert total == ["total", "", "6", "2", "7,130", "3,565", "10,695", "0.042180"], out


def test_usage_command_names_an_unknown_tenant(stack_env: dict[str, str]) -> None:
    ns = cli.build_parser().parse_args(["usage", "--tenant", f"nobody-{uuid.uuid4().hex}"])
    with pytest.raises(SystemExit, match="no tenant"):
        ns.func(ns)


def test_a_call_the_worker_logs_counts_for_its_tenant(queue: str, tenant: uuid.UUID) -> None:
    """The call log row a worker writes carries the job's tenant (what usage reads)."""
    from datetime import timedelta

    from chatjobs import jobs
    from chatjobs.schemas import JobCreate

    body = JobCreate.model_validate({"request": {"messages": [{"role": "user", "content": "hi"}]}})
    with session_scope() as session:
        job_id = jobs.create_job(session=session, tenant_id=tenant, body=body).job.id
    with session_scope() as session:
        claim = jobs.claim_job(session=session, job_id=job_id, worker="test:1")
        assert claim is not None
    call = jobs.Call(
        stream=False,
        latency_ms=5,
        status_code=200,
        usage={"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        request_id="req_1",
        error=None,
    )
    with session_scope() as session:
        jobs.record_outcome(session=session, claim=claim, call=call, result={"choices": []})
    now = datetime.now(UTC)
    with session_scope() as session:
        (row,) = usage.usage(
            session=session,
            tenant_id=tenant,
            start=now - timedelta(hours=1),
            end=now + timedelta(hours=1),
            group_by=(),
        )
    assert (row.requests, row.failures, row.total_tokens) == (1, 0, 10)
