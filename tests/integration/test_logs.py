"""Structured logs from real processes: JSON lines with the job fields, and never a key, a
secret or a prompt in any of them."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from chatjobs.testing import wait_job
from tests.conftest import MiniStack, new_key
from tests.integration import test_webhooks_events as job_webhooks
from tests.integration.test_reliability import wait_until
from tests.integration.test_webhooks_events import WEBHOOK_ENV, Receiver, secrets_of

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]
receiver = job_webhooks.receiver


def _lines(stack: MiniStack) -> list[str]:
    return [
        line
        for proc in stack.procs
        for line in proc.log_path.read_text(errors="replace").splitlines()
    ]


def _records(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def test_logs_are_json_lines_with_job_fields_and_hold_no_key_secret_or_prompt(
    make_stack: Make, receiver: Receiver
) -> None:
    upstream_key = f"sk-upstream-{uuid.uuid4().hex}"
    stack = make_stack(
        env={
            **WEBHOOK_ENV,
            "CHATJOBS_LOG_FORMAT": "json",
            "CHATJOBS_UPSTREAM_API_KEY": upstream_key,
        }
    )
    api_key = new_key()
    prompts = [f"prompt-marker-{uuid.uuid4().hex}" for _ in range(3)]
    with stack.client(api_key) as client:
        ids = []
        for prompt in prompts:
            body = {"messages": [{"role": "user", "content": prompt}]}
            response = client.post(
                "/v1/jobs", json={"request": body, "webhook_url": f"{receiver.base}/ok"}
            )
            assert response.status_code == 202, response.text
            ids.append(response.json()["id"])
        for job_id in ids:
            assert wait_job(client, job_id)["status"] == "succeeded"
        wait_until(lambda: len(receiver.on("/ok")) == 3, 15, "the deliveries arrived")
        webhook_secrets = secrets_of(client)

    def upstream_lines() -> list[dict[str, Any]]:
        records = _records(_lines(stack))
        return [r for r in records if r["message"].startswith("upstream call")]

    wait_until(lambda: len(upstream_lines()) >= 3, 10, "the upstream lines were written")
    lines = _lines(stack)
    text = "\n".join(lines)
    secrets = [*webhook_secrets, *(s.removeprefix("whsec_") for s in webhook_secrets)]
    assert webhook_secrets
    for marker in [upstream_key, api_key, *secrets]:
        assert marker not in text
    for prompt in prompts:
        assert prompt not in text

    records = _records(lines)
    assert {"api", "beat", "worker"} <= {
        proc.name for proc in stack.procs if _records(proc.log_path.read_text().splitlines())
    }
    for record in records:
        assert {"ts", "level", "logger", "message"} <= record.keys()
    # Celery's and uvicorn's own lines come out as JSON too.
    loggers = {record["logger"] for record in records}
    assert any(name.startswith("celery") for name in loggers), loggers
    assert any(name.startswith("uvicorn") for name in loggers), loggers

    calls = {r["job_id"]: r for r in upstream_lines()}
    assert set(ids) <= calls.keys()
    for job_id in ids:
        call = calls[job_id]
        assert call["status"] == 200 and call["attempt"] == 1
        assert call["model"] and call["tenant"] and call["upstream_request_id"]
        assert call["latency_ms"] >= 0 and call["tokens"] > 0
    moved = [r for r in records if r["logger"] == "chatjobs.jobs" and r.get("job_id") == ids[0]]
    assert [r["status"] for r in moved][-2:] == ["running", "succeeded"]
    assert moved[-1]["tenant"] == calls[ids[0]]["tenant"]
