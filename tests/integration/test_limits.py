"""What a request may cost: the key before the body, large bodies at once, per-tenant limits
(submissions per second, queued jobs, open streams, calls per job), and upstream errors
scrubbed of secrets on their way into the job.

Real api processes (the session's, or MiniStacks of their own for settings and for jobs that
must stay queued), real Postgres and Redis, the simulator over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from chatjobs.db import session_scope
from chatjobs.tenants import set_limits
from chatjobs.testing import wait_job
from tests.conftest import MiniStack, new_key
from tests.integration.test_long_context import SMALL, document, write_models_file
from tests.integration.test_reliability import job_body, sql, wait_until

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]
MESSAGES = [{"role": "user", "content": "What are the three laws of thermodynamics?"}]


def tenant_key(**limits: int | None) -> str:
    """A key of a new tenant with these limits of its own (set before the key is first used)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    key = new_key(name)
    if limits:
        with session_scope() as session:
            set_limits(session=session, tenant_name=name, values=limits)
    return key


def client_for(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


def raw_post(
    url: str, key: str, *, length: int, body: bytes = b"", timeout: float = 10
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """POST /v1/jobs declaring ``length`` bytes but sending only ``body``; the answer."""
    with open_post(url, key, length=length, body=body) as sock:
        return read_response(sock, timeout)


@contextlib.contextmanager
def open_post(url: str, key: str, *, length: int, body: bytes = b"") -> Iterator[socket.socket]:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80))
    try:
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        yield sock
    finally:
        sock.close()


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], Any]:
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk
        rest += chunk
    return int(lines[0].split()[1]), headers, json.loads(rest[:length] or b"null")


# --- the key before the body -----------------------------------------------------------


def test_a_bad_key_is_refused_before_the_body_is_sent(api_url: str) -> None:
    # Only the head is sent: answering at all proves the body was never waited for.
    status, headers, body = raw_post(api_url, "cj_not-a-key", length=9 * 1024 * 1024)
    assert status == 401
    assert headers["www-authenticate"] == "Bearer"
    assert body["error"]["type"] == "authentication_error"


def test_a_missing_key_on_any_v1_route_is_a_401_in_the_envelope(api_url: str) -> None:
    for method, path in [("GET", "/v1/jobs"), ("GET", "/v1/keys"), ("POST", "/v1/nothing")]:
        response = httpx.request(method, f"{api_url}{path}", content=b"{}")
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{api_url}/healthz").status_code == 200


def test_a_valid_key_still_submits_and_reads_after_authentication(client: httpx.Client) -> None:
    created = client.post("/v1/jobs", json={"request": {"messages": MESSAGES}})
    assert created.status_code == 202, created.text
    assert client.get(f"/v1/jobs/{created.json()['id']}").status_code == 200


