"""Offloading to a provider's batch API (chatjobs.offload), with a second chatjobs stack as
the upstream: its /v1/files and /v1/batches are OpenAI's shape, run by its own worker against
the simulator. Both stacks share the session's database (each on a queue of its own)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from chatjobs.testing import Proc, python_cli
from tests.conftest import MiniStack, new_key
from tests.integration.test_metrics import OFFLOAD_ONLY, scrape, value
from tests.integration.test_reliability import sql, wait_until

MODEL = "offload-model"
FAST = {
    "CHATJOBS_OFFLOAD_GATHER_SECONDS": "0.5",
    "CHATJOBS_OFFLOAD_POLL_SECONDS": "0.5",
    "CHATJOBS_OFFLOAD_POLL_MAX_SECONDS": "1",
}


def models_file(path: Path, simulator: str, upstream: str, **extra: Any) -> Path:
    lines = [
        f'[models."{MODEL}"]',
        'upstream_model = "gpt-4.1"',
        f'base_url = "{simulator}"',
        'offload = "openai-batch"',
        f'offload_base_url = "{upstream}/v1"',
        'offload_api_key_env = "OFFLOAD_UPSTREAM_KEY"',
        "input_per_mtok = 2.0",
        "output_per_mtok = 8.0",
        *(f"{key} = {value}" for key, value in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def deadline(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


def submit(client: httpx.Client, marker: str, hours: float, **x_sim: Any) -> str:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"offload {marker}"}],
        "max_tokens": 16,
    }
    if x_sim:
        request["x_sim"] = {**x_sim, "key": f"{marker}-{uuid.uuid4().hex[:8]}"}
    answer = client.post("/v1/jobs", json={"request": request, "deadline": deadline(hours)})
    assert answer.status_code in (200, 201, 202), answer.text
    return str(answer.json()["id"])


def start_beat(stack: MiniStack) -> None:
    beat = Proc(
        "beat",
        python_cli("beat", "--loglevel", "INFO"),
        stack.env,
        stack.run_dir / f"{stack.queue}-beat-late.log",
    ).start()
    stack.procs.append(beat)


def statuses(ids: list[str]) -> dict[str, int]:
    rows = sql(
        "SELECT status, count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) GROUP BY status",
        ids=ids,
    )
    return {row[0]: row[1] for row in rows}


def rows_for(ids: list[str]) -> list[Any]:
    return sql(
        "SELECT DISTINCT b.* FROM upstream_batches b JOIN jobs j ON j.upstream_batch_id = b.id"
        " WHERE j.id = ANY(CAST(:ids AS uuid[]))",
        ids=ids,
    )


@pytest.fixture
def offload_pair(
    make_stack: Callable[..., MiniStack], simulator: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[MiniStack, MiniStack, str]]]:
    """``pair(upstream_env=..., beat=False, **route)``: the upstream stack, the offloading
    stack (whose route offloads to the first) and the upstream account's key."""

    def pair(
        upstream_env: dict[str, str] | None = None,
        beat: bool = False,
        workers: list[list[str]] | None = None,
        offloader_env: dict[str, str] | None = None,
        **route: Any,
    ) -> tuple[MiniStack, MiniStack, str]:
        upstream = make_stack(env=upstream_env or {})
        key = new_key(f"upstream-{uuid.uuid4().hex[:6]}")
        path = models_file(tmp_path / "models.toml", simulator, upstream.url, **route)
        offloader = make_stack(
            env={
                "CHATJOBS_MODELS_FILE": str(path),
                "OFFLOAD_UPSTREAM_KEY": key,
                "CHATJOBS_TENANT_SUBMIT_RPS": "0",
                **FAST,
                **(offloader_env or {}),
            },
            beat=beat,
            workers=workers,
        )
        return upstream, offloader, key

    yield pair


