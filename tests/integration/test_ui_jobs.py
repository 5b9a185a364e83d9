"""The console's jobs pages: the list and its filters, a job's page (capped for big jobs),
cancel and redeliver behind form tokens, tenant isolation, escaping, the statuses the list
polls, and the live status stream (slim, kept alive, ended with the session)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from chatjobs.db import session_scope
from chatjobs.jobs import steps
from chatjobs.models import Job, JobStatus, UpstreamCall
from chatjobs.testing import wait_job
from tests.conftest import MiniStack, new_key
from tests.integration import test_webhooks_events as job_webhooks
from tests.integration.test_reliability import wait_until
from tests.integration.test_webhooks_events import WEBHOOK_ENV, Receiver, deliveries
from tests.integration.ui_helpers import csrf_of, sign_in

pytestmark = pytest.mark.integration
# The job webhook tests' receiver: a real HTTP server on 127.0.0.1 answering per path.
receiver = job_webhooks.receiver

XSS_SCRIPT = "<script>alert(1)</script>"
XSS_IMG = "<img src=x onerror=alert(1)>"


def submit(client: httpx.Client, **fields: Any) -> dict[str, Any]:
    """A job that stays active for a while (the simulator answers after 30 s)."""
    request = {
        "messages": [{"role": "user", "content": f"ui {uuid.uuid4().hex}"}],
        "x_sim": {"latency": 30},
        **fields.pop("request", {}),
    }
    answer = client.post("/v1/jobs", json={"request": request, **fields})
    assert answer.status_code == 202, answer.text
    return dict(answer.json())


def test_every_page_answers_its_owner_and_is_a_404_page_for_another_tenant(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    job = submit(client)
    with sign_in(api_url, api_key) as owner:
        listed = owner.get("/ui/jobs")
        detail = owner.get(f"/ui/jobs/{job['id']}")
        home = owner.get("/ui")
    with sign_in(api_url, new_key()) as other:
        token = csrf_of(other.get("/ui/jobs").text)
        theirs = other.get("/ui/jobs")
        answers = [
            other.get(f"/ui/jobs/{job['id']}"),
            other.get(f"/ui/jobs/{uuid.uuid4()}"),
            other.get("/ui/jobs/not-a-uuid"),
            other.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": token}),
            other.post(
                f"/ui/jobs/{job['id']}/deliveries/{uuid.uuid4()}/redeliver", data={"csrf": token}
            ),
            other.get(f"/ui/jobs/{job['id']}/events"),
        ]
    assert listed.status_code == 200 and job["id"] in listed.text
    assert detail.status_code == 200 and job["request"]["messages"][0]["content"] in detail.text
    assert home.status_code == 303 and home.headers["location"] == "/ui/jobs"
    assert theirs.status_code == 200 and job["id"] not in theirs.text
    assert [a.status_code for a in answers] == [404] * 6
    assert "text/html" in answers[0].headers["content-type"]
    assert answers[0].text == answers[1].text  # another tenant's job looks missing
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] in ("queued", "running")


def test_the_list_filters_and_pages_newest_first(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    a = submit(client, request={"model": "gpt-4.1"})
    b = submit(client, request={"model": "gpt-5-mini"})
    c = submit(client, request={"model": "gpt-4.1"})
    client.post(f"/v1/jobs/{b['id']}/cancel")
    today = datetime.now(UTC).date()
    with sign_in(api_url, api_key) as browser:
        newest = browser.get("/ui/jobs", params={"limit": 2})
        older = browser.get(f"/ui/jobs?limit=2&after={c['id']}")
        by_model = browser.get("/ui/jobs", params={"model": "gpt-4.1"})
        by_status = browser.get("/ui/jobs", params={"status": "cancelled"})
        in_range = browser.get(
            "/ui/jobs", params={"created_from": str(today), "created_to": str(today)}
        )
        tomorrow = browser.get("/ui/jobs", params={"created_from": str(today + timedelta(1))})
        invalid = browser.get("/ui/jobs", params={"status": "nonsense", "created_from": "x"})
        # Dates a date input takes but no instant of ours can be: refused, never a 500.
        extremes = browser.get(
            "/ui/jobs", params={"created_from": "0001-01-01", "created_to": "9999-12-31"}
        )
    assert newest.text.index(c["id"]) < newest.text.index(b["id"]) and a["id"] not in newest.text
    assert 'rel="next"' in newest.text and f"after={b['id']}" in newest.text
    assert a["id"] in older.text and c["id"] not in older.text
    assert {a["id"], c["id"]} <= set(_ids(by_model.text)) and b["id"] not in by_model.text
    assert _ids(by_status.text) == [b["id"]]
    assert _ids(in_range.text) == [c["id"], b["id"], a["id"]]
    assert _ids(tomorrow.text) == []
    assert invalid.status_code == 200 and "Ignored the status filter" in invalid.text
    assert "Ignored the created_from filter" in invalid.text
    assert extremes.status_code == 200 and {a["id"], b["id"], c["id"]} <= set(_ids(extremes.text))
    assert "Ignored the created_from filter" in extremes.text
    assert "Ignored the created_to filter" in extremes.text


def _ids(html: str) -> list[str]:
    return [part.split('"')[0] for part in html.split('href="/ui/jobs/')[1:]]


def test_the_api_lists_by_model_and_created_range_too(client: httpx.Client) -> None:
    job = submit(client, request={"model": "gpt-5-mini"})
    created = datetime.fromisoformat(job["created_at"])
    around = {
        "model": "gpt-5-mini",
        "created_after": created.isoformat(),
        "created_before": (created + timedelta(seconds=1)).isoformat(),
    }
    found = client.get("/v1/jobs", params=around).json()["data"]
    later = client.get(
        "/v1/jobs", params={"created_after": (created + timedelta(seconds=1)).isoformat()}
    ).json()["data"]
    other_model = client.get("/v1/jobs", params={"model": "gpt-4.1"}).json()["data"]
    assert [j["id"] for j in found] == [job["id"]]
    assert later == [] and other_model == []


def test_cancel_needs_the_form_token_then_cancels_once(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    job = submit(client)
    with sign_in(api_url, api_key) as browser:
        page = browser.get(f"/ui/jobs/{job['id']}")
        missing = browser.post(f"/ui/jobs/{job['id']}/cancel", data={})
        wrong = browser.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": "wrong"})
        as_json = browser.post(f"/ui/jobs/{job['id']}/cancel", json={"csrf": csrf_of(page.text)})
        unchanged = client.get(f"/v1/jobs/{job['id']}").json()["status"]
        done = browser.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": csrf_of(page.text)})
        shown = browser.get(done.headers["location"])
        again = browser.post(f"/ui/jobs/{job['id']}/cancel", data={"csrf": csrf_of(page.text)})
        forged_flash = browser.get(f"/ui/jobs/{job['id']}?flash=%3Cb%3Ehi%3C/b%3E")
    assert [r.status_code for r in (missing, wrong, as_json)] == [403, 403, 403]
    assert unchanged in ("queued", "running")
    assert done.status_code == 303
    assert done.headers["location"] == f"/ui/jobs/{job['id']}?flash=cancelled"
    assert "The job was cancelled." in shown.text and ">cancelled<" in shown.text
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    assert again.headers["location"].endswith("flash=not_cancellable")
    assert "<b>hi</b>" not in forged_flash.text and 'class="flash"' not in forged_flash.text


def test_request_and_result_text_render_escaped(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    job = submit(
        client,
        request={
            "messages": [
                {"role": "system", "content": XSS_IMG},
                {"role": "user", "content": [{"type": "text", "text": XSS_SCRIPT}]},
            ]
        },
        metadata={"note": XSS_SCRIPT},
    )
    result = {
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": f"{XSS_SCRIPT} and {XSS_IMG}"},
            }
        ],
    }
    with session_scope() as session:  # as a worker would have stored it
        session.execute(
            update(Job)
            .where(Job.id == uuid.UUID(job["id"]))
            .values(status=JobStatus.succeeded, result=result, completed_at=datetime.now(UTC))
        )
    with sign_in(api_url, api_key) as browser:
        page = browser.get(f"/ui/jobs/{job['id']}")
        listed = browser.get("/ui/jobs")
    assert page.status_code == 200
    for html in (page.text, listed.text):
        assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert page.text.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # request, result, meta


def test_statuses_answer_the_owners_jobs_only_in_one_json_object(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    mine = [submit(client) for _ in range(3)]
    client.post(f"/v1/jobs/{mine[0]['id']}/cancel")
    with httpx.Client(base_url=api_url, headers=_bearer(new_key())) as other:
        theirs = submit(other)
    ids = [j["id"] for j in mine] + [theirs["id"], str(uuid.uuid4())]
    with httpx.Client(base_url=api_url, follow_redirects=False) as anonymous:
        refused = anonymous.get("/ui/jobs/statuses", params={"id": ids})
    with sign_in(api_url, api_key) as browser:
        answer = browser.get("/ui/jobs/statuses", params={"id": ids})
        none = browser.get("/ui/jobs/statuses")
        page = browser.get("/ui/jobs/statuses", params={"id": [str(uuid.uuid4())] * 50})
        too_many = browser.get("/ui/jobs/statuses", params={"id": [str(uuid.uuid4())] * 51})
        garbage = browser.get("/ui/jobs/statuses", params={"id": [mine[1]["id"], "x<script>"]})
    assert refused.status_code == 303 and "/ui/sign-in" in refused.headers["location"]
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    found = answer.json()
    assert found.keys() == {j["id"] for j in mine}  # another tenant's and a missing id: absent
    assert found[mine[0]["id"]] == "cancelled"
    assert {found[j["id"]] for j in mine[1:]} <= {"queued", "running"}
    assert none.status_code == 200 and none.json() == {}
    assert page.status_code == 200 and page.json() == {}
    assert too_many.status_code == 400 and garbage.status_code == 400
    assert "<script>" not in garbage.text


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_big_jobs_page_caps_steps_and_calls_and_cuts_long_text(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    document = "D" * 1990 + "<b>" + "E" * 5000  # its cut falls inside the markup
    job = submit(client, request={"messages": [{"role": "user", "content": document}]})
    chunk = "CHUNK-TEXT-" * 500  # what a map step's request carries: never on the page
    with session_scope() as session:  # as a planned map-reduce would have them
        parent = session.get_one(Job, uuid.UUID(job["id"]))
        made = steps.insert_steps(
            session, parent, "map", 0, [{"messages": [{"role": "user", "content": chunk}]}] * 210,
            [1] * 210,
        )  # fmt: skip
        session.execute(
            update(Job)
            .where(Job.id.in_(made))
            .values(status=JobStatus.succeeded, result={"chunk": chunk}, next_attempt_at=None)
        )
        session.add_all(
            UpstreamCall(
                job_id=made[i % len(made)], tenant_id=parent.tenant_id, claim_seq=1, attempt=1,
                model=parent.model, status_code=200, latency_ms=i, request_id=f"req-{i:04d}",
            )
            for i in range(205)
        )  # fmt: skip
    with sign_in(api_url, api_key) as browser:
        page = browser.get(f"/ui/jobs/{job['id']}")
    client.post(f"/v1/jobs/{job['id']}/cancel")
    html = page.text
    assert page.status_code == 200
    assert "Showing 200 of 210 steps" in html and f"GET /v1/jobs/{job['id']}/steps" in html
    assert html.count('<td class="status" data-status="succeeded">') == 200
    assert "Showing the newest 200 of 205 calls" in html
    assert "req-0204" in html and "req-0004" not in html  # newest first
    assert "CHUNK-TEXT" not in html
    # The message: its first 2,000 characters once, its length, where the whole is.
    assert html.count("D" * 1990 + "&lt;b&gt;") == 1 and "E" * 8 not in html
    assert "6,993 characters in all" in html and f"GET /v1/jobs/{job['id']}</code>" in html
    assert "<details" not in html.split("<h2>Result</h2>")[0]
    assert len(html) < 150_000


def test_the_event_stream_needs_a_session_and_streams_the_status(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    job = submit(client)
    client.post(f"/v1/jobs/{job['id']}/cancel")  # a finished job: status, then done
    with httpx.Client(base_url=api_url, follow_redirects=False) as anonymous:
        refused = anonymous.get(f"/ui/jobs/{job['id']}/events")
    with sign_in(api_url, api_key) as browser:
        streamed = browser.get(f"/ui/jobs/{job['id']}/events")
    assert refused.status_code == 303
    assert streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    # Only the status: the page shows nothing else (the API's stream sends the whole job).
    assert streamed.text.startswith('event: status\ndata: {"status": "cancelled"}\n\n')
    assert job["id"] not in streamed.text
    assert "event: done" in streamed.text


def test_the_event_stream_keeps_alive_and_ends_with_the_session(
    api_url: str, client: httpx.Client, api_key: str
) -> None:
    job = submit(client, request={"x_sim": {"latency": 60}})
    lines: list[str] = []
    with sign_in(api_url, api_key) as browser:
        token = csrf_of(browser.get("/ui/jobs").text)
        started = time.monotonic()
        with browser.stream("GET", f"/ui/jobs/{job['id']}/events", timeout=60) as stream:
            for line in stream.iter_lines():
                lines.append(line)
                if line == ": keepalive" and lines.count(line) == 1:
                    signed_out = browser.post("/ui/sign-out", data={"csrf": token})
        took = time.monotonic() - started
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert signed_out.status_code == 303
    assert lines[0] == "event: status" and ": keepalive" in lines
    # Ended by the session check (every 30 s), well before the job's 60 s; no `done`.
    assert "event: done" not in lines and took < 45, (took, lines)


def test_redeliver_needs_the_form_token_and_resends_under_the_same_webhook_id(
    make_stack: Callable[..., MiniStack], api_key: str, receiver: Receiver
) -> None:
    stack = make_stack(env=WEBHOOK_ENV)
    with stack.client(api_key) as client:
        answer = client.post(
            "/v1/jobs",
            json={
                "request": {"messages": [{"role": "user", "content": "hook"}]},
                "webhook_url": f"{receiver.base}/ok",
            },
        )
        job = answer.json()
        wait_job(client, job["id"])
        wait_until(lambda: len(receiver.on("/ok")) == 1, 15, "the first delivery")
        (delivery,) = deliveries(client, job["id"])
        action = f"/ui/jobs/{job['id']}/deliveries/{delivery['id']}/redeliver"
        with sign_in(stack.url, api_key) as browser:
            page = browser.get(f"/ui/jobs/{job['id']}")
            refused = browser.post(action, data={"csrf": "wrong"})
            unchanged = deliveries(client, job["id"])[0]["status"]
            done = browser.post(action, data={"csrf": csrf_of(page.text)})
            wait_until(lambda: len(receiver.on("/ok")) == 2, 15, "the redelivery")
            shown = browser.get(done.headers["location"])
    assert page.status_code == 200 and delivery["webhook_id"] in page.text
    assert action in page.text and "job.succeeded" in page.text
    assert refused.status_code == 403 and unchanged == "succeeded"
    assert done.status_code == 303 and done.headers["location"].endswith("flash=redelivering")
    first, second = receiver.on("/ok")
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    assert "sent again" in shown.text and "Upstream calls" in shown.text


def test_the_api_stream_keeps_alive_too_and_still_sends_the_whole_job(
    api_url: str, client: httpx.Client
) -> None:
    job = submit(client, request={"x_sim": {"latency": 60}})
    lines: list[str] = []
    with client.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=60) as stream:
        for line in stream.iter_lines():
            lines.append(line)
            if line == ": keepalive":
                break
    client.post(f"/v1/jobs/{job['id']}/cancel")
    first = json.loads(lines[1].removeprefix("data: "))
    assert lines[0] == "event: status" and first["id"] == job["id"] and "request" in first
    assert lines[-1] == ": keepalive"
