"""OpenAI-compatible batches, driven by the official `openai` SDK against the real stack."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import openai
import pytest
import redis

from chatjobs.devservices import Server
from chatjobs.testing import Proc
from tests.conftest import MiniStack
from tests.integration.test_reliability import sql, wait_until

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]
FINAL = {"completed", "failed", "expired", "cancelled"}


def sdk(base: str, key: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, **{"max_retries": 0, **options})


@pytest.fixture
def oai(api_url: str, api_key: str, worker: Proc) -> Iterator[openai.OpenAI]:
    with sdk(api_url, api_key) as client:
        yield client


def line(custom_id: str, marker: str, **x_sim: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": f"batch line {custom_id}"}],
        "max_tokens": 16,
        "x_test": marker,
    }
    if x_sim:
        body["x_sim"] = {**x_sim, "key": f"{marker}-{custom_id}"}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(rows: list[Any]) -> bytes:
    return b"".join(
        (row if isinstance(row, bytes) else json.dumps(row).encode()) + b"\n" for row in rows
    )


def submit(client: openai.OpenAI, rows: list[Any], window: str = "24h", **extra: Any) -> Any:
    upload = client.files.create(file=("input.jsonl", io.BytesIO(jsonl(rows))), purpose="batch")
    return client.batches.create(
        input_file_id=upload.id,
        endpoint="/v1/chat/completions",
        completion_window=window,  # type: ignore[arg-type]
        **extra,
    )


def wait_final(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    seen: list[Any] = []
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        seen.append(batch)
        if batch.status in FINAL:
            return batch
        time.sleep(0.2)
    lines = sql(
        "SELECT status, next_attempt_at IS NULL, count(*) FROM jobs WHERE batch_id = :b "
        "GROUP BY 1, 2",
        b=batch_id,
    )
    raise AssertionError(
        f"batch {batch_id} not final within {timeout}s: {seen[-1].status}; lines (status, "
        f"admitted, count): {[tuple(r) for r in lines]}"
    )


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_the_sdk_runs_a_batch_and_reads_every_line_back(oai: openai.OpenAI) -> None:
    marker = uuid.uuid4().hex
    rows = [line(f"req-{i}", marker) for i in range(25)]
    rows += [line(f"bad-{i}", marker, status=400) for i in range(3)]
    created = submit(oai, rows, metadata={"project": "sdk"})
    assert created.status in ("validating", "in_progress")
    assert created.expires_at == created.created_at + 86400
    assert created.metadata == {"project": "sdk"}

    done = wait_final(oai, created.id)
    assert done.status == "completed"
    counts = done.request_counts
    assert counts is not None
    assert (counts.total, counts.completed, counts.failed) == (28, 25, 3)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert created.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.model == "gpt-4.1"
    assert done.usage is not None and done.usage.input_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens

    output = read_lines(oai, done.output_file_id)
    errors = read_lines(oai, done.error_file_id)
    assert sorted(x["custom_id"] for x in output) == sorted(f"req-{i}" for i in range(25))
    assert sorted(x["custom_id"] for x in errors) == sorted(f"bad-{i}" for i in range(3))
    for x in output:
        assert x["id"].startswith("batch_req_") and x["error"] is None
        assert x["response"]["status_code"] == 200
        assert x["response"]["body"]["object"] == "chat.completion"
        assert x["response"]["request_id"]
    for x in errors:
        assert x["response"]["status_code"] == 400 and x["error"] is None
        assert x["response"]["body"]["error"]["message"]

    # The files' sizes are the bytes served.
    for file_id in (done.output_file_id, done.error_file_id):
        assert file_id is not None
        info = oai.files.retrieve(file_id)
        assert info.purpose == "batch_output"
        assert info.bytes == len(oai.files.content(file_id).content)

    # Every line is a job, visible by batch id.
    listed = oai.get(f"/jobs?batch_id={done.id}&limit=100", cast_to=httpx.Response).json()
    assert len(listed["data"]) == 28
    assert {j["custom_id"] for j in listed["data"]} == {r["custom_id"] for r in rows}
    assert {j["batch_id"] for j in listed["data"]} == {done.id}

    # The strict client parses every object the same.
    with sdk(
        str(oai.base_url).removesuffix("/v1/"), oai.api_key, _strict_response_validation=True
    ) as strict:
        again = strict.batches.retrieve(done.id)
        assert again.status == "completed"
        assert strict.files.retrieve(done.output_file_id).status == "processed"
        assert [b.id for b in strict.batches.list(limit=5)]


def test_an_all_failed_batch_completes_without_an_output_file_and_retries_the_failures(
    oai: openai.OpenAI,
) -> None:
    marker = uuid.uuid4().hex
    rows = [line(f"x-{i}", marker, status=422) for i in range(4)]
    done = wait_final(oai, submit(oai, rows).id)
    assert done.status == "completed"
    assert done.output_file_id is None and done.error_file_id is not None
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (0, 4)

    retried = oai.post(f"/batches/{done.id}/retry", cast_to=httpx.Response).json()
    assert retried["metadata"]["retry_of"] == done.id
    again = wait_final(oai, retried["id"])
    assert again.request_counts is not None and again.request_counts.total == 4
    ids = [x["custom_id"] for x in read_lines(oai, again.error_file_id)]
    assert sorted(ids) == [f"x-{i}" for i in range(4)]


def _failed_with(client: openai.OpenAI, rows: list[Any]) -> list[tuple[str, int | None]]:
    done = wait_final(client, submit(client, rows).id, timeout=30)
    assert done.status == "failed", done
    assert done.failed_at is not None and done.errors is not None
    return [(e.code or "", e.line) for e in done.errors.data or []]


def test_every_validation_code_names_its_line_and_nothing_is_stored(
    oai: openai.OpenAI,
) -> None:
    m = uuid.uuid4().hex
    good = line("a", m)
    assert _failed_with(oai, [good, line("b", m), b"{not json"]) == [("invalid_json_line", 3)]
    assert _failed_with(oai, [good, line("a", m)]) == [("duplicate_custom_id", 2)]
    assert _failed_with(oai, [good, {**line("b", m), "url": "/v1/embeddings"}]) == [
        ("url_mismatch", 2)
    ]
    other = line("b", m)
    other["body"]["model"] = "gpt-4.1-mini"
    assert _failed_with(oai, [good, other]) == [("model_mismatch", 2)]
    streaming = line("b", m)
    streaming["body"]["stream"] = True
    assert _failed_with(oai, [good, streaming]) == [("invalid_request", 2)]
    bad_schema = line("b", m)
    bad_schema["body"]["temperature"] = 7
    assert _failed_with(oai, [good, bad_schema]) == [("invalid_request", 2)]
    no_id = line("b", m)
    del no_id["custom_id"]
    assert _failed_with(oai, [good, no_id]) == [("invalid_request", 2)]
    assert _failed_with(oai, [b"", b"  "]) == [("empty_file", None)]
    # Several errors are all reported, in line order.
    assert _failed_with(oai, [b"[", good, line("a", m), b"x"]) == [
        ("invalid_json_line", 1),
        ("duplicate_custom_id", 3),
        ("invalid_json_line", 4),
    ]
    stored = sql("SELECT count(*) FROM jobs WHERE request->>'x_test' = :m", m=m)
    assert stored[0][0] == 0


def test_bad_requests_to_the_endpoints_are_4xx_the_sdk_does_not_retry(
    api_url: str, api_key: str
) -> None:
    with sdk(api_url, api_key, max_retries=2) as client:
        upload = client.files.create(
            file=("in.jsonl", io.BytesIO(jsonl([line("a", "m")]))), purpose="batch"
        )
        cases: list[tuple[dict[str, Any], str]] = [
            (
                {
                    "input_file_id": "file-nope",
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                },
                "input_file_id",
            ),
            (
                {
                    "input_file_id": upload.id,
                    "endpoint": "/v1/embeddings",
                    "completion_window": "24h",
                },
                "endpoint",
            ),
            (
                {
                    "input_file_id": upload.id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "forever",
                },
                "completion_window",
            ),
        ]
        for body, param in cases:
            with pytest.raises(openai.BadRequestError) as caught:
                client.batches.create(**body)
            assert caught.value.param == param
            assert caught.value.response.headers["x-should-retry"] == "false"
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_nope")
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}) as h:
        answer = h.post("/v1/batches", json={"input_file_id": upload.id})
        assert answer.status_code == 422
        assert answer.json()["error"]["param"]
        valid = {
            "input_file_id": upload.id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        hostile_cases: list[tuple[dict[str, Any], str]] = [
            ({"metadata": {"a": "x\u0000"}}, "metadata.a"),
            ({"metadata": {"a\u0000": "x"}}, "metadata"),
            ({"input_file_id": "file-\u0000"}, "input_file_id"),
            ({"metadata": {"k": "\ud800"}}, "metadata.k"),
        ]
        for hostile, param in hostile_cases:
            answer = h.post(
                "/v1/batches",
                content=json.dumps({**valid, **hostile}).encode(),  # \u escapes, as sent
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 422, answer.text
            assert answer.json()["error"]["param"].startswith(param), answer.text
        # A filename* in a charset whose codec refuses the bytes: the plain name stands.
        odd = h.post(
            "/v1/files",
            headers={"content-type": "multipart/form-data; boundary=B"},
            content=(
                b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                b'--B\r\nContent-Disposition: form-data; name="file"; filename="x.jsonl"; '
                b"filename*=idna''%FF\r\nContent-Type: application/octet-stream\r\n\r\n"
                + jsonl([line("a", "m")])
                + b"\r\n--B--\r\n"
            ),
        )
        assert odd.status_code == 200, odd.text
        assert odd.json()["filename"] == "x.jsonl"


def test_cancel_mid_way_keeps_the_partial_output(oai: openai.OpenAI) -> None:
    marker = uuid.uuid4().hex
    rows = [line(f"c-{i}", marker) for i in range(10)]
    rows += [line(f"slow-{i}", marker, latency=3) for i in range(60)]
    batch = submit(oai, rows)
    wait_until(
        lambda: (oai.batches.retrieve(batch.id).request_counts or _zero()).completed >= 10,
        30,
        "the fast lines done",
    )
    cancelling = oai.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_final(oai, batch.id)
    assert done.status == "cancelled" and done.cancelled_at and done.cancelling_at
    counts = done.request_counts
    assert counts is not None
    assert counts.completed + counts.failed == counts.total == 70
    assert counts.completed >= 10
    output = read_lines(oai, done.output_file_id)
    errors = read_lines(oai, done.error_file_id)
    assert len(output) == counts.completed and len(errors) == counts.failed
    assert {x["error"]["code"] for x in errors} == {"batch_cancelled"}
    assert all(x["response"] is None for x in errors)
    ids = [x["custom_id"] for x in output + errors]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)
    # Cancelling an ended batch is refused with 409 (for a cancelled one: a no-op).
    assert oai.batches.cancel(batch.id).status == "cancelled"


def _zero() -> Any:
    return type("C", (), {"completed": 0, "failed": 0, "total": 0})()


def test_a_short_window_expires_unfinished_lines_and_keeps_the_partial_output(
    oai: openai.OpenAI,
) -> None:
    marker = uuid.uuid4().hex
    rows = [line(f"e-{i}", marker) for i in range(5)]
    rows += [line(f"late-{i}", marker, latency=20) for i in range(5)]
    done = wait_final(oai, submit(oai, rows, window="4s").id, timeout=40)
    assert done.status == "expired" and done.expired_at
    counts = done.request_counts
    assert counts is not None and (counts.completed, counts.failed) == (5, 5)
    assert (counts.model_extra or {}).get("expired") == 5
    errors = read_lines(oai, done.error_file_id)
    assert {x["error"]["code"] for x in errors} == {"batch_expired"}
    assert sorted(x["custom_id"] for x in read_lines(oai, done.output_file_id)) == [
        f"e-{i}" for i in range(5)
    ]


def test_live_counts_and_results_so_far_while_the_batch_runs(
    oai: openai.OpenAI, api_url: str, api_key: str
) -> None:
    marker = uuid.uuid4().hex
    rows = [line(f"f-{i}", marker) for i in range(5)]
    rows += [line(f"s-{i}", marker, latency=4) for i in range(5)]
    batch = submit(oai, rows)
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}) as h:

        def so_far(after: str | None = None) -> list[dict[str, Any]]:
            params = {"after": after} if after else {}
            answer = h.get(f"/v1/batches/{batch.id}/results", params=params)
            assert answer.status_code == 200
            return [json.loads(x) for x in answer.text.splitlines()]

        wait_until(lambda: len(so_far()) >= 5, 30, "the fast lines")
        running = oai.batches.retrieve(batch.id)
        assert running.status == "in_progress"
        # The slow lines are being called: counted, by GET and by the list alike.
        assert running.request_counts is not None
        assert (running.request_counts.model_extra or {})["in_progress"] >= 1
        (listed,) = [b for b in oai.batches.list(limit=100) if b.id == batch.id]
        assert listed.request_counts is not None
        assert (listed.request_counts.model_extra or {})["in_progress"] >= 1
        first = so_far()
        assert {x["custom_id"] for x in first} >= {f"f-{i}" for i in range(5)}
        done = wait_final(oai, batch.id)
        rest = so_far(first[-1]["id"])
        assert len(first) + len(rest) == 10
        assert {x["custom_id"] for x in first + rest} == {r["custom_id"] for r in rows}
        results = f"/v1/batches/{batch.id}/results"
        assert h.get(results, params={"after": "nope"}).status_code == 422
        unknown = f"batch_req_{uuid.uuid4().hex}"
        assert h.get(results, params={"after": unknown}).status_code == 400
    assert done.status == "completed"


def test_list_pages_through_every_batch(api_url: str, worker: Proc) -> None:
    from tests.conftest import new_key

    with sdk(api_url, new_key()) as client:
        made = [submit(client, [line("a", uuid.uuid4().hex)]).id for _ in range(5)]
        page = client.batches.list(limit=2)
        assert len(page.data) == 2 and page.has_more
        listed = [b.id for b in client.batches.list(limit=2)]  # auto-pagination
        assert listed == sorted(made, reverse=True)


def test_idempotency_key_makes_one_batch(oai: openai.OpenAI) -> None:
    upload = oai.files.create(
        file=("i.jsonl", io.BytesIO(jsonl([line("a", "m")]))), purpose="batch"
    )
    body = {
        "input_file_id": upload.id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = oai.batches.create(**body, extra_headers=key)  # type: ignore[arg-type]
    second = oai.batches.create(**body, extra_headers=key)  # type: ignore[arg-type]
    assert first.id == second.id
    with pytest.raises(openai.ConflictError):
        oai.batches.create(**{**body, "completion_window": "1h"}, extra_headers=key)  # type: ignore[arg-type]


@pytest.mark.timeout(300)
def test_a_killed_worker_and_a_flushed_redis_mid_batch_end_every_line_once(
    make_stack: Make, api_key: str, private_redis: Server
) -> None:
    stack = make_stack(workers=[["--concurrency", "16"]], env={"CHATJOBS_DISPATCH_WINDOW": "16"})
    marker = uuid.uuid4().hex
    rows = [line(f"k-{i}", marker, latency=0.5) for i in range(200)]
    with sdk(stack.url, api_key) as client:
        batch = submit(client, rows)
        wait_until(
            lambda: (client.batches.retrieve(batch.id).request_counts or _zero()).completed >= 30,
            60,
            "some lines done",
        )
        stack.procs[-1].stop(signal.SIGKILL)
        redis.Redis.from_url(private_redis.url).flushall()
        stack.start_worker("--concurrency", "16", name="replacement")
        done = wait_final(client, batch.id, timeout=90)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.total) == (200, 200)
    rows_by_status = sql(
        "SELECT status, count(*), count(DISTINCT batch_seq), max(batch_seq) FROM jobs "
        "WHERE batch_id = :b GROUP BY status",
        b=batch.id,
    )
    assert [tuple(r) for r in rows_by_status] == [("succeeded", 200, 200, 200)]
    calls = sql(
        "SELECT count(*) FILTER (WHERE c.status_code = 200), count(DISTINCT c.job_id) "
        "FROM upstream_calls c JOIN jobs j ON j.id = c.job_id WHERE j.batch_id = :b",
        b=batch.id,
    )
    successes, jobs_called = calls[0]
    assert jobs_called == 200
    assert successes == 200  # one successful call per line: none ran twice to success


def test_more_lines_than_the_limits_fail_with_too_many_tasks_or_queued_limit_exceeded(
    make_stack: Make, api_key: str
) -> None:
    stack = make_stack(
        env={"CHATJOBS_BATCH_MAX_LINES": "3", "CHATJOBS_TENANT_MAX_QUEUED": "5"},
        workers=[],
        beat=False,
    )
    marker = uuid.uuid4().hex
    with sdk(stack.url, api_key) as client:
        assert _failed_with(client, [line(f"t-{i}", marker) for i in range(4)]) == [
            ("too_many_tasks", 4)
        ]
        just_right = submit(client, [line(f"t-{i}", marker) for i in range(3)])
        wait_until(
            lambda: client.batches.retrieve(just_right.id).status == "in_progress",
            20,
            "three lines stored",
        )
        # Three more would make six waiting jobs, past the tenant's five.
        assert _failed_with(client, [line(f"u-{i}", marker) for i in range(3)]) == [
            ("queued_limit_exceeded", None)
        ]


def test_a_batch_webhook_from_a_real_batch_is_unwrapped_by_the_sdk(
    make_stack: Make, api_key: str
) -> None:
    from tests.integration.test_webhooks_events import WEBHOOK_ENV

    hits: list[tuple[bytes, dict[str, str]]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            hits.append((body, {k.lower(): v for k, v in self.headers.items()}))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        stack = make_stack(env=WEBHOOK_ENV)
        url = f"http://127.0.0.1:{server.server_address[1]}/hook"
        with sdk(stack.url, api_key) as client:
            batch = submit(client, [line("w", uuid.uuid4().hex)], extra_body={"webhook_url": url})
            assert wait_final(client, batch.id).status == "completed"
            wait_until(lambda: len(hits) == 1, 20, "the batch.completed delivery")
            secret = client.get("/webhooks/secret", cast_to=httpx.Response).json()["data"][0]
    finally:
        server.shutdown()
        server.server_close()
    body, headers = hits[0]
    event = openai.OpenAI(api_key="x", webhook_secret=secret["secret"]).webhooks.unwrap(
        body, headers
    )
    assert event.type == "batch.completed" and event.data.id == batch.id


def test_a_batch_whose_api_died_before_validating_it_is_validated_by_the_reconciler(
    oai: openai.OpenAI, api_key: str
) -> None:
    from chatjobs.db import session_scope
    from chatjobs.models import Batch, StoredFile
    from chatjobs.settings import get_settings

    marker = uuid.uuid4().hex
    upload = oai.files.create(
        file=("in.jsonl", io.BytesIO(jsonl([line(f"r-{i}", marker) for i in range(3)]))),
        purpose="batch",
    )
    batch_id = f"batch_{uuid.uuid4().hex}"
    with session_scope() as session:
        tenant_id = session.get(StoredFile, upload.id).tenant_id  # type: ignore[union-attr]
        session.add(
            Batch(
                id=batch_id,
                tenant_id=tenant_id,
                status="validating",
                queue=get_settings().queue_name,
                endpoint="/v1/chat/completions",
                input_file_id=upload.id,
                completion_window="1h",
                window_seconds=3600,
                # Created a minute ago and never claimed: its API process died first.
                created_at=datetime.now(UTC) - timedelta(minutes=1),
                expires_at=datetime.now(UTC) + timedelta(hours=1),
            )
        )
    done = wait_final(oai, batch_id, timeout=60)
    assert done.status == "completed"
    assert done.request_counts is not None and done.request_counts.completed == 3