def test_large_bodies_beyond_the_cap_wait_then_get_a_503_and_a_freed_slot_admits_the_next(
    make_stack: Make,
) -> None:
    stack = make_stack(
        env={"CHATJOBS_MAX_LARGE_BODIES": "1", "CHATJOBS_LARGE_BODY_WAIT_SECONDS": "1"},
        workers=[],
        beat=False,
    )
    key = new_key()
    content = "lorem ipsum " * (2 * 1024 * 1024 // 12)
    body = json.dumps({"request": {"messages": [{"role": "user", "content": content}]}}).encode()
    # The first large body takes the only slot and holds it while it is slowly sent.
    with open_post(stack.url, key, length=len(body), body=body[:65536]) as first:
        time.sleep(1.5)
        started = time.monotonic()
        status, headers, error = raw_post(stack.url, key, length=len(body))
        waited = time.monotonic() - started
        assert status == 503, error
        assert error["error"]["type"] == "service_unavailable"
        assert headers["retry-after"] == "1"
        assert 0.9 <= waited < 10
        first.sendall(body[65536:])
        status, _, job = read_response(first, 60)
        assert status == 202, job
    # Its slot is free again: the next large body goes straight through.
    with client_for(stack.url, key) as client:
        response = client.post(
            "/v1/jobs", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 202, response.text[:500]


# --- submissions per second ----------------------------------------------------------------


def test_submissions_over_the_tenant_rate_get_429_with_retry_after_and_ratelimit_headers(
    api_url: str,
) -> None:
    key = tenant_key(submit_rps=3)
    accepted: list[httpx.Response] = []
    with client_for(api_url, key) as client:
        for _ in range(30):
            response = client.post("/v1/jobs", json={"request": {"messages": MESSAGES}})
            if response.status_code != 202:
                break
            accepted.append(response)
        else:
            pytest.fail("30 submissions in a row were accepted at 3 per second")
        assert len(accepted) >= 3  # the burst: one second's worth
        first = accepted[0].headers
        assert first["x-ratelimit-limit-requests"] == "3"
        assert first["x-ratelimit-remaining-requests"] == "2"
        assert first["x-ratelimit-reset-requests"].endswith(("ms", "s"))

        assert response.status_code == 429, response.text
        assert response.json()["error"]["type"] == "rate_limit_exceeded"
        assert "3 job submissions per second" in response.json()["error"]["message"]
        headers = response.headers
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert int(headers["retry-after"]) >= 1
        wait_ms = int(headers["retry-after-ms"])
        assert 0 < wait_ms <= 1000 / 3 + 50
        # Another tenant is not slowed by this one.
        with client_for(api_url, new_key()) as other:
            assert (
                other.post("/v1/jobs", json={"request": {"messages": MESSAGES}}).status_code == 202
            )
        time.sleep(wait_ms / 1000)
        again = client.post("/v1/jobs", json={"request": {"messages": MESSAGES}})
        assert again.status_code == 202, again.text


def test_a_tenant_over_its_rate_is_refused_before_its_body_is_sent(api_url: str) -> None:
    key = tenant_key(submit_rps=1)
    with client_for(api_url, key) as client:
        assert client.post("/v1/jobs", json={"request": {"messages": MESSAGES}}).status_code == 202
    status, headers, body = raw_post(api_url, key, length=9 * 1024 * 1024)
    assert status == 429, body
    assert "retry-after" in headers and headers["x-ratelimit-remaining-requests"] == "0"


# --- queued jobs -------------------------------------------------------------------------


def test_a_tenant_at_its_queued_limit_gets_429_until_a_job_leaves_the_queue(
    make_stack: Make,
) -> None:
    stack = make_stack(workers=[], beat=False)  # nothing runs: submitted jobs stay queued
    key = tenant_key(max_queued=2, submit_rps=0)
    with client_for(stack.url, key) as client:
        ids = [client.post("/v1/jobs", json=job_body(f"q{i}")).json()["id"] for i in range(2)]
        refused = client.post("/v1/jobs", json=job_body("q3"))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert "2 or more jobs waiting" in refused.json()["error"]["message"]
        assert int(refused.headers["retry-after"]) >= 1
        # Another tenant's queue is its own.
        with client_for(stack.url, new_key()) as other:
            assert other.post("/v1/jobs", json=job_body("other")).status_code == 202
        assert client.post(f"/v1/jobs/{ids[0]}/cancel").status_code == 200

        def admitted() -> bool:
            return client.post("/v1/jobs", json=job_body("q4")).status_code == 202

        wait_until(admitted, 5, "a submission once a queued job was cancelled")
        assert client.post("/v1/jobs", json=job_body("q5")).status_code == 429


# --- event streams ----------------------------------------------------------------------


_reading: list[AsyncIterator[str]] = []


async def _first_event(response: httpx.Response) -> str:
    # The line iterator is kept: one dropped half-read is closed, and closes the stream.
    lines = response.aiter_lines()
    _reading.append(lines)
    async for line in lines:
        if line.startswith("event:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("the stream ended without an event")


def _ports_connected_to(pid: int, port: int) -> set[int]:
    """Local ports of the process's TCP connections to ``port``, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and int(fields[2].rsplit(":", 1)[1], 16) == port:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _api_redis_connections(stack: MiniStack) -> int:
    """Connections the stack's api process holds to Redis, as Redis's CLIENT LIST sees them."""
    url = stack.env["CHATJOBS_REDIS_URL"]
    api = stack.procs[0].popen
    assert api is not None
    ports = _ports_connected_to(api.pid, urlsplit(url).port or 6379)
    clients = redis.Redis.from_url(url).client_list()
    return sum(1 for c in clients if int(c["addr"].rsplit(":", 1)[1]) in ports)


def test_hundreds_of_open_streams_share_a_bounded_number_of_redis_connections(
    make_stack: Make,
) -> None:
    streams = 300
    stack = make_stack(workers=[], beat=False)
    key = tenant_key(max_streams=0, submit_rps=0)
    with client_for(stack.url, key) as client:
        job_id = client.post("/v1/jobs", json=job_body("streams")).json()["id"]

    async def hold() -> tuple[int, int]:
        limits = httpx.Limits(max_connections=streams + 10)
        headers = {"Authorization": f"Bearer {key}"}
        async with (
            httpx.AsyncClient(
                base_url=stack.url, headers=headers, timeout=60, limits=limits
            ) as aclient,
            contextlib.AsyncExitStack() as opened,
        ):
            first = await opened.enter_async_context(
                aclient.stream("GET", f"/v1/jobs/{job_id}/events")
            )
            assert await _first_event(first) == "status"
            one = await asyncio.to_thread(_api_redis_connections, stack)
            responses = await asyncio.gather(
                *(
                    opened.enter_async_context(aclient.stream("GET", f"/v1/jobs/{job_id}/events"))
                    for _ in range(streams - 1)
                )
            )
            assert all(r.status_code == 200 for r in responses)
            events = await asyncio.gather(*(_first_event(r) for r in responses))
            assert events == ["status"] * (streams - 1)
            many = await asyncio.to_thread(_api_redis_connections, stack)
            return one, many

    one, many = asyncio.run(hold())
    _reading.clear()
    print(f"api redis connections: {one} with 1 stream open, {many} with {streams}")
    # One pub/sub connection for every stream, the limiter's small pool, the publishers.
    assert many <= 16, (one, many)
    assert many - one <= 8, (one, many)


def test_a_tenant_at_its_stream_limit_gets_429_until_a_stream_closes(make_stack: Make) -> None:
    stack = make_stack(workers=[], beat=False)
    key = tenant_key(max_streams=2)
    with client_for(stack.url, key) as client:
        job_id = client.post("/v1/jobs", json=job_body("limit")).json()["id"]

    async def run() -> None:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=30) as aclient:
            url = f"/v1/jobs/{job_id}/events"
            async with aclient.stream("GET", url) as first:
                assert await _first_event(first) == "status"
                async with aclient.stream("GET", url) as second:
                    assert await _first_event(second) == "status"
                    refused = await aclient.get(url)
                    assert refused.status_code == 429, refused.text
                    assert refused.json()["error"]["type"] == "rate_limit_exceeded"
                    assert "2 event streams open" in refused.json()["error"]["message"]
                    assert "retry-after" in refused.headers
                # The closed stream's slot is freed (a moment later: it is freed off the
                # request, which the disconnect cancels).
                deadline = time.monotonic() + 5
                while True:
                    async with aclient.stream("GET", url) as third:
                        if third.status_code == 200:
                            assert await _first_event(third) == "status"
                            break
                    assert time.monotonic() < deadline, "the closed stream's slot stayed taken"
                    await asyncio.sleep(0.2)

    asyncio.run(run())
    _reading.clear()


# --- upstream calls per job --------------------------------------------------------------


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    return write_models_file(tmp_path / "models.toml", SMALL, 2000)


def long_body(marker: str, doc: str) -> dict[str, Any]:
    request = {
        "model": SMALL,
        "messages": [{"role": "user", "content": doc}],
        "max_tokens": 100,
        "x_test": marker,
    }
    return {"request": request}


def test_a_job_needing_more_map_calls_than_allowed_is_refused_with_the_count(
    make_stack: Make, models_file: Path
) -> None:
    stack = make_stack(
        env={"CHATJOBS_MODELS_FILE": str(models_file), "CHATJOBS_TENANT_MAX_CALLS_PER_JOB": "3"},
        workers=[["--concurrency", "2"]],
    )
    marker = uuid.uuid4().hex
    key = new_key()
    with client_for(stack.url, key) as client:
        # Planned at submit: a 422 naming the count, and nothing stored.
        refused = client.post("/v1/jobs", json=long_body(marker, document(12_000)))
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["type"] == "too_many_upstream_calls"
        parts = int(error["message"].split("splits into ")[1].split()[0])
        assert parts > 3 and "limit of 3 upstream calls per job" in error["message"]
        assert sql("SELECT count(*) FROM jobs WHERE request->>'x_test' = :m", m=marker)[0][0] == 0
        # Within the limit: accepted as usual.
        fits = client.post("/v1/jobs", json=long_body(marker, document(3000)))
        assert fits.status_code == 202, fits.text
        # Too large to plan at submit (over 512 KiB): the worker plans it and fails the job.
        big = ("The committee reviewed the quarterly figures in detail. " * 12_000).strip()
        created = client.post("/v1/jobs", json=long_body(marker, big))
        assert created.status_code == 202, created.text
        job = wait_job(client, created.json()["id"], timeout=60)
    assert job["status"] == "failed", job
    assert "splits into" in job["error"]["message"]
    assert "limit of 3 upstream calls per job" in job["error"]["message"]
    assert sql("SELECT count(*) FROM jobs WHERE parent_id = CAST(:id AS uuid)", id=job["id"]) == [
        (0,)
    ]


# --- secrets in upstream errors ---------------------------------------------------------


def test_an_upstream_401_quoting_keys_lands_scrubbed_in_the_job(
    client: httpx.Client, worker: Any, stack_env: dict[str, str]
) -> None:
    operator_key = stack_env["CHATJOBS_UPSTREAM_API_KEY"]
    message = (
        "Incorrect API key provided: sk-***-123. You can find your API key at "
        f"https://platform.openai.com/account/api-keys. (sent: Bearer {operator_key})"
    )
    body = job_body(uuid.uuid4().hex, x_sim={"status": 401, "message": message})
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job = wait_job(client, created.json()["id"], timeout=30)
    assert job["status"] == "failed", job
    error = job["error"]
    assert error["status_code"] == 401
    assert "sk-" not in error["message"] and operator_key not in error["message"]
    assert error["message"].startswith(
        "upstream answered 401: Incorrect API key provided: [redacted]. You can find"
    )
    assert "Bearer [redacted]" in error["message"]
    log = Path(worker.log_path).read_text(errors="replace")
    assert "sk-***-123" not in log
