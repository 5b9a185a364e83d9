"""Long inputs: exact counts at submit, and map-reduce, truncate or error past the window."""

from __future__ import annotations

import re
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatjobs import longcontext
from chatjobs.testing import wait_job
from chatjobs.tokens import count_messages, count_text, lookup_model
from tests.conftest import MiniStack
from tests.integration.test_execution import calls_for
from tests.integration.test_reliability import sql, wait_until

pytestmark = pytest.mark.integration

Make = Callable[..., MiniStack]
WINDOW = 2000
SMALL = "small-model"


def write_models_file(path: Path, model: str, window: int) -> Path:
    """A models file giving ``model`` a window of its own (o200k, 256 output tokens)."""
    path.write_text(
        f'[models."{model}"]\ncontext_window = {window}\nmax_output_tokens = 256\n'
        'encoding = "o200k_base"\n'
    )
    return path


@pytest.fixture
def models_file(tmp_path: Path) -> Path:
    return write_models_file(tmp_path / "models.toml", SMALL, WINDOW)


@pytest.fixture
def small_window(sim: httpx.Client) -> Iterator[None]:
    """The simulator rejects any call whose prompt + max_tokens exceeds the small window."""
    sim.post("/_sim/config", json={"context_window": WINDOW})
    yield


def document(tokens: int) -> str:
    """Deterministic prose of about ``tokens`` o200k tokens, in numbered paragraphs."""
    sentences = [
        "The committee reviewed the quarterly figures in detail.",
        "Several members raised concerns about the rising cost of materials.",
        "A proposal to defer the expansion was discussed but not adopted.",
        "The chair asked for a revised forecast before the next meeting.",
    ]
    paragraphs: list[str] = []
    i = 0
    while True:
        paragraphs.append(f"Section {i + 1}. " + " ".join(sentences[(i + k) % 4] for k in range(6)))
        i += 1
        if i % 50 == 0 and count_text("\n\n".join(paragraphs), "o200k_base") >= tokens:
            return "\n\n".join(paragraphs)
        if tokens < 5000 and count_text("\n\n".join(paragraphs), "o200k_base") >= tokens:
            return "\n\n".join(paragraphs)


def long_request(marker: str, doc: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": SMALL,
        "messages": [
            {"role": "system", "content": "You summarise board minutes."},
            {"role": "user", "content": doc},
        ],
        "max_tokens": 100,
        "x_test": marker,
        **extra,
    }


def test_a_50k_token_document_completes_through_map_reduce_within_the_window(
    make_stack: Make, api_key: str, sim: httpx.Client, models_file: Path, small_window: None
) -> None:
    stack = make_stack(
        env={"CHATJOBS_MODELS_FILE": str(models_file)}, workers=[["--concurrency", "16"]]
    )
    marker = uuid.uuid4().hex
    doc = document(50_000)
    with stack.client(api_key) as client:
        response = client.post("/v1/jobs", json={"request": long_request(marker, doc)})
        assert response.status_code == 202, response.text
        job = response.json()
        assert job["prompt_token_estimate"] > 50_000
        assert job["token_count_method"] == "o200k_base"
        assert job["long_context"]["strategy"] == "map_reduce"
        chunks = job["long_context"]["chunks"]
        assert chunks >= 25
        assert job["progress"]["map"] == {"done": 0, "total": chunks}
        done = wait_job(client, job["id"], timeout=120)
        assert done["status"] == "succeeded", done
        steps = client.get(f"/v1/jobs/{job['id']}/steps").json()
        listed = [j["id"] for j in client.get("/v1/jobs").json()["data"]]
    assert done["result"]["object"] == "chat.completion"
    assert done["progress"]["map"] == {"done": chunks, "total": chunks}
    assert listed == [job["id"]]  # steps are not listed as jobs of their own

    calls = calls_for(sim, marker)
    assert calls and all(c["status"] == 200 for c in calls), "a call went over the window"
    assert len(calls) == len(steps)

    # Usage is the exact sum over every call the job made.
    rows = sql(
        "SELECT coalesce(sum(c.prompt_tokens), 0), coalesce(sum(c.completion_tokens), 0), "
        "coalesce(sum(c.total_tokens), 0) FROM upstream_calls c JOIN jobs j ON j.id = c.job_id "
        "WHERE j.parent_id = :id",
        id=job["id"],
    )
    assert done["usage"] == dict(
        zip(("prompt_tokens", "completion_tokens", "total_tokens"), rows[0], strict=True)
    )
    assert done["result"]["usage"] == done["usage"]

    # Each reduce level sees the level below's outputs, every one, in document order.
    levels: dict[int, list[dict[str, Any]]] = {}
    for step in steps:
        levels.setdefault(step["level"], []).append(step)
    assert [s["index"] for s in levels[0]] == list(range(chunks))
    bodies = {c["body"]["messages"][-1]["content"] for c in calls}
    for level in range(1, max(levels) + 1):
        below = [s["content"] for s in levels[level - 1]]
        reduce_bodies = [
            b for b in bodies if "partial answers" in b and all(x in below for x in _parts(b))
        ]
        seen = [
            part
            for body in sorted(reduce_bodies, key=lambda b: below.index(_parts(b)[0]))
            for part in _parts(body)
        ]
        assert seen == below
    assert len(levels[max(levels)]) == 1


