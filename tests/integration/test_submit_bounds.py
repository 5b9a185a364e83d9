"""Submit does bounded, linear work for any body; large inputs are planned by the worker.

Real api, worker and simulator. The bounds asserted here are generous (a loaded CI machine);
the measured figures are in bench/submit_worst_case.py and docs/benchmarks.md.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from chatjobs.testing import Proc, wait_job
from tests.conftest import MiniStack
from tests.integration.test_long_context import document, write_models_file
from tests.integration.test_reliability import sql

pytestmark = pytest.mark.integration

SIZE = int(9.9 * 1024 * 1024)
rng = random.Random(9)


def _repeat(unit: str) -> str:
    return unit * (SIZE // len(unit.encode()))


PATHOLOGICAL: dict[str, Callable[[], str]] = {
    "one repeated letter": lambda: _repeat("a"),
    "random lowercase, no spaces": lambda: "".join(
        rng.choices("abcdefghijklmnopqrstuvwxyz", k=SIZE)
    ),
    "random letters and digits": lambda: "".join(
        rng.choices("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=SIZE)
    ),
    "CJK without punctuation": lambda: "".join(
        chr(c) for c in rng.choices(range(0x4E00, 0x9FFF), k=SIZE // 3)
    ),
    "emoji": lambda: "".join(chr(c) for c in rng.choices(range(0x1F600, 0x1F64F), k=SIZE // 4)),
    "spaces": lambda: _repeat(" "),
    "newlines": lambda: "\n" * (SIZE // 2),  # escaped as two bytes in JSON
}


@pytest.mark.parametrize("kind", list(PATHOLOGICAL))
def test_a_9_9_mib_pathological_body_is_answered_in_bounded_time(
    client: httpx.Client, worker: Proc, kind: str
) -> None:
    content = PATHOLOGICAL[kind]()
    body = {
        "request": {"model": "gpt-4.1", "messages": [{"role": "user", "content": content}]},
        "long_context": {"strategy": "error"},
    }
    raw = json.dumps(body, ensure_ascii=False).encode()
    assert len(raw) < 10 * 1024 * 1024
    started = time.monotonic()
    response = client.post(
        "/v1/jobs", content=raw, headers={"content-type": "application/json"}, timeout=60
    )
    took = time.monotonic() - started
    assert response.status_code == 202, response.text[:300]
    assert took < 20, f"{kind}: submit took {took:.1f}s"
    job = response.json()
    assert job["status"] == "queued" and job["prompt_token_estimate"] is None
    # The worker counts it (linear too), finds it over gpt-4.1's window: the error strategy.
    done = wait_job(client, job["id"], timeout=90)
    if done["status"] == "failed":
        assert done["error"]["type"] == "context_length_exceeded"
        assert "context window of 1047576" in done["error"]["message"]
    else:  # whitespace compresses: 9.9 MiB of it can fit in a million tokens
        assert kind in ("spaces", "newlines") and done["status"] == "succeeded"
        assert done["prompt_token_estimate"] <= 1047576


def test_an_idempotent_replay_returns_before_any_counting(client: httpx.Client) -> None:
    body = {"request": {"messages": [{"role": "user", "content": _repeat("b")}]}}
    raw = json.dumps(body).encode()
    headers = {"content-type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
    first = client.post("/v1/jobs", content=raw, headers=headers, timeout=60)
    second = client.post("/v1/jobs", content=raw, headers=headers, timeout=60)
    assert first.status_code == second.status_code == 202
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.json()["id"] == first.json()["id"]
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")


WINDOW = 60_000


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    return write_models_file(tmp_path / "models.toml", "mid-model", WINDOW)


def test_a_large_input_is_planned_by_the_worker_and_runs_as_map_reduce(
    make_stack: Callable[..., MiniStack], api_key: str, sim: httpx.Client, models_file: Path
) -> None:
    sim.post("/_sim/config", json={"context_window": WINDOW})
    stack = make_stack(env={"CHATJOBS_MODELS_FILE": str(models_file)})
    doc = document(140_000)
    assert len(doc.encode()) > 512 * 1024  # over what the API plans itself
    request = {
        "model": "mid-model",
        "messages": [
            {"role": "system", "content": "You summarise board minutes."},
            {"role": "user", "content": doc},
        ],
        "max_tokens": 100,
    }
    with stack.client(api_key) as client:
        submitted = client.post("/v1/jobs", json={"request": request})
        assert submitted.status_code == 202
        assert submitted.json()["status"] == "queued"
        assert submitted.json()["progress"] is None
        done = wait_job(client, submitted.json()["id"], timeout=120)
        assert done["status"] == "succeeded", done["error"]
        assert done["long_context"]["strategy"] == "map_reduce"
        chunks = done["long_context"]["chunks"]
        assert chunks >= 3 and done["progress"]["map"] == {"done": chunks, "total": chunks}
        assert done["prompt_token_estimate"] > WINDOW
        steps = client.get(f"/v1/jobs/{done['id']}/steps").json()
    assert len(steps) == chunks + 1
    assert all(step["status"] == "succeeded" for step in steps)
    calls = sql(
        "SELECT count(*), sum(total_tokens) FROM upstream_calls "
        "WHERE job_id IN (SELECT id FROM jobs WHERE parent_id = CAST(:id AS uuid))",
        id=done["id"],
    )[0]
    assert calls[0] == chunks + 1 and calls[1] == done["usage"]["total_tokens"]
