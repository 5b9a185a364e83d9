"""GET /metrics from a real stack: after jobs that succeed, retry on a 429 and a 503, fail,
stream, wait in the rate limiter, are cancelled, fire from a schedule and send a webhook, the
exposition parses with prometheus_client's parser and every family holds those samples."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatjobs.testing import wait_job
from tests.conftest import MiniStack, new_key
from tests.dashboard import FAMILIES, dashboard_metrics
from tests.integration import test_webhooks_events as job_webhooks
from tests.integration.test_reliability import wait_until
from tests.integration.test_webhooks_events import WEBHOOK_ENV, Receiver

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]
receiver = job_webhooks.receiver


Samples = dict[str, list[tuple[dict[str, str], float]]]
# Series with samples only once a route offloads (labelled by model, known only then).
OFFLOAD_ONLY = {"chatjobs_offload_results_total", "chatjobs_offload_enqueued_tokens"}


def scrape(client: httpx.Client, **headers: str) -> tuple[dict[str, str], Samples]:
    """Each family's type, and every sample by its full name (``_total``, ``_bucket``...)."""
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v for got, v in samples.get(name, []) if all(got.get(k) == w for k, w in labels.items())
    )


def submit(client: httpx.Client, **request: Any) -> str:
    extra = {k: request.pop(k) for k in ("webhook_url",) if k in request}
    body = {"messages": [{"role": "user", "content": "count to three"}], **request}
    answer = client.post("/v1/jobs", json={"request": body, **extra})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def test_metrics_after_a_run_hold_every_family_with_its_samples(
    make_stack: Make, receiver: Receiver
) -> None:
    tenant = f"metrics-{uuid.uuid4().hex[:8]}"
    token = f"mt-{uuid.uuid4().hex}"
    stack = make_stack(
        env={
            **WEBHOOK_ENV,
            "CHATJOBS_METRICS_TENANTS": tenant,
            "CHATJOBS_METRICS_TOKEN": token,
            # One call a second and a short wait in the limiter: the burst below waits in it,
            # and the later jobs are handed back (deferred) until their slot.
            "CHATJOBS_UPSTREAM_RPM": "60",
            "CHATJOBS_LIMITER_MAX_WAIT_SECONDS": "0.5",
            "CHATJOBS_RETRY_AFTER_CAP_SECONDS": "1",
        }
    )
    other = new_key()  # an unlisted tenant: counted as "other"
    auth = {"authorization": f"Bearer {token}"}
    with stack.client(new_key(tenant)) as client, stack.client(other) as unlisted:
        assert client.get("/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(f"{stack.url}/metrics").status_code == 401
        marker = uuid.uuid4().hex
        ids = {
            "hooked": submit(client, webhook_url=f"{receiver.base}/ok"),
            "429": submit(client, x_sim={"fail_times": 1, "status": 429, "key": f"{marker}-a"}),
            "503": submit(client, x_sim={"fail_times": 1, "status": 503, "key": f"{marker}-b"}),
            "400": submit(client, x_sim={"status": 400}),
            "stream": submit(client, stream=True),
            "other": submit(unlisted),
        }
        slow = submit(client, x_sim={"latency": 60})
        wait_job(client, slow, until={"running"})
        assert client.post(f"/v1/jobs/{slow}/cancel").status_code == 200
        schedule = client.post(
            "/v1/schedules",
            json={
                "cron": "0 7 * * *",
                "template": {"request": {"messages": [{"role": "user", "content": "hello"}]}},
            },
        )
        assert schedule.status_code == 201, schedule.text
        fired = client.post(f"/v1/schedules/{schedule.json()['id']}/trigger")
        assert fired.status_code in (200, 201), fired.text
        fired_job = fired.json()["job_id"]
        done = {
            name: wait_job(client if name != "other" else unlisted, job_id, timeout=60)["status"]
            for name, job_id in ids.items()
        }
        assert wait_job(client, fired_job, timeout=60)["status"] == "succeeded"
        assert done == {
            "hooked": "succeeded",
            "429": "succeeded",
            "503": "succeeded",
            "400": "failed",
            "stream": "succeeded",
            "other": "succeeded",
        }
        wait_until(lambda: len(receiver.on("/ok")) == 1, 15, "the webhook was delivered")

        def counted() -> bool:  # workers flush every second
            _, samples = scrape(client, **auth)
            return (
                value(samples, "chatjobs_jobs_finished_total") >= 8
                and value(samples, "chatjobs_webhook_deliveries_total", outcome="succeeded") >= 1
            )

        wait_until(counted, 15, "the workers' counts reached the scrape")
        types, samples = scrape(client, **auth)

    assert {name: types.get(name) for name in FAMILIES} == FAMILIES
    names = {"model": "gpt-4.1"}
    assert value(samples, "chatjobs_build_info") == 1
    assert value(samples, "chatjobs_jobs", state="succeeded", kind="job") == 5
    assert value(samples, "chatjobs_jobs", state="succeeded", kind="schedule") == 1
    assert value(samples, "chatjobs_jobs", state="failed", kind="job") == 1
    assert value(samples, "chatjobs_jobs", state="cancelled", kind="job") == 1
    assert value(samples, "chatjobs_jobs", state="queued") == 0
    assert ({"model": "gpt-4.1"}, 0.0) in samples["chatjobs_queue_oldest_age_seconds"]
    assert {labels["status"] for labels, _ in samples["chatjobs_batches"]} >= {
        "validating",
        "in_progress",
        "completed",
    }

    finished = "chatjobs_jobs_finished_total"
    assert value(samples, finished, kind="job", outcome="succeeded", tenant=tenant) == 4
    assert value(samples, finished, kind="job", outcome="succeeded", tenant="other") == 1
    assert value(samples, finished, kind="schedule", outcome="succeeded", tenant=tenant) == 1
    assert value(samples, finished, kind="job", outcome="failed", **names) == 1
    assert value(samples, finished, kind="job", outcome="cancelled", **names) == 1
    duration = "chatjobs_job_duration_seconds_count"
    assert value(samples, duration, kind="job", outcome="succeeded", **names) == 5
    assert value(samples, duration, kind="job", outcome="cancelled") == 1
    # Every job's first attempt called the upstream once: the cancelled one too.
    assert value(samples, "chatjobs_queue_wait_seconds_count", kind="job", **names) == 7
    assert value(samples, "chatjobs_queue_wait_seconds_count", kind="schedule") == 1

    requests = "chatjobs_upstream_requests_total"
    assert value(samples, requests, status_class="2xx", **names) == 6
    assert value(samples, requests, status_class="429", **names) == 1
    assert value(samples, requests, status_class="5xx", **names) == 1
    assert value(samples, requests, status_class="4xx", **names) == 1
    assert value(samples, requests, status_class="abandoned", **names) == 1
    assert value(samples, "chatjobs_upstream_latency_seconds_count", **names) == 10
    assert value(samples, "chatjobs_upstream_ttft_seconds_count", **names) == 1
    assert value(samples, "chatjobs_tokens_total", type="prompt", tenant=tenant) > 0
    assert value(samples, "chatjobs_tokens_total", type="completion", tenant=tenant) > 0
    assert value(samples, "chatjobs_tokens_total", type="prompt", tenant="other") > 0

    # Ten calls at one a second: most waited in the limiter, the later ones were deferred.
    assert value(samples, "chatjobs_limiter_wait_seconds_count", **names) == 10
    assert value(samples, "chatjobs_limiter_wait_seconds_sum", **names) > 0
    assert value(samples, "chatjobs_limiter_deferrals_total", **names) >= 1
    assert value(samples, "chatjobs_retries_total", reason="429") == 1
    assert value(samples, "chatjobs_retries_total", reason="5xx") == 1
    assert {labels["reason"] for labels, _ in samples["chatjobs_recovered_total"]} == {
        "lost_lease",
        "lost_message",
    }
    assert value(samples, "chatjobs_webhook_deliveries_total", outcome="succeeded") == 1
    assert value(samples, "chatjobs_schedule_fires_total", outcome="fired") == 1
    for labels, _ in (s for series in samples.values() for s in series):
        assert "job_id" not in labels and "id" not in labels
    # Every series the Grafana dashboard (deploy/grafana) queries is in this scrape, but for
    # those only an offload route has (tests/integration/test_offload.py scrapes them; rows
    # an earlier test of the session left may show here too).
    assert dashboard_metrics() - set(samples) <= OFFLOAD_ONLY
