"""The HTTP surface on its own: validation, tenancy, idempotency, limits, health.

Real api process, real Postgres and Redis; no worker needed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from tests.conftest import new_key

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "What are the three laws of thermodynamics?"}]


def submit(client: httpx.Client, request: dict[str, Any], **extra: Any) -> httpx.Response:
    return client.post("/v1/jobs", json={"request": request, **extra})


def assert_rejected(response: httpx.Response, param: str, rule: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert any(d["param"] == param and d["rule"] == rule for d in error["details"]), error
    assert param in error["message"]


# --- validation: one test per rule of the seed schema, both sides of each bound -----------


@pytest.mark.parametrize("value", [0, 2, 0.7])
def test_temperature_within_0_and_2_is_accepted(client: httpx.Client, value: float) -> None:
    assert submit(client, {"messages": MESSAGES, "temperature": value}).status_code == 202


def test_temperature_above_2_is_rejected(client: httpx.Client) -> None:
    response = submit(client, {"messages": MESSAGES, "temperature": 2.01})
    assert_rejected(response, "request.temperature", "less_than_equal")


def test_temperature_below_0_is_rejected(client: httpx.Client) -> None:
    response = submit(client, {"messages": MESSAGES, "temperature": -0.01})
    assert_rejected(response, "request.temperature", "greater_than_equal")


def test_temperature_as_a_string_is_rejected(client: httpx.Client) -> None:
    response = submit(client, {"messages": MESSAGES, "temperature": "0.5"})
    assert_rejected(response, "request.temperature", "float_type")


def test_top_p_bounds(client: httpx.Client) -> None:
    assert submit(client, {"messages": MESSAGES, "top_p": 0}).status_code == 202
    assert submit(client, {"messages": MESSAGES, "top_p": 1}).status_code == 202
    assert_rejected(
        submit(client, {"messages": MESSAGES, "top_p": -0.1}), "request.top_p", "greater_than_equal"
    )
    assert_rejected(
        submit(client, {"messages": MESSAGES, "top_p": 1.01}), "request.top_p", "less_than_equal"
    )


@pytest.mark.parametrize("field", ["frequency_penalty", "presence_penalty"])
def test_penalty_bounds(client: httpx.Client, field: str) -> None:
    assert submit(client, {"messages": MESSAGES, field: -2}).status_code == 202
    assert submit(client, {"messages": MESSAGES, field: 2}).status_code == 202
    assert_rejected(
        submit(client, {"messages": MESSAGES, field: -2.1}),
        f"request.{field}",
        "greater_than_equal",
    )
    assert_rejected(
        submit(client, {"messages": MESSAGES, field: 2.1}), f"request.{field}", "less_than_equal"
    )


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
def test_output_budget_must_be_above_zero(client: httpx.Client, field: str) -> None:
    assert submit(client, {"messages": MESSAGES, field: 1}).status_code == 202
    assert_rejected(
        submit(client, {"messages": MESSAGES, field: 0}), f"request.{field}", "greater_than"
    )


def test_role_outside_the_enum_is_rejected(client: httpx.Client) -> None:
    for role in ("system", "developer", "user", "assistant", "tool"):
        messages = [{"role": role, "content": "x"}, *MESSAGES]
        assert submit(client, {"messages": messages}).status_code == 202, role
    response = submit(client, {"messages": [{"role": "robot", "content": "x"}]})
    assert_rejected(response, "request.messages[0].role", "literal_error")


def test_content_must_be_string_null_or_array(client: httpx.Client) -> None:
    for content in ("text", None, [{"type": "text", "text": "hi"}]):
        messages = [{"role": "user", "content": content}]
        assert submit(client, {"messages": messages}).status_code == 202, content
    response = submit(client, {"messages": [{"role": "user", "content": 5}]})
    assert_rejected(response, "request.messages[0].content", "value_error")
    assert "string, null or an array" in response.json()["error"]["message"]


def test_content_is_required_on_each_message(client: httpx.Client) -> None:
    response = submit(client, {"messages": [{"role": "user"}]})
    assert_rejected(response, "request.messages[0].content", "missing")


def test_missing_messages_is_rejected(client: httpx.Client) -> None:
    assert_rejected(submit(client, {"temperature": 1}), "request.messages", "missing")


def test_stream_options_is_closed(client: httpx.Client) -> None:
    ok = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    assert submit(client, ok).status_code == 202
    response = submit(client, {"messages": MESSAGES, "stream_options": {"x": 1}})
    assert_rejected(response, "request.stream_options.x", "extra_forbidden")


def test_stream_must_be_boolean(client: httpx.Client) -> None:
    assert_rejected(
        submit(client, {"messages": MESSAGES, "stream": "yes"}), "request.stream", "bool_type"
    )


def test_tools_tool_choice_and_response_format_are_accepted(client: httpx.Client) -> None:
    request = {
        "messages": MESSAGES,
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
    }
    assert submit(client, request).status_code == 202


def test_unknown_top_level_key_is_stored_unchanged(client: httpx.Client) -> None:
    request = {"messages": MESSAGES, "max_tokens": 500, "seed": 42, "vendor": {"a": [1, 2]}}
    job = submit(client, request).json()
    assert job["request"] == request
    assert isinstance(job["request"]["max_tokens"], int)


def test_body_that_is_not_json_is_a_422(client: httpx.Client) -> None:
    response = client.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert response.json()["error"]["param"] == "body"


def test_unknown_route_answers_in_the_error_envelope(client: httpx.Client) -> None:
    response = client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"


def test_unknown_job_field_is_rejected(client: httpx.Client) -> None:
    assert_rejected(
        submit(client, {"messages": MESSAGES}, colour="red"), "colour", "extra_forbidden"
    )


# --- the read shape ----------------------------------------------------------------------


def test_submit_answers_202_with_the_job(client: httpx.Client) -> None:
    response = submit(client, {"messages": MESSAGES}, metadata={"doc": "a-1"})
    assert response.status_code == 202
    job = response.json()
    assert uuid.UUID(job["id"])
    assert job["status"] in {"queued", "running", "succeeded"}
    assert job["model"] == "gpt-4.1"
    assert job["metadata"] == {"doc": "a-1"}
    assert job["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert job["attempts"] == 0 or job["status"] != "queued"
    for key in ("result", "error", "created_at", "started_at", "completed_at", "progress"):
        assert key in job


# --- tenancy -----------------------------------------------------------------------------


@pytest.fixture
def other(api_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {new_key()}"}) as c:
        yield c


def test_another_tenants_job_is_a_404_like_a_missing_one(
    client: httpx.Client, other: httpx.Client
) -> None:
    job = submit(client, {"messages": MESSAGES}).json()
    missing = other.get(f"/v1/jobs/{uuid.uuid4()}")
    theirs = other.get(f"/v1/jobs/{job['id']}")
    assert missing.status_code == theirs.status_code == 404
    assert theirs.json()["error"]["type"] == missing.json()["error"]["type"] == "not_found"
    assert other.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200


def test_lists_show_only_the_callers_jobs(client: httpx.Client, other: httpx.Client) -> None:
    mine = {submit(client, {"messages": MESSAGES}).json()["id"] for _ in range(3)}
    theirs = {submit(other, {"messages": MESSAGES}).json()["id"]}
    listed = {j["id"] for j in client.get("/v1/jobs", params={"limit": 100}).json()["data"]}
    assert listed == mine
    listed_other = {j["id"] for j in other.get("/v1/jobs").json()["data"]}
    assert listed_other == theirs


def test_missing_or_bad_key_is_a_401(api_url: str) -> None:
    with httpx.Client(base_url=api_url) as anonymous:
        assert anonymous.get("/v1/jobs").status_code == 401
        for header in ("Bearer cj_not-a-key", "Basic abc", "Bearer"):
            response = anonymous.get("/v1/jobs", headers={"Authorization": header})
            assert response.status_code == 401, header
            assert response.json()["error"]["type"] == "authentication_error"


def test_no_plaintext_key_is_stored(stack_env: dict[str, str]) -> None:
    from chatjobs.db import session_scope
    from chatjobs.models import ApiKey
    from chatjobs.tenants import hash_key

    key = new_key()
    with session_scope() as session:
        rows = session.execute(select(ApiKey.key_hash, ApiKey.prefix)).all()
    assert all(key not in (row.key_hash, row.prefix) for row in rows)
    assert hash_key(key) in {row.key_hash for row in rows}


# --- listing -----------------------------------------------------------------------------


def test_cursor_pagination_walks_every_job_once(client: httpx.Client) -> None:
    ids = [submit(client, {"messages": MESSAGES}).json()["id"] for _ in range(5)]
    seen: list[str] = []
    after = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if after:
            params["after"] = after
        page = client.get("/v1/jobs", params=params).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == list(reversed(ids))


def test_status_filter_and_its_validation(client: httpx.Client) -> None:
    # Slow at the simulator, so a worker of the session cannot finish it before the cancel.
    job = submit(client, {"messages": MESSAGES, "x_sim": {"latency": 5}}).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in cancelled] == [job["id"]]
    assert client.get("/v1/jobs", params={"status": "nope"}).status_code == 422
    assert client.get("/v1/jobs", params={"limit": 0}).status_code == 422


# --- idempotency -------------------------------------------------------------------------


def test_same_idempotency_key_and_body_returns_the_same_job(client: httpx.Client) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"request": {"messages": MESSAGES}, "metadata": {"n": 1}}
    first = client.post("/v1/jobs", json=body, headers=key)
    second = client.post("/v1/jobs", json=body, headers=key)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["Idempotent-Replayed"] == "true"
    listed = client.get("/v1/jobs", params={"limit": 100}).json()["data"]
    assert [j["id"] for j in listed] == [first.json()["id"]]


def test_same_idempotency_key_with_another_body_is_a_409(client: httpx.Client) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    client.post("/v1/jobs", json={"request": {"messages": MESSAGES}}, headers=key)
    response = client.post(
        "/v1/jobs", json={"request": {"messages": MESSAGES, "temperature": 1}}, headers=key
    )
    assert response.status_code == 409
    assert "Idempotency-Key" in response.json()["error"]["message"]


def test_idempotency_keys_are_per_tenant(client: httpx.Client, other: httpx.Client) -> None:
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"request": {"messages": MESSAGES}}
    a = client.post("/v1/jobs", json=body, headers=key).json()["id"]
    b = other.post("/v1/jobs", json=body, headers=key).json()["id"]
    assert a != b


# --- limits and health -------------------------------------------------------------------


def test_oversize_chunked_body_without_content_length_is_a_413(client: httpx.Client) -> None:
    def body() -> Iterator[bytes]:
        yield b'{"request": {"messages": [{"role": "user", "content": "'
        for _ in range(11):
            yield b"x" * (1024 * 1024)
        yield b'"}]}}'

    response = client.post("/v1/jobs", content=body(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "request_too_large"


def test_oversize_declared_body_is_a_413(client: httpx.Client) -> None:
    payload = (
        b'{"request": {"messages": [{"role": "user", "content": "'
        + (b"x" * (10 * 1024 * 1024))
        + b'"}]}}'
    )
    response = client.post(
        "/v1/jobs", content=payload, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413


def test_body_just_under_the_limit_is_accepted(client: httpx.Client) -> None:
    filler = "x" * (9 * 1024 * 1024)
    response = submit(client, {"messages": [{"role": "user", "content": filler}]})
    assert response.status_code == 202


def test_health_and_readiness(api_url: str) -> None:
    assert httpx.get(f"{api_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api_url}/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}


def test_openapi_is_served(api_url: str) -> None:
    spec = httpx.get(f"{api_url}/openapi.json").json()
    assert "/v1/jobs" in spec["paths"]
    assert httpx.get(f"{api_url}/docs").status_code == 200
