"""The shared limiter inside the real worker: deferral frees the slot and costs no attempt,
and one 429 cools every worker down."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from chatjobs.testing import wait_job
from tests.conftest import MiniStack
from tests.integration.test_execution import calls_for

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    path = tmp_path / "models.toml"
    # 6 requests a minute: one every ~10 s, far beyond the limiter's 2-second inline wait.
    path.write_text('[models."slow-model"]\nrpm = 6\n\n[models."busy-model"]\nrpm = 100000\n')
    return path


def job(model: str, marker: str, **extra: object) -> dict[str, object]:
    return {
        "request": {
            "model": model,
            "messages": [{"role": "user", "content": marker}],
            "x_test": marker,
            **extra,
        }
    }


def test_a_deferral_frees_the_worker_slot_and_costs_no_attempt(
    make_stack: Make, api_key: str, sim: httpx.Client, models_file: Path
) -> None:
    # One slot only: if the deferred job held it, the unlimited job could not run.
    stack = make_stack(
        env={"CHATJOBS_MODELS_FILE": str(models_file)}, workers=[["--concurrency", "1"]]
    )
    with stack.client(api_key) as client:
        first = client.post("/v1/jobs", json=job("slow-model", uuid.uuid4().hex)).json()
        wait_job(client, first["id"])
        second = client.post("/v1/jobs", json=job("slow-model", uuid.uuid4().hex)).json()
        time.sleep(1.0)
        deferred = client.get(f"/v1/jobs/{second['id']}").json()
        free = client.post("/v1/jobs", json=job("gpt-4.1", uuid.uuid4().hex)).json()
        assert wait_job(client, free["id"], timeout=5)["status"] == "succeeded"
        still = client.get(f"/v1/jobs/{second['id']}").json()
        done = wait_job(client, second["id"], timeout=30)
    assert deferred["status"] == "queued" and deferred["attempts"] == 0
    assert deferred["next_attempt_at"] is not None
    assert still["status"] == "queued"  # the free job ran while this one waited
    assert done["status"] == "succeeded" and done["attempts"] == 1


def test_a_429_puts_every_worker_into_the_cool_down(
    make_stack: Make, api_key: str, sim: httpx.Client, models_file: Path
) -> None:
    stack = make_stack(
        env={"CHATJOBS_MODELS_FILE": str(models_file)},
        workers=[["--concurrency", "4"], ["--concurrency", "4"]],
    )
    time.sleep(2)  # both workers consuming
    limited = uuid.uuid4().hex
    with stack.client(api_key) as client:
        client.post(
            "/v1/jobs",
            json=job(
                "busy-model",
                limited,
                x_sim={"fail_times": 1, "status": 429, "retry_after": 3, "key": limited},
            ),
        )
        # Wait for the 429, then send more work for the same model: whichever worker takes
        # it must hold off until the cool-down ends.
        deadline = time.monotonic() + 10
        while not calls_for(sim, limited) and time.monotonic() < deadline:
            time.sleep(0.05)
        (rejected,) = calls_for(sim, limited)
        markers = [uuid.uuid4().hex for _ in range(6)]
        ids = [client.post("/v1/jobs", json=job("busy-model", m)).json()["id"] for m in markers]
        for job_id in ids:
            assert wait_job(client, job_id, timeout=20)["status"] == "succeeded"
    firsts = [calls_for(sim, m)[0]["t"] for m in markers]
    assert rejected["status"] == 429
    assert min(firsts) >= rejected["t"] + 2.9, [round(t - rejected["t"], 2) for t in firsts]