def test_long_deadline_jobs_become_one_upstream_batch_and_short_ones_run_here(
    offload_pair: Callable[..., tuple[MiniStack, MiniStack, str]],
) -> None:
    count = 1000
    upstream, offloader, upstream_key = offload_pair()
    tenant = new_key()
    with offloader.client(tenant) as client:
        long = [submit(client, f"long-{i}", 48) for i in range(count)]
        short = [submit(client, f"short-{i}", 1) for i in range(10)]
        # No beat yet: the worker's dispatcher runs the short ones and leaves the long ones.
        wait_until(lambda: statuses(short) == {"succeeded": 10}, 60, "the 1 h jobs run here")
        assert statuses(long) == {"queued": count}
        start_beat(offloader)
        wait_until(lambda: statuses(long) == {"succeeded": count}, 180, "the offloaded jobs")
    # The row ends once the last outcome is written, just after.
    wait_until(lambda: [r.status for r in rows_for(long)] == ["ended"], 30, "the row ended")
    batches = rows_for(long)
    assert len(batches) == 1
    (row,) = batches
    assert row.items == count and row.status == "ended" and row.upstream_status == "completed"
    # The upstream's batch is the chatjobs batch it created, with our ref in its metadata.
    with upstream.client(upstream_key) as up:
        seen = up.get(f"/v1/batches/{row.upstream_batch_id}").json()
    assert seen["metadata"] == {"chatjobs_ref": str(row.id)}
    assert seen["request_counts"]["completed"] == count
    # Each job holds the upstream's result and usage, its call marked offloaded.
    mine = sql(
        "SELECT j.id, j.result, j.total_tokens, c.total_tokens AS call_tokens, c.offloaded,"
        " j.upstream_batch_id FROM jobs j JOIN upstream_calls c ON c.job_id = j.id"
        " WHERE j.id = ANY(CAST(:ids AS uuid[]))",
        ids=long,
    )
    assert len(mine) == count
    assert all(r.offloaded and r.upstream_batch_id == row.id for r in mine)
    assert all(r.result["usage"]["total_tokens"] == r.total_tokens == r.call_tokens for r in mine)
    theirs = sql(
        "SELECT coalesce(sum(total_tokens), 0) FROM jobs WHERE batch_id = :b",
        b=row.upstream_batch_id,
    )[0][0]
    assert sum(r.total_tokens for r in mine) == theirs > 0
    # The short ones ran synchronously: not offloaded.
    here = sql(
        "SELECT j.upstream_batch_id, c.offloaded FROM jobs j JOIN upstream_calls c"
        " ON c.job_id = j.id WHERE j.id = ANY(CAST(:ids AS uuid[]))",
        ids=short,
    )
    assert len(here) == 10 and not any(r.offloaded or r.upstream_batch_id for r in here)
    # GET /v1/usage: the offloaded calls and tokens apart, and the saving from the prices.
    with offloader.client(tenant) as client:
        (usage,) = client.get("/v1/usage", params={"group_by": "model"}).json()["data"]
    prompt = sum(r.result["usage"]["prompt_tokens"] for r in mine)
    completion = sum(r.result["usage"]["completion_tokens"] for r in mine)
    saving = round((prompt * 2.0 + completion * 8.0) / 1e6 * 0.5, 6)
    assert usage["requests"] == count + 10 and usage["offloaded_requests"] == count
    assert usage["offloaded_tokens"] == theirs
    assert usage["offload_saving_usd"] == pytest.approx(saving)
    full = (usage["prompt_tokens"] * 2.0 + usage["completion_tokens"] * 8.0) / 1e6
    assert usage["cost_usd"] == pytest.approx(full - saving, abs=1e-5)
    # GET /metrics: the items by what the upstream said, their tokens, the row by status.
    with offloader.client(tenant) as client:

        def counted() -> bool:
            return value(scrape(client)[1], "chatjobs_offload_results_total") == count

        wait_until(counted, 15, "beat's counts reached the scrape")
        _, samples = scrape(client)
    assert value(samples, "chatjobs_offload_results_total", outcome="succeeded") == count
    assert value(samples, "chatjobs_tokens_total", type="prompt") == usage["prompt_tokens"]
    assert value(samples, "chatjobs_offload_upstream_batches", status="ended") == 1
    assert set(samples) >= OFFLOAD_ONLY
    assert samples["chatjobs_offload_enqueued_tokens"] == [({"model": MODEL}, 0.0)]


