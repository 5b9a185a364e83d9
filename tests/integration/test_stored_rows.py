"""Reading a stored job never fails: pathological rows, written straight into the table as an
old version or another writer could have left them, read through every read path of the real
API (the job, the list, the steps, the event stream) and a webhook delivery to a real
receiver: 200 with a body, never a 5xx, never a delivery left behind."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from chatjobs import deliveries
from chatjobs.db import session_scope
from chatjobs.models import Job, JobStatus, Tenant, WebhookDelivery, uuid7
from chatjobs.schemas import JobRead
from chatjobs.settings import get_settings
from chatjobs.storable import loads
from tests.conftest import new_key
from worker import webhook

pytestmark = pytest.mark.integration


def nested(levels: int, leaf: str = "1") -> str:
    """JSON text of ``levels`` arrays, one inside the other."""
    return "[" * levels + leaf + "]" * levels


# Column -> JSON text, cast to jsonb by Postgres itself: what no Python writer could build
# (1e400) or what this version refuses at submit (depth 300) goes in all the same.
ROWS: dict[str, dict[str, str]] = {
    "error-code-a-number": {"error": '{"type": "upstream_error", "message": "m", "code": 123}'},
    "error-code-null": {"error": '{"type": "upstream_error", "message": "m", "code": null}'},
    "error-fields-of-every-type": {
        "error": '{"type": 5, "message": {"a": [1]}, "status_code": "429", "request_id": 7}'
    },
    "error-a-string": {"error": '"boom"'},
    "error-a-number": {"error": "42"},
    "result-choices-not-a-list": {"result": '{"choices": {"0": {"message": "x"}}}'},
    "result-content-not-a-string": {
        "result": '{"choices": [{"message": {"content": [{"type": "text", "text": "t"}]}}]}'
    },
    "result-an-array": {"result": "[1, 2, 3]"},
    "result-300-deep": {"result": '{"choices": ' + nested(300) + "}"},
    "request-300-deep": {
        "request": '{"messages": [{"role": "user", "content": "x"}], "x": ' + nested(300) + "}"
    },
    "request-a-string": {"request": '"not an object"'},
    "metadata-an-array": {"metadata": '[1, "two"]'},
    "metadata-a-string": {"metadata": '"just text"'},
    "metadata-huge-numbers": {"metadata": '{"int": 1e4000, "float": 1e400, "tiny": 1e-400}'},
    "progress-a-number": {"progress": "7"},
    "progress-odd": {"progress": '{"map": "half", "reduce": [null]}'},
    "long-context-an-array": {"long_context": '["map_reduce", {"x": ' + nested(200) + "}]"},
    "everything-at-once": {
        "request": '{"x": ' + nested(300) + "}",
        "result": '{"choices": "none"}',
        "error": '{"code": 500.5, "message": null}',
        "metadata": "[[[]]]",
        "progress": "null",
        "long_context": "false",
    },
}


@pytest.fixture
def tenant_key(stack_env: dict[str, str]) -> tuple[uuid.UUID, str]:
    name = f"rows-{uuid.uuid4().hex[:8]}"
    key = new_key(name)
    with session_scope() as session:
        return session.scalars(select(Tenant.id).where(Tenant.name == name)).one(), key


def store_job(
    tenant_id: uuid.UUID,
    columns: dict[str, str],
    *,
    status: JobStatus = JobStatus.failed,
    parent_id: uuid.UUID | None = None,
    step_index: int | None = None,
    webhook_url: str | None = None,
) -> uuid.UUID:
    """A job row with ``columns`` set from JSON text, as if written by another writer."""
    job_id = uuid7()
    with session_scope() as session:
        session.execute(
            insert(Job).values(
                id=job_id,
                tenant_id=tenant_id,
                status=status,
                model="gpt-4.1",
                request={"messages": [{"role": "user", "content": "x"}]},
                webhook_url=webhook_url,
                queue=f"rows-{uuid.uuid4().hex[:6]}",  # no dispatcher serves it
                parent_id=parent_id,
                step_kind=None if parent_id is None else "map",
                step_level=None if parent_id is None else 0,
                step_index=step_index,
                completed_at=text("now()"),
            )
        )
        for column, value in columns.items():
            session.execute(
                text(f"UPDATE jobs SET {column} = CAST(:value AS jsonb) WHERE id = :id"),
                {"value": value, "id": job_id},
            )
    return job_id


def read_everywhere(client: httpx.Client, job_id: uuid.UUID) -> dict[str, Any]:
    """The job through its own read, the list, its steps and its event stream."""
    one = client.get(f"/v1/jobs/{job_id}")
    assert one.status_code == 200, one.text
    job = one.json()
    assert job["id"] == str(job_id)
    listed = client.get("/v1/jobs", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    assert str(job_id) in [j["id"] for j in listed.json()["data"]]
    steps = client.get(f"/v1/jobs/{job_id}/steps")
    assert steps.status_code == 200, steps.text
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=10) as events:
        assert events.status_code == 200
        body = events.read().decode()
    for response in (one, listed, steps, events):
        assert response.headers.get("x-request-id"), response.request.url
    assert "event: status" in body and "event: done" in body, body
    status_data = body.split("event: status\ndata: ", 1)[1].split("\n", 1)[0]
    assert json.loads(status_data)["id"] == str(job_id)
    return dict(job)


@pytest.mark.parametrize("columns", ROWS.values(), ids=ROWS.keys())
def test_a_pathological_row_reads_through_every_endpoint(
    api_url: str, tenant_key: tuple[uuid.UUID, str], columns: dict[str, str]
) -> None:
    tenant_id, key = tenant_key
    job_id = store_job(tenant_id, columns)
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
    ) as client:
        job = read_everywhere(client, job_id)
    for name in ("request", "result", "metadata", "progress", "long_context"):
        assert job[name] is None or isinstance(job[name], dict), (name, job[name])
    if "error" in columns and columns["error"] != "null":
        assert isinstance(job["error"]["type"], str) and isinstance(job["error"]["message"], str)
        assert job["error"]["code"] is None or isinstance(job["error"]["code"], str)


def test_the_numeric_error_code_reads_as_its_text(
    api_url: str, tenant_key: tuple[uuid.UUID, str]
) -> None:
    tenant_id, key = tenant_key
    job_id = store_job(tenant_id, ROWS["error-code-a-number"])
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}) as client:
        error = client.get(f"/v1/jobs/{job_id}").json()["error"]
    assert error == {
        "type": "upstream_error",
        "message": "m",
        "status_code": None,
        "code": "123",
        "request_id": None,
        "detail": None,
    }


def test_steps_with_pathological_results_read_back(
    api_url: str, tenant_key: tuple[uuid.UUID, str]
) -> None:
    tenant_id, key = tenant_key
    parent = store_job(tenant_id, {"progress": '{"map": {"done": "x", "total": null}}'})
    odd = [ROWS[name] for name in ("result-choices-not-a-list", "result-300-deep")]
    odd += [ROWS["result-content-not-a-string"], ROWS["error-code-a-number"]]
    for index, columns in enumerate(odd):
        store_job(tenant_id, columns, parent_id=parent, step_index=index)
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}) as client:
        read_everywhere(client, parent)
        steps = client.get(f"/v1/jobs/{parent}/steps").json()
    assert [s["index"] for s in steps] == [0, 1, 2, 3]
    assert steps[0]["content"] is None
    assert json.loads(steps[2]["content"]) == [{"type": "text", "text": "t"}]
    assert steps[3]["error"]["code"] == "123"


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[bytes]]]:
    """A real HTTP receiver on 127.0.0.1 that answers 200 and keeps every body."""
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("content-length", 0))))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", bodies
    server.shutdown()
    server.server_close()


def test_a_webhook_for_a_pathological_row_is_delivered(
    tenant_key: tuple[uuid.UUID, str],
    receiver: tuple[str, list[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # In-process, so the attempt's outcome is seen here: the delivery the worker's task
    # makes, to a real receiver.
    monkeypatch.setenv("CHATJOBS_WEBHOOK_ALLOW_PRIVATE", "127.0.0.0/8")
    get_settings.cache_clear()
    webhook.allowlist.cache_clear()
    tenant_id, _ = tenant_key
    url, bodies = receiver
    job_id = store_job(tenant_id, ROWS["everything-at-once"], webhook_url=url)
    numeric = store_job(tenant_id, ROWS["error-code-a-number"], webhook_url=url)
    with session_scope() as session:
        deliveries.queue_events(session, [job_id, numeric], "job.failed")
        ids = list(
            session.scalars(
                select(WebhookDelivery.id).where(WebhookDelivery.job_id.in_([job_id, numeric]))
            )
        )
    try:
        outcomes = [webhook.deliver(delivery_id) for delivery_id in ids]
    finally:
        webhook.allowlist.cache_clear()
    assert outcomes == ["succeeded", "succeeded"]
    with session_scope() as session:
        statuses = session.scalars(
            select(WebhookDelivery.status).where(WebhookDelivery.id.in_(ids))
        )
        assert set(statuses) == {"succeeded"}
    events = {e["data"]["id"]: e for e in map(json.loads, bodies)}
    assert set(events) == {str(job_id), str(numeric)}
    assert events[str(numeric)]["data"]["error"]["code"] == "123"
    assert events[str(job_id)]["type"] == "job.failed"


# Postgres holds JSON that Python's json cannot read at all: the row fails in the driver,
# before any read shape. chatjobs.storable.loads reads it; the engine must use it.
UNLOADABLE = {
    "integer-of-5000-digits": {"metadata": '{"n": 1e5000}'},
    "2000-deep": {"result": '{"x": ' + nested(2000) + "}"},
}


@pytest.mark.parametrize("columns", UNLOADABLE.values(), ids=UNLOADABLE.keys())
def test_a_row_python_json_cannot_load_reads_with_storable_loads(
    tenant_key: tuple[uuid.UUID, str], columns: dict[str, str]
) -> None:
    job_id = store_job(tenant_key[0], columns)
    engine = create_engine(get_settings().database_url, json_deserializer=loads, poolclass=NullPool)
    try:
        with Session(engine) as session:
            read = JobRead.from_job(session.get_one(Job, job_id))
    finally:
        engine.dispose()
    assert json.loads(read.model_dump_json())["id"] == str(job_id)


@pytest.mark.parametrize("columns", UNLOADABLE.values(), ids=UNLOADABLE.keys())
def test_a_row_python_json_cannot_load_reads_through_the_api(
    api_url: str, tenant_key: tuple[uuid.UUID, str], columns: dict[str, str]
) -> None:
    tenant_id, key = tenant_key
    job_id = store_job(tenant_id, columns)
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}) as client:
        read_everywhere(client, job_id)
