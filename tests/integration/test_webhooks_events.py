"""Webhook delivery (signed, retried, logged, SSRF-safe) and live job events over SSE."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import standardwebhooks
from sqlalchemy import select, update

from chatjobs import deliveries as delivery_state
from chatjobs import jobs
from chatjobs.db import session_scope
from chatjobs.models import WebhookDelivery
from chatjobs.schemas import JobCreate
from chatjobs.settings import get_settings
from chatjobs.testing import wait_job
from chatjobs.webhooks import DeliveryResult
from tests.conftest import MiniStack
from tests.integration.test_reliability import wait_until
from worker import webhook

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]
WEBHOOK_ENV = {
    "CHATJOBS_WEBHOOK_ALLOW_PRIVATE": "127.0.0.0/8",
    "CHATJOBS_WEBHOOK_RETRY_SCHEDULE": "0,1,1,1",
}


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A real HTTP receiver on 127.0.0.1 that answers per path and records every request."""

    hits: list[Hit] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    canary_port: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def base(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def on(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]


def _serve(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    canary_hits: list[str] = []

    class Canary(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            canary_hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    canary = _serve(Canary)
    rec.canary_port = canary.server_address[1]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            rec.hits.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            n = rec.counts[self.path] = rec.counts.get(self.path, 0) + 1
            if self.path == "/flaky" and n == 1:
                self.send_response(500)
            elif self.path == "/redirect":
                self.send_response(302)
                self.send_header("location", f"http://127.0.0.1:{rec.canary_port}/internal")
            elif self.path == "/gone":
                self.send_response(410)
            elif self.path == "/slow":
                time.sleep(3)
                self.send_response(200)
            else:
                self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    rec.server = _serve(Handler)
    yield rec
    rec.server.shutdown()
    rec.server.server_close()
    canary.shutdown()
    canary.server_close()
    assert canary_hits == [], f"the canary was reached: {canary_hits}"


def secrets_of(client: httpx.Client) -> list[str]:
    return [s["secret"] for s in client.get("/v1/webhooks/secret").json()["data"]]


def submit(client: httpx.Client, url: str, **request: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": f"hook {uuid.uuid4().hex}"}], **request}
    response = client.post("/v1/jobs", json={"request": body, "webhook_url": url})
    assert response.status_code == 202, response.text
    return dict(response.json())


def deliveries(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/jobs/{job_id}/deliveries").json())


def test_a_finished_job_is_delivered_signed_and_verifies(
    make_stack: Make, api_key: str, receiver: Receiver
) -> None:
    stack = make_stack(env=WEBHOOK_ENV)
    with stack.client(api_key) as client:
        job = submit(client, f"{receiver.base}/ok")
        wait_job(client, job["id"])
        wait_until(lambda: len(receiver.on("/ok")) == 1, 15, "the delivery arrived")
        (hit,) = receiver.on("/ok")
        (secret,) = secrets_of(client)
        payload = standardwebhooks.Webhook(secret).verify(hit.body, hit.headers)
        record = deliveries(client, job["id"])
    assert secret.startswith("whsec_")
    assert payload["type"] == "job.succeeded"
    assert payload["data"]["id"] == job["id"] and payload["data"]["status"] == "succeeded"
    assert hit.headers["webhook-id"].startswith("msg_")
    (delivery,) = record
    assert delivery["status"] == "succeeded" and delivery["webhook_id"] == hit.headers["webhook-id"]
    assert [a["status_code"] for a in delivery["attempts"]] == [200]

    tampered = hit.body.replace(b"succeeded", b"failed")
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(tampered, hit.headers)
    late = {**hit.headers, "webhook-timestamp": str(int(hit.headers["webhook-timestamp"]) + 1)}
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(hit.body, late)


def test_a_500_is_retried_under_the_same_webhook_id(
    make_stack: Make, api_key: str, receiver: Receiver
) -> None:
    stack = make_stack(env=WEBHOOK_ENV)
    with stack.client(api_key) as client:
        job = submit(client, f"{receiver.base}/flaky")
        wait_until(lambda: len(receiver.on("/flaky")) == 2, 20, "a retry after the 500")
        hits = receiver.on("/flaky")
        wait_until(lambda: deliveries(client, job["id"])[0]["status"] == "succeeded", 10, "done")
        (delivery,) = deliveries(client, job["id"])
    assert hits[0].headers["webhook-id"] == hits[1].headers["webhook-id"]
    assert hits[0].body == hits[1].body
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]


def test_a_redirect_is_never_followed(make_stack: Make, api_key: str, receiver: Receiver) -> None:
    stack = make_stack(env=WEBHOOK_ENV)
    with stack.client(api_key) as client:
        job = submit(client, f"{receiver.base}/redirect")
        wait_until(
            lambda: (
                deliveries(client, job["id"])
                and deliveries(client, job["id"])[0]["status"] == "failed"
            ),
            20,
            "gave up",
        )
        (delivery,) = deliveries(client, job["id"])
    assert [a["status_code"] for a in delivery["attempts"]] == [302] * 4
    # The receiver fixture asserts the canary (the redirect target) saw nothing.


def test_a_410_stops_deliveries(make_stack: Make, api_key: str, receiver: Receiver) -> None:
    stack = make_stack(env=WEBHOOK_ENV)
    with stack.client(api_key) as client:
        job = submit(client, f"{receiver.base}/gone")
        wait_until(
            lambda: (
                deliveries(client, job["id"])
                and deliveries(client, job["id"])[0]["status"] == "gone"
            ),
            15,
            "gone",
        )
        time.sleep(1.5)
        (delivery,) = deliveries(client, job["id"])
    assert len(receiver.on("/gone")) == 1
    assert [a["status_code"] for a in delivery["attempts"]] == [410]


def _status_of_only_delivery(client: httpx.Client, job_id: str) -> str | None:
    found = deliveries(client, job_id)
    return str(found[0]["status"]) if found else None


def test_a_410_disables_the_url_for_that_tenant_until_it_is_enabled(
    make_stack: Make, api_key: str, receiver: Receiver
) -> None:
    from tests.conftest import new_key

    url = f"{receiver.base}/gone"
    stack = make_stack(env=WEBHOOK_ENV)
    with stack.client(api_key) as client, stack.client(new_key()) as other:
        first = submit(client, url)
        wait_until(lambda: _status_of_only_delivery(client, first["id"]) == "gone", 15, "gone")
        (disabled,) = client.get("/v1/webhooks/disabled").json()["data"]
        (refused,) = deliveries(client, first["id"])

        later = submit(client, url)
        wait_job(client, later["id"])
        wait_until(lambda: _status_of_only_delivery(client, later["id"]) == "gone", 15, "gone")
        time.sleep(1.5)  # time enough to have sent it, were it sent
        (skipped,) = deliveries(client, later["id"])
        assert len(receiver.on("/gone")) == 1

        # Per tenant: another tenant's events to the same URL are still sent.
        assert other.get("/v1/webhooks/disabled").json()["data"] == []
        submit(other, url)
        wait_until(lambda: len(receiver.on("/gone")) == 2, 15, "the other tenant's delivery")

        resend = client.post(f"/v1/jobs/{later['id']}/deliveries/{skipped['id']}/redeliver")
        enabled = client.post("/v1/webhooks/enable", json={"url": url})
        again = client.post("/v1/webhooks/enable", json={"url": url})
        after = client.get("/v1/webhooks/disabled").json()["data"]
        third = submit(client, url)
        wait_until(lambda: len(receiver.on("/gone")) == 3, 15, "delivered after enabling")
        wait_until(lambda: _status_of_only_delivery(client, third["id"]) == "gone", 15, "gone")

    assert disabled["url"] == url and disabled["status_code"] == 410
    assert disabled["webhook_id"] == refused["webhook_id"]
    assert [a["status_code"] for a in refused["attempts"]] == [410]
    assert skipped["attempts"] == [] and "disabled" in skipped["last_error"]
    assert resend.status_code == 409
    assert resend.json()["error"]["type"] == "conflict"
    assert "disabled" in resend.json()["error"]["message"]
    assert enabled.status_code == 200 and enabled.json() == {"url": url, "enabled": True}
    assert again.status_code == 404 and again.json()["error"]["type"] == "not_found"
    assert after == []


def test_a_delivery_queued_before_its_url_was_disabled_is_recorded_gone_and_never_sent(
    tenant: uuid.UUID, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In-process, on a queue of its own: the race where an event was queued (pending) just
    # before another delivery's 410 disabled the URL, and the dispatcher publishes it anyway.
    monkeypatch.setenv("CHATJOBS_WEBHOOK_ALLOW_PRIVATE", "127.0.0.0/8")
    get_settings.cache_clear()
    webhook.allowlist.cache_clear()
    url = f"{receiver.base}/ok"
    body = JobCreate.model_validate(
        {"request": {"messages": [{"role": "user", "content": "x"}]}, "webhook_url": url}
    )
    with session_scope() as session:
        ids = [jobs.create_job(session=session, tenant_id=tenant, body=body).job.id for _ in "ab"]
        delivery_state.queue_events(session, ids, "job.succeeded")
        first, second = (
            session.scalars(select(WebhookDelivery.id).where(WebhookDelivery.job_id == i)).one()
            for i in ids
        )
        claimed = delivery_state.claim(session, first)
        assert claimed is not None
    with session_scope() as session:
        gone = DeliveryResult(410, 5, error="receiver answered 410")
        assert delivery_state.record_attempt(session, claimed, gone) == "gone"
        # As if the second was queued by a transaction that had not seen the 410 yet.
        session.execute(
            update(WebhookDelivery)
            .where(WebhookDelivery.id == second)
            .values(status="pending", last_error=None)
        )
    outcome = webhook.deliver(second)
    webhook.allowlist.cache_clear()
    with session_scope() as session:
        row = session.get_one(WebhookDelivery, second)
        status, error, attempts = row.status, row.last_error, row.attempts
    assert outcome == "gone" and status == "gone" and attempts == 0
    assert error is not None and "disabled" in error
    assert receiver.hits == []


def test_redeliver_while_an_attempt_is_in_flight_is_a_409_naming_the_state(
    make_stack: Make, api_key: str, receiver: Receiver
) -> None:
    stack = make_stack(env=WEBHOOK_ENV)
    with stack.client(api_key) as client:
        job = submit(client, f"{receiver.base}/slow")
        wait_until(
            lambda: _status_of_only_delivery(client, job["id"]) == "delivering", 15, "in flight"
        )
        (delivery,) = deliveries(client, job["id"])
        busy = client.post(f"/v1/jobs/{job['id']}/deliveries/{delivery['id']}/redeliver")
        wait_until(lambda: _status_of_only_delivery(client, job["id"]) == "succeeded", 15, "sent")
        later = client.post(f"/v1/jobs/{job['id']}/deliveries/{delivery['id']}/redeliver")
        unknown = client.post(f"/v1/jobs/{job['id']}/deliveries/{uuid.uuid4()}/redeliver")
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["type"] == "conflict"
    assert "delivering" in busy.json()["error"]["message"]
    assert later.status_code == 200 and later.json()["status"] == "pending"
    assert unknown.status_code == 404


def test_cancel_emits_job_cancelled_and_redelivery_reuses_the_webhook_id(
    make_stack: Make, api_key: str, receiver: Receiver
) -> None:
    stack = make_stack(env=WEBHOOK_ENV, workers=[])  # nothing runs: cancel a queued job
    stack.start_worker("--concurrency", "4")
    with stack.client(api_key) as client:
        job = submit(client, f"{receiver.base}/ok", x_sim={"latency": 30})
        wait_job(client, job["id"], until={"running"})
        client.post(f"/v1/jobs/{job['id']}/cancel")
        wait_until(lambda: len(receiver.on("/ok")) == 1, 15, "the cancel event")
        first = receiver.on("/ok")[0]
        (delivery,) = deliveries(client, job["id"])
        again = client.post(f"/v1/jobs/{job['id']}/deliveries/{delivery['id']}/redeliver")
        assert again.status_code == 200
        wait_until(lambda: len(receiver.on("/ok")) == 2, 15, "the redelivery")
        (secret,) = secrets_of(client)
    assert json.loads(first.body)["type"] == "job.cancelled"
    second = receiver.on("/ok")[1]
    assert second.headers["webhook-id"] == first.headers["webhook-id"]
    standardwebhooks.Webhook(secret).verify(second.body, second.headers)


def test_during_a_rotation_both_secrets_sign(
    make_stack: Make, api_key: str, receiver: Receiver
) -> None:
    stack = make_stack(env=WEBHOOK_ENV)
    with stack.client(api_key) as client:
        (old,) = secrets_of(client)
        rotated = client.post("/v1/webhooks/secret/rotate", json={"overlap_seconds": 3600})
        new = rotated.json()["data"][0]["secret"]
        assert new != old and {s["secret"] for s in rotated.json()["data"]} == {old, new}
        submit(client, f"{receiver.base}/ok")
        wait_until(lambda: len(receiver.on("/ok")) == 1, 15, "delivered")
    hit = receiver.on("/ok")[0]
    assert len(hit.headers["webhook-signature"].split()) == 2
    standardwebhooks.Webhook(old).verify(hit.body, hit.headers)
    standardwebhooks.Webhook(new).verify(hit.body, hit.headers)


# --- SSRF -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://10.0.0.1/hook",
        "http://172.16.5.4/hook",
        "http://192.168.1.1/hook",
        "http://100.64.0.1/hook",
        "http://169.254.169.254/latest",
        "http://0.0.0.0/hook",
        "http://[::1]/hook",
        "http://[fe80::1]/hook",
        "http://[fd00::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://2130706433/hook",
        "http://0x7f.0.0.1/hook",
        "http://0177.0.0.1/hook",
        "http://127.1/hook",
        "ftp://example.com/hook",
        "http://user:pw@example.com/hook",
    ],
)
def test_a_refused_literal_address_is_a_422_at_submit(client: httpx.Client, url: str) -> None:
    response = client.post(
        "/v1/jobs",
        json={"request": {"messages": [{"role": "user", "content": "x"}]}, "webhook_url": url},
    )
    assert response.status_code == 422, url
    assert response.json()["error"]["param"] == "webhook_url"


def test_a_hostname_resolving_to_loopback_is_blocked_at_delivery(
    client: httpx.Client, worker: Any, receiver: Receiver
) -> None:
    # The session stack has no allowlist. "localhost" passes the literal check at submit,
    # then resolves to 127.0.0.1 and is refused without a connection.
    port = receiver.base.rsplit(":", 1)[1]
    job = submit(client, f"http://localhost:{port}/ok")
    wait_job(client, job["id"])
    wait_until(
        lambda: (
            deliveries(client, job["id"])
            and deliveries(client, job["id"])[0]["status"] == "blocked"
        ),
        15,
        "blocked",
    )
    (delivery,) = deliveries(client, job["id"])
    assert delivery["attempts"][0]["blocked"] is True
    assert "loopback" in delivery["attempts"][0]["error"]
    assert receiver.hits == []


# --- live events -----------------------------------------------------------------------


def read_events(url: str, key: str, job_id: str, out: list[tuple[str, Any]]) -> None:
    with (
        httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        ) as client,
        client.stream("GET", f"/v1/jobs/{job_id}/events") as r,
    ):
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event:
                out.append((event, json.loads(line[6:])))
                if event == "done":
                    return


def test_events_show_queued_running_succeeded_and_every_delta_in_order(
    make_stack: Make, api_key: str, sim: httpx.Client
) -> None:
    sim.post("/_sim/config", json={"stream_chunk_delay": 0.05})
    stack = make_stack(workers=[])
    with stack.client(api_key) as client:
        job = client.post(
            "/v1/jobs",
            json={
                "request": {
                    "messages": [{"role": "user", "content": "Tell me a story."}],
                    "stream": True,
                    "max_tokens": 40,
                }
            },
        ).json()
        seen: list[tuple[str, Any]] = []
        reader = threading.Thread(target=read_events, args=(stack.url, api_key, job["id"], seen))
        reader.start()
        wait_until(lambda: bool(seen), 10, "the first event")
        stack.start_worker()
        reader.join(60)
        final = client.get(f"/v1/jobs/{job['id']}").json()
    statuses = [data["status"] for kind, data in seen if kind == "status"]
    assert statuses == ["queued", "running", "succeeded"]
    deltas = [data for kind, data in seen if kind == "delta"]
    streamed = "".join(d.get("delta", {}).get("content") or "" for d in deltas)
    assert len(deltas) > 3
    assert streamed == final["result"]["choices"][0]["message"]["content"]
    assert seen[-1] == ("done", {"status": "succeeded"})


def test_a_late_client_gets_the_final_state_first(
    client: httpx.Client, worker: Any, api_url: str, api_key: str
) -> None:
    job = client.post(
        "/v1/jobs", json={"request": {"messages": [{"role": "user", "content": "late"}]}}
    ).json()
    wait_job(client, job["id"])
    seen: list[tuple[str, Any]] = []
    read_events(api_url, api_key, job["id"], seen)
    assert [kind for kind, _ in seen] == ["status", "done"]
    assert seen[0][1]["status"] == "succeeded" and seen[0][1]["result"] is not None


def test_events_for_another_tenants_job_are_a_404(client: httpx.Client, api_url: str) -> None:
    from tests.conftest import new_key

    job = client.post(
        "/v1/jobs", json={"request": {"messages": [{"role": "user", "content": "mine"}]}}
    ).json()
    other = httpx.get(
        f"{api_url}/v1/jobs/{job['id']}/events", headers={"Authorization": f"Bearer {new_key()}"}
    )
    assert other.status_code == 404