def test_failed_lines_are_retried_in_the_next_upstream_batch(
    offload_pair: Callable[..., tuple[MiniStack, MiniStack, str]],
) -> None:
    # The upstream makes one attempt per line: a 500 comes back as an error-file line.
    _, offloader, _ = offload_pair(upstream_env={"CHATJOBS_MAX_ATTEMPTS": "1"}, beat=True)
    with offloader.client(new_key()) as client:
        flaky = [submit(client, f"flaky-{i}", 48, status=500, fail_times=1) for i in range(5)]
        bad = submit(client, "bad", 48, status=400)
        fine = [submit(client, f"fine-{i}", 48) for i in range(5)]
        everyone = [*flaky, bad, *fine]
        wait_until(lambda: statuses(everyone) == {"succeeded": 10, "failed": 1}, 120, "all ended")
    assert statuses(flaky) == {"succeeded": 5}
    calls = sql(
        "SELECT j.id, j.attempts, array_agg(c.status_code ORDER BY c.claim_seq) AS codes,"
        " bool_and(c.offloaded) AS offloaded, count(DISTINCT b.id) AS batches"
        " FROM jobs j JOIN upstream_calls c ON c.job_id = j.id"
        " LEFT JOIN upstream_batches b ON b.id = j.upstream_batch_id"
        " WHERE j.id = ANY(CAST(:ids AS uuid[])) GROUP BY j.id, j.attempts",
        ids=flaky,
    )
    # Retried by the ordinary policy: a second attempt, offloaded again (deadline allows).
    assert all(r.attempts == 2 and r.codes == [500, 200] and r.offloaded for r in calls)
    failed = sql("SELECT error FROM jobs WHERE id = :id", id=bad)[0][0]
    assert failed["status_code"] == 400 and failed["type"] == "upstream_status_error"


def test_cancelling_every_item_cancels_the_upstream_batch(
    offload_pair: Callable[..., tuple[MiniStack, MiniStack, str]],
) -> None:
    # Two jobs in flight per tenant: the offloaded ones must not hold those slots.
    upstream, offloader, upstream_key = offload_pair(
        beat=True, offloader_env={"CHATJOBS_TENANT_MAX_INFLIGHT": "2"}
    )
    with offloader.client(new_key()) as client:
        ids = [submit(client, f"slow-{i}", 48, latency=20) for i in range(4)]
        wait_until(lambda: statuses(ids) == {"running": 4}, 30, "offloaded")
        wait_until(
            lambda: [r.status for r in rows_for(ids)] == ["submitted"], 30, "submitted upstream"
        )
        here = [submit(client, f"here-{i}", 1) for i in range(3)]
        wait_until(lambda: statuses(here) == {"succeeded": 3}, 10, "run beside the offloaded")
        for job_id in ids:
            assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
    (row,) = rows_for(ids)
    with upstream.client(upstream_key) as up:

        def cancelled() -> bool:
            status = up.get(f"/v1/batches/{row.upstream_batch_id}").json()["status"]
            return status in ("cancelling", "cancelled")

        wait_until(cancelled, 30, "the upstream batch cancelled")
    wait_until(lambda: rows_for(ids)[0].status == "ended", 60, "the row ended")
    assert statuses(ids) == {"cancelled": 4}