def _parts(body: str) -> list[str]:
    return [p.strip() for p in re.split(r"\[Part \d+ of \d+\]\n", body)[1:]]


def test_truncate_drops_the_oldest_messages_and_records_it(
    make_stack: Make, api_key: str, sim: httpx.Client, models_file: Path, small_window: None
) -> None:
    stack = make_stack(env={"CHATJOBS_MODELS_FILE": str(models_file)})
    marker = uuid.uuid4().hex
    history = []
    for i in range(30):
        history.append({"role": "user", "content": document(60) + f" Question {i}?"})
        history.append({"role": "assistant", "content": document(40)})
    messages = [
        {"role": "system", "content": "Be brief."},
        *history,
        {"role": "user", "content": "And finally, what changed?"},
    ]
    request = {"model": SMALL, "messages": messages, "max_tokens": 100, "x_test": marker}
    with stack.client(api_key) as client:
        job = client.post(
            "/v1/jobs", json={"request": request, "long_context": {"strategy": "truncate"}}
        ).json()
        done = wait_job(client, job["id"], timeout=30)
    assert done["status"] == "succeeded"
    record = done["long_context"]
    assert record["strategy"] == "truncate"
    assert record["dropped_messages"] and record["dropped_messages"][0] == 1
    (call,) = calls_for(sim, marker)
    assert call["status"] == 200
    sent = call["body"]["messages"]
    assert sent[0] == messages[0] and sent[-1] == messages[-1]
    spec = lookup_model(
        SMALL, overrides={SMALL: {"context_window": WINDOW, "encoding": "o200k_base"}}
    )
    assert count_messages(sent, spec).tokens + 100 <= WINDOW
    assert done["request"]["messages"] == messages  # the submitted request is kept whole


def test_error_strategy_refuses_at_submit_with_the_counts(
    make_stack: Make, api_key: str, models_file: Path
) -> None:
    stack = make_stack(env={"CHATJOBS_MODELS_FILE": str(models_file)}, workers=[])
    with stack.client(api_key) as client:
        response = client.post(
            "/v1/jobs",
            json={
                "request": long_request("x", document(3000)),
                "long_context": {"strategy": "error"},
            },
        )
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "context_length_exceeded"
    assert str(WINDOW) in error["message"] and "tokens" in error["message"]


def test_a_worker_killed_mid_map_resumes_without_redoing_finished_chunks(
    make_stack: Make, api_key: str, sim: httpx.Client, models_file: Path, small_window: None
) -> None:
    stack = make_stack(
        env={"CHATJOBS_MODELS_FILE": str(models_file)}, workers=[["--concurrency", "4"]]
    )
    marker = uuid.uuid4().hex
    request = long_request(marker, document(20_000), x_sim={"latency": 0.5})
    with stack.client(api_key) as client:
        job = client.post("/v1/jobs", json={"request": request}).json()

        def finished() -> list[int]:
            rows = sql(
                "SELECT step_index FROM jobs WHERE parent_id = :id AND step_level = 0 "
                "AND status = 'succeeded'",
                id=job["id"],
            )
            return [r[0] for r in rows]

        wait_until(lambda: len(finished()) >= 4, 30, "a few chunks done")
        stack.procs[-1].stop(signal.SIGKILL)
        done_before = set(finished())
        stack.start_worker("--concurrency", "8", name="replacement")
        done = wait_job(client, job["id"], timeout=120)
    assert done["status"] == "succeeded"
    calls = [c for c in calls_for(sim, marker) if c["status"] == 200]
    per_part: dict[int, int] = {}
    for call in calls:
        found = re.search(r"part (\d+) of \d+", call["body"]["messages"][-1]["content"])
        if found:
            per_part[int(found.group(1)) - 1] = per_part.get(int(found.group(1)) - 1, 0) + 1
    assert all(per_part[i] == 1 for i in done_before), per_part


def test_an_input_that_fits_gpt_4_1_exactly_is_one_call_and_one_more_token_is_chunked(
    make_stack: Make, api_key: str
) -> None:
    stack = make_stack(workers=[])
    spec = lookup_model("gpt-4.1")
    budget = 1000
    target = spec.context_window - budget

    def messages_with(extra: int) -> list[dict[str, Any]]:
        return [{"role": "user", "content": "x" + " a" * extra}]

    base = count_messages(messages_with(0), spec).tokens
    fitting = messages_with(target - base)
    assert count_messages(fitting, spec).tokens == target
    over = messages_with(target - base + 1)
    assert count_messages(over, spec).tokens == target + 1
    requests = [
        {"model": "gpt-4.1", "messages": messages, "max_tokens": budget}
        for messages in (fitting, over)
    ]
    with stack.client(api_key) as client:
        # Each body is ~2 MB: too large to plan in the API, so both are accepted unplanned...
        jobs = [client.post("/v1/jobs", json={"request": r}).json() for r in requests]
        for job in jobs:
            assert job["status"] == "queued" and job["prompt_token_estimate"] is None
            client.post(f"/v1/jobs/{job['id']}/cancel")
    # ... and the worker's plan (the same function) draws the line at the exact token.
    one, two = (longcontext.plan(r, "gpt-4.1", None) for r in requests)
    assert one.prompt_tokens == target and not one.map_requests
    assert two.prompt_tokens == target + 1
    assert two.record is not None and two.record["strategy"] == "map_reduce"
    assert len(two.map_requests) >= 2
