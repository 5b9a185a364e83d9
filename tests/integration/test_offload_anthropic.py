"""Offloading to Anthropic's Message Batches (issue 17), end to end: a chatjobs stack whose
route says ``offload = "anthropic-batch"`` sends its long-deadline jobs to the simulator's
Message Batches API over real HTTP (chatjobs.simulator_anthropic), while the jobs that API
cannot run as asked (``n = 2``) and the short-deadline ones run synchronously."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatjobs.testing import wait_job
from tests.conftest import MiniStack, new_key
from tests.integration.test_offload import FAST, deadline, rows_for, start_beat, statuses
from tests.integration.test_reliability import sql, wait_until

pytestmark = pytest.mark.integration

MODEL = "claude-offload"
UPSTREAM_MODEL = "claude-sonnet-4-5"


def models_file(path: Path, simulator: str, **extra: Any) -> Path:
    # Anthropic's OpenAI-compatible endpoint and its Message Batches share one base URL and
    # key; here the simulator plays both.
    path.write_text(
        "\n".join(
            [
                f'[models."{MODEL}"]',
                f'upstream_model = "{UPSTREAM_MODEL}"',
                f'base_url = "{simulator}"',
                'api_key_env = "ANTHROPIC_TEST_KEY"',
                'offload = "anthropic-batch"',
                "input_per_mtok = 3.0",
                "output_per_mtok = 15.0",
                *(f"{key} = {value}" for key, value in extra.items()),
            ]
        )
        + "\n"
    )
    return path


def submit(client: httpx.Client, marker: str, hours: float, **extra: Any) -> str:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"offload {marker}"},
        ],
        "max_tokens": 16,
        **extra,
    }
    answer = client.post("/v1/jobs", json={"request": request, "deadline": deadline(hours)})
    assert answer.status_code in (200, 201, 202), answer.text
    return str(answer.json()["id"])


def upstream_batches(simulator: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{simulator}/messages/batches", params={"limit": 1000})
    assert answer.status_code == 200, answer.text
    return list(answer.json()["data"])


@pytest.fixture
def anthropic_stack(
    make_stack: Callable[..., MiniStack], simulator: str, tmp_path: Path
) -> Callable[..., MiniStack]:
    def stack(beat: bool = False, route: dict[str, Any] | None = None, **env: str) -> MiniStack:
        path = models_file(tmp_path / "models.toml", simulator, **(route or {}))
        return make_stack(
            env={
                "CHATJOBS_MODELS_FILE": str(path),
                "ANTHROPIC_TEST_KEY": "sk-ant-test",
                "CHATJOBS_TENANT_SUBMIT_RPS": "0",
                **FAST,
                **env,
            },
            beat=beat,
        )

    return stack


def test_long_deadline_jobs_go_to_message_batches_and_the_rest_run_here(
    anthropic_stack: Callable[..., MiniStack], simulator: str
) -> None:
    stack = anthropic_stack()
    marker = uuid.uuid4().hex[:8]
    with stack.client(new_key()) as client:
        long = [submit(client, f"{marker}-long-{i}", 48) for i in range(30)]
        refused = submit(client, f"{marker}-two", 48, n=2)
        # Anthropic answers 400 to a stop sequence of only whitespace: run here instead.
        newline = submit(client, f"{marker}-newline", 48, stop=["\n"])
        invalid = submit(client, f"{marker}-bad", 48, x_sim={"status": 400})
        short = submit(client, f"{marker}-short", 1)
        # No beat yet: the dispatcher runs the short one and leaves the offload-eligible ones.
        assert wait_job(client, short, timeout=60)["status"] == "succeeded"
        assert statuses([*long, refused, newline, invalid]) == {"queued": 33}
        start_beat(stack)
        # n = 2 is refused by the encoder: marked, then run here (two choices, as asked).
        done = wait_job(client, refused, timeout=60)
        assert done["status"] == "succeeded" and len(done["result"]["choices"]) == 2
        assert wait_job(client, newline, timeout=60)["status"] == "succeeded"
        wait_until(lambda: statuses(long) == {"succeeded": 30}, 90, "the offloaded jobs")
        failed = wait_job(client, invalid, timeout=30)
    # One Message Batch held the 30 and the invalid one; the refused job was never in it.
    (row,) = rows_for([*long, invalid])
    assert row.provider == "anthropic-batch" and row.items == 31 and row.upstream_file_id is None
    wait_until(lambda: rows_for(long)[0].status == "ended", 30, "the row ended")
    (theirs,) = [b for b in upstream_batches(simulator) if b["id"] == row.upstream_batch_id]
    assert theirs["processing_status"] == "ended"
    assert theirs["request_counts"] == {
        "processing": 0,
        "succeeded": 30,
        "errored": 1,
        "canceled": 0,
        "expired": 0,
    }
    # Each offloaded job holds the Message as a chat.completion, with the upstream's usage.
    mine = sql(
        "SELECT j.result, j.total_tokens, c.offloaded, c.prompt_tokens FROM jobs j"
        " JOIN upstream_calls c ON c.job_id = j.id WHERE j.id = ANY(CAST(:ids AS uuid[]))",
        ids=long,
    )
    assert len(mine) == 30 and all(r.offloaded for r in mine)
    for r in mine:
        assert r.result["object"] == "chat.completion"
        assert r.result["choices"][0]["message"]["role"] == "assistant"
        assert r.result["choices"][0]["message"]["content"]
        assert r.result["usage"]["total_tokens"] == r.total_tokens > 0
        assert r.result["usage"]["prompt_tokens"] == r.prompt_tokens > 0
    # The invalid request failed on its first attempt, with Anthropic's error type.
    assert failed["status"] == "failed" and failed["attempts"] == 1
    assert failed["error"]["status_code"] == 400
    assert "invalid_request_error" in str(failed["error"])
    # The refused and the short job ran synchronously: not offloaded, not in a batch.
    here = sql(
        "SELECT j.id, j.offload_refused, j.upstream_batch_id, c.offloaded FROM jobs j"
        " JOIN upstream_calls c ON c.job_id = j.id WHERE j.id = ANY(CAST(:ids AS uuid[]))",
        ids=[refused, newline, short],
    )
    flags = {str(r.id): r.offload_refused for r in here}
    # The short one was never looked at by the offload (None): its deadline is too near.
    assert flags == {refused: True, newline: True, short: None}
    assert not any(r.offloaded or r.upstream_batch_id for r in here)


def test_a_crash_between_create_and_record_finds_the_message_batch_without_metadata(
    anthropic_stack: Callable[..., MiniStack],
    simulator: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chatjobs.offload import service
    from chatjobs.routing import model_entries, route_for
    from chatjobs.settings import get_settings
    from worker.execute import retry_delay

    stack = anthropic_stack()
    marker = uuid.uuid4().hex[:8]
    with stack.client(new_key()) as client:
        ids = [submit(client, f"{marker}-crash-{i}", 48) for i in range(4)]
    for name in ("CHATJOBS_MODELS_FILE", "ANTHROPIC_TEST_KEY", "CHATJOBS_QUEUE_NAME"):
        monkeypatch.setenv(name, stack.env[name])
    get_settings.cache_clear()
    model_entries.cache_clear()

    # Someone else's Message Batch of the same size, made just after the row's (so listed
    # first, newest first): the results' custom_ids tell it from the row's own.
    decoy = [
        {
            "custom_id": f"other-{i}",
            "params": {
                "model": UPSTREAM_MODEL,
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "not chatjobs'"}],
            },
        }
        for i in range(4)
    ]
    made: list[str] = []

    def crash() -> None:
        answer = httpx.post(f"{simulator}/messages/batches", json={"requests": decoy})
        assert answer.status_code == 200, answer.text
        made.append(answer.json()["id"])
        raise RuntimeError("killed between create and record")

    before = {b["id"] for b in upstream_batches(simulator)}
    try:
        gathered = service.gather(route_for(MODEL))
        assert gathered is not None and gathered.items == 4
        monkeypatch.setattr(service, "fault_after_create", crash)
        with pytest.raises(RuntimeError):
            service.submit(gathered.row_id)
        monkeypatch.setattr(service, "fault_after_create", None)
        (row,) = rows_for(ids)
        assert row.status == "building" and row.submit_started_at is not None
        sql(
            "UPDATE upstream_batches SET lease_expires_at = now() WHERE id = :id RETURNING id",
            id=row.id,
        )
        # Both batches have ended (the simulator's delay is 1 s): each is proved by its results.
        time.sleep(1.5)
        assert service.submit_pass(retry_delay) == 1
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        model_entries.cache_clear()
    created = [b["id"] for b in upstream_batches(simulator) if b["id"] not in before]
    assert len(created) == 2 and made[0] in created
    (row,) = rows_for(ids)
    (ours,) = set(created) - set(made)
    assert row.status == "submitted" and row.upstream_batch_id == ours


def test_a_job_anthropic_cannot_run_is_not_held_back_by_a_full_token_budget(
    anthropic_stack: Callable[..., MiniStack],
) -> None:
    # A budget smaller than any job: nothing is ever offloaded, and every eligible job waits.
    stack = anthropic_stack(beat=True, route={"offload_enqueued_tokens": 1})
    marker = uuid.uuid4().hex[:8]
    with stack.client(new_key()) as client:
        waiting = [submit(client, f"{marker}-wait-{i}", 48) for i in range(3)]
        refused = submit(client, f"{marker}-two", 48, n=2)
        done = wait_job(client, refused, timeout=60)
    assert done["status"] == "succeeded" and len(done["result"]["choices"]) == 2
    assert statuses(waiting) == {"queued": 3}
    assert rows_for(waiting) == []
    flags = sql(
        "SELECT offload_refused FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))", ids=waiting
    )
    # Looked at once (they would go), then left alone until there is room.
    assert [r.offload_refused for r in flags] == [False, False, False]


def test_an_encoder_bug_on_one_job_leaves_the_routes_other_jobs_going(
    anthropic_stack: Callable[..., MiniStack], monkeypatch: pytest.MonkeyPatch
) -> None:
    from chatjobs.offload import service
    from chatjobs.offload.anthropic_batch import AnthropicBatch
    from chatjobs.offload.upstream import Item
    from chatjobs.routing import model_entries, route_for
    from chatjobs.settings import get_settings

    stack = anthropic_stack()
    marker = uuid.uuid4().hex[:8]
    with stack.client(new_key()) as client:
        ids = [submit(client, f"{marker}-ok-{i}", 48) for i in range(3)]
        odd = submit(client, f"{marker}-odd", 48)
    for name in ("CHATJOBS_MODELS_FILE", "ANTHROPIC_TEST_KEY", "CHATJOBS_QUEUE_NAME"):
        monkeypatch.setenv(name, stack.env[name])
    get_settings.cache_clear()
    model_entries.cache_clear()
    encode = AnthropicBatch.encode

    def buggy(self: AnthropicBatch, item: Item) -> bytes:
        if item.job_id == odd:
            raise TypeError("a shape nobody foresaw")
        return encode(self, item)

    monkeypatch.setattr(AnthropicBatch, "encode", buggy)
    try:
        gathered = service.gather(route_for(MODEL))
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        model_entries.cache_clear()
    assert gathered is not None and gathered.items == 3
    (row,) = rows_for(ids)
    assert row.status == "building"
    (flag,) = sql("SELECT offload_refused FROM jobs WHERE id = :id", id=odd)
    assert flag.offload_refused is True and rows_for([odd]) == []