def test_a_crash_between_create_and_record_finds_the_batch_and_never_creates_two(
    offload_pair: Callable[..., tuple[MiniStack, MiniStack, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chatjobs.offload import service
    from chatjobs.routing import model_entries, route_for
    from chatjobs.settings import get_settings
    from worker.execute import retry_delay

    upstream, offloader, upstream_key = offload_pair(workers=[])
    with offloader.client(new_key()) as client:
        ids = [submit(client, f"crash-{i}", 48) for i in range(3)]
    # This process plays the offloader's beat, with its settings.
    for name in ("CHATJOBS_MODELS_FILE", "OFFLOAD_UPSTREAM_KEY", "CHATJOBS_QUEUE_NAME"):
        monkeypatch.setenv(name, offloader.env[name])
    get_settings.cache_clear()
    model_entries.cache_clear()

    def crash() -> None:
        raise RuntimeError("killed between create and record")

    try:
        gathered = service.gather(route_for(MODEL))
        assert gathered is not None and gathered.items == 3
        monkeypatch.setattr(service, "fault_after_create", crash)
        with pytest.raises(RuntimeError):
            service.submit(gathered.row_id)
        monkeypatch.setattr(service, "fault_after_create", None)
        (row,) = rows_for(ids)
        assert row.status == "building" and row.upstream_batch_id is None
        # The lease of the crashed pass runs out; the next submit pass takes the row.
        sql(
            "UPDATE upstream_batches SET lease_expires_at = now() WHERE id = :id RETURNING id",
            id=row.id,
        )
        time.sleep(0.05)
        assert service.submit_pass(retry_delay) == 1
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        model_entries.cache_clear()
    (row,) = rows_for(ids)
    with upstream.client(upstream_key) as up:
        listed = up.get("/v1/batches", params={"limit": 100}).json()["data"]
    ours = [b for b in listed if (b.get("metadata") or {}).get("chatjobs_ref") == str(row.id)]
    assert len(ours) == 1
    assert row.status == "submitted" and row.upstream_batch_id == ours[0]["id"]


def test_the_enqueued_token_limit_is_never_exceeded(
    offload_pair: Callable[..., tuple[MiniStack, MiniStack, str]],
) -> None:
    limit = 120
    _, offloader, _ = offload_pair(beat=True, offload_enqueued_tokens=limit)
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            held = sql(
                "SELECT coalesce(sum(enqueued_tokens), 0) FROM upstream_batches"
                " WHERE model = :m AND status IN ('building', 'submitted')",
                m=MODEL,
            )[0][0]
            seen.append(int(held))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with offloader.client(new_key()) as client:
            ids = [submit(client, f"budget-{i}", 48) for i in range(12)]
            wait_until(lambda: statuses(ids) == {"succeeded": 12}, 180, "all done in turns")
    finally:
        stop.set()
        watcher.join()
    rows = rows_for(ids)
    costs = sql("SELECT cost FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))", ids=ids)
    assert len(rows) >= -(-sum(c.cost for c in costs) // limit)  # several turns
    assert all(0 < r.enqueued_tokens <= limit for r in rows)
    assert max(seen) <= limit


def test_items_the_upstream_let_expire_run_here_once_their_deadline_is_near(
    offload_pair: Callable[..., tuple[MiniStack, MiniStack, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from chatjobs.offload import batch_upstream, service
    from chatjobs.routing import model_entries, route_for
    from chatjobs.settings import get_settings
    from worker.execute import retry_delay

    # Eligible for 10 s after submission (deadline 3610 s away, the minimum 3600 s).
    _, offloader, _ = offload_pair(offload_min_deadline=3600)
    for name in ("CHATJOBS_MODELS_FILE", "OFFLOAD_UPSTREAM_KEY", "CHATJOBS_QUEUE_NAME", *FAST):
        monkeypatch.setenv(name, offloader.env[name])
    get_settings.cache_clear()
    model_entries.cache_clear()
    # The upstream batch's window ends long before its (slow) lines can finish.
    monkeypatch.setattr(batch_upstream("openai-batch"), "completion_window", "2s")
    try:
        with offloader.client(new_key()) as client:
            ids = [
                submit(client, f"expire-{i}", 3610 / 3600, latency=20, slow_times=1)
                for i in range(3)
            ]
        gathered = service.gather(route_for(MODEL))
        assert gathered is not None and gathered.items == 3
        assert service.submit(gathered.row_id) is not None
        sql(
            "UPDATE upstream_batches SET next_poll_at = now() WHERE id = :id RETURNING id",
            id=gathered.row_id,
        )

        def ended() -> bool:
            service.poll_pass(retry_delay)
            return bool(rows_for(ids)) and rows_for(ids)[0].status == "ended"

        wait_until(ended, 30, "the upstream batch expired and its items handed back")
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
        model_entries.cache_clear()
    (row,) = rows_for(ids)
    assert row.upstream_status == "expired"
    # Handed back (the attempt given back), then run here: too near their deadline now.
    wait_until(lambda: statuses(ids) == {"succeeded": 3}, 60, "run synchronously")
    calls = sql(
        "SELECT j.attempts, bool_or(c.offloaded) AS offloaded FROM jobs j"
        " JOIN upstream_calls c ON c.job_id = j.id"
        " WHERE j.id = ANY(CAST(:ids AS uuid[])) GROUP BY j.id, j.attempts",
        ids=ids,
    )
    assert len(calls) == 3 and all(r.attempts == 1 and not r.offloaded for r in calls)


def test_an_upstream_that_refuses_the_batch_fails_its_jobs_after_their_attempts(
    offload_pair: Callable[..., tuple[MiniStack, MiniStack, str]],
) -> None:
    _, offloader, _ = offload_pair(
        beat=True,
        offloader_env={"OFFLOAD_UPSTREAM_KEY": "not-a-key", "CHATJOBS_MAX_ATTEMPTS": "2"},
    )
    with offloader.client(new_key()) as client:
        ids = [submit(client, f"refused-{i}", 48) for i in range(3)]
        wait_until(lambda: statuses(ids) == {"failed": 3}, 60, "failed after two attempts")
    errors = sql("SELECT attempts, error FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))", ids=ids)
    assert all(r.attempts == 2 and r.error["code"] == "batch_refused" for r in errors)
    assert all(r.error["status_code"] == 401 for r in errors)
    refused = sql(
        "SELECT status FROM upstream_batches WHERE model = :m AND error LIKE '%refused%'"
        " AND created_at > now() - interval '2 minutes'",
        m=MODEL,
    )
    assert len(refused) >= 2 and {r.status for r in refused} == {"failed_to_submit"}


def test_a_long_input_offloads_its_map_steps_and_then_its_reduce_step(
    offload_pair: Callable[..., tuple[MiniStack, MiniStack, str]],
) -> None:
    from tests.integration.test_long_context import document

    _, offloader, _ = offload_pair(
        beat=True, context_window=2000, max_output_tokens=256, encoding='"o200k_base"'
    )
    with offloader.client(new_key()) as client:
        request = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You summarise board minutes."},
                {"role": "user", "content": document(6000)},
            ],
            "max_tokens": 100,
        }
        job = client.post("/v1/jobs", json={"request": request, "deadline": deadline(48)})
        assert job.status_code == 202, job.text
        job_id = job.json()["id"]
        assert job.json()["long_context"]["strategy"] == "map_reduce"
        wait_until(lambda: statuses([job_id]) == {"succeeded": 1}, 120, "the long input done")
    steps = sql(
        "SELECT j.step_kind, j.upstream_batch_id, c.offloaded, b.created_at"
        " FROM jobs j JOIN upstream_calls c ON c.job_id = j.id"
        " JOIN upstream_batches b ON b.id = j.upstream_batch_id"
        " WHERE j.parent_id = :id",
        id=job_id,
    )
    maps = [s for s in steps if s.step_kind == "map"]
    reduces = [s for s in steps if s.step_kind != "map"]
    assert len(maps) >= 2 and reduces and all(s.offloaded for s in steps)
    # The reduce step went in a later upstream batch than every map.
    assert min(r.created_at for r in reduces) > max(m.created_at for m in maps)
