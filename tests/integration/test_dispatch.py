"""Admission on real Postgres (chatjobs.jobs.dispatch.admit): which waiting jobs a pass takes
with several tenants, weights, caps and priorities; the broker's room; the repair of lost
messages; one dispatcher at a time; and the tenant settings the operator sets.

Each test runs on a queue of its own (the ``queue`` fixture), so no dispatcher of the
session's processes sees these jobs; ``admit`` is called directly, as a dispatcher loop would.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import insert, select, text, update

from chatjobs import jobs
from chatjobs.db import session_scope
from chatjobs.jobs import dispatch
from chatjobs.models import Job, JobStatus, Tenant, uuid7
from chatjobs.queue import express_queue
from chatjobs.schemas import JobCreate
from chatjobs.settings import get_settings
from chatjobs.tenants import create_key, set_limits
from tests.conftest import MiniStack
from tests.integration.test_batch_core import new_batch
from tests.integration.test_keys import cli
from tests.integration.test_reliability import (
    job_body,
    sql,
    statuses,
    successful_calls,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def window(monkeypatch: pytest.MonkeyPatch, queue: str) -> Iterator[Callable[[int], None]]:
    """Set CHATJOBS_DISPATCH_WINDOW, the messages the broker may hold at once."""

    def set_window(n: int) -> None:
        monkeypatch.setenv("CHATJOBS_DISPATCH_WINDOW", str(n))
        get_settings.cache_clear()

    yield set_window
    monkeypatch.delenv("CHATJOBS_DISPATCH_WINDOW", raising=False)
    get_settings.cache_clear()


def new_tenant(**settings: int | float | None) -> uuid.UUID:
    """A tenant with its dispatch settings (weight, max_inflight, tpm_share)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        create_key(session=session, tenant_name=name)
        if settings:
            set_limits(session=session, tenant_name=name, values=settings)
        return session.scalars(select(Tenant.id).where(Tenant.name == name)).one()


def backlog(tenant: uuid.UUID, n: int, *, cost: int = 100, **values: Any) -> list[uuid.UUID]:
    """``n`` jobs waiting for admission, inserted in one statement; returned in id order,
    the order a tenant's jobs are admitted in (uuid7 is random within one millisecond)."""
    ids = sorted(uuid7() for _ in range(n))
    eligible = datetime.now(UTC) - timedelta(seconds=1)
    rows = [
        {
            "id": job_id,
            "tenant_id": tenant,
            "status": JobStatus.queued,
            "model": "gpt-4.1",
            "request": {"messages": [{"role": "user", "content": "hello"}]},
            "cost": cost,
            "queue": get_settings().queue_name,
            "next_attempt_at": eligible,
            **values,
        }
        for job_id in ids
    ]
    with session_scope() as session:
        session.execute(insert(Job), rows)
    return ids


def submit(tenant: uuid.UUID, **extra: Any) -> uuid.UUID:
    """One job through the submission path, as the API stores it."""
    body = JobCreate.model_validate(
        {"request": {"messages": [{"role": "user", "content": "hello"}]}, **extra}
    )
    with session_scope() as session:
        return jobs.create_job(session=session, tenant_id=tenant, body=body).job.id


def admit() -> dispatch.Admitted:
    with session_scope() as session:
        return dispatch.admit(session=session)


def finish(ids: list[uuid.UUID]) -> None:
    """The jobs ran and succeeded (as far as admission cares)."""
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_(ids))
            .values(status=JobStatus.succeeded, completed_at=datetime.now(UTC))
        )


def tenants_of(ids: list[uuid.UUID]) -> Counter[uuid.UUID]:
    with session_scope() as session:
        rows = session.execute(select(Job.tenant_id).where(Job.id.in_(ids))).scalars()
        return Counter(rows)


def admitted(job_id: uuid.UUID) -> bool:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job.status in (JobStatus.queued, JobStatus.retrying) and job.next_attempt_at is None


# --- fair order ----------------------------------------------------------------------------


def test_weights_and_costs_share_the_tokens_over_many_passes(
    window: Callable[[int], None],
) -> None:
    window(12)
    heavy, light, big = new_tenant(weight=2), new_tenant(), new_tenant()
    cost = {heavy: 100, light: 100, big: 400}
    for tenant, n in ((heavy, 300), (light, 300), (big, 100)):
        backlog(tenant, n, cost=cost[tenant])
    tokens: Counter[uuid.UUID] = Counter()
    for _ in range(30):
        done = admit()
        assert len(done.ids) == 12
        for tenant, n in tenants_of(done.ids).items():
            tokens[tenant] += n * cost[tenant]
        finish(done.ids)  # the room is free again for the next pass
    # 2:1:1 in tokens: `big` gets a quarter of `light`'s jobs.
    assert tokens[heavy] / tokens[light] == pytest.approx(2.0, rel=0.1)
    assert tokens[big] / tokens[light] == pytest.approx(1.0, rel=0.1)


def test_one_pass_takes_each_tenants_jobs_oldest_first(window: Callable[[int], None]) -> None:
    window(10)
    a, b = new_tenant(), new_tenant()
    mine, theirs = backlog(a, 20), backlog(b, 20)
    done = admit()
    assert [j for j in done.ids if j in mine] == mine[:5]
    assert [j for j in done.ids if j in theirs] == theirs[:5]


def test_a_higher_priority_job_after_5000_low_priority_ones_is_in_the_next_admission(
    window: Callable[[int], None],
) -> None:
    window(16)
    crowd, other = new_tenant(), new_tenant()
    backlog(crowd, 5000)
    backlog(other, 5000)
    mine = submit(crowd, priority=10)
    theirs = submit(new_tenant(), priority=1)
    assert admit().ids[:2] == [mine, theirs]


def test_a_job_above_the_lowest_priority_in_the_broker_takes_the_express_queue(
    window: Callable[[int], None], tenant: uuid.UUID
) -> None:
    window(4)
    low = backlog(tenant, 10, priority=-50)
    first = admit()
    assert first.ids == low[:4] and first.express == frozenset()  # nothing to overtake
    dispatch.publish(first.ids, express=first.express)
    settings = get_settings()
    broker = redis.Redis.from_url(settings.redis_url)
    broker.rpop(settings.queue_name)  # a worker takes one: room for one more
    dispatch.consumed(low[0])
    with session_scope() as session:
        assert jobs.claim_job(session=session, job_id=low[0], worker="test:1") is not None
    urgent = submit(new_tenant(), priority=50)
    level = submit(new_tenant(), priority=-50)
    done = admit()
    assert done.ids == [urgent] and done.express == {urgent}
    dispatch.publish(done.ids, express=done.express)
    assert broker.llen(express_queue(settings)) == 1
    assert broker.llen(settings.queue_name) == 3  # the window's three untaken messages
    # A job at the broker's lowest priority queues behind the window as usual.
    finish(low[1:4])
    for job_id in low[1:4]:
        dispatch.finished(job_id)
    later = admit()
    assert level in later.ids and level not in later.express


def test_batch_lines_go_after_single_jobs_of_their_own_and_other_tenants(
    window: Callable[[int], None], tenant: uuid.UUID
) -> None:
    window(4)
    batch_id = new_batch(tenant, 20)  # stored first, at the batch class's priority
    own, other = submit(tenant), submit(new_tenant())
    with session_scope() as session:
        priorities = set(session.scalars(select(Job.priority).where(Job.batch_id == batch_id)))
    assert priorities == {dispatch.PRIORITY_BATCH}
    first = admit()
    assert set(first.ids[:2]) == {own, other}
    with session_scope() as session:
        rest = session.scalars(select(Job.batch_id).where(Job.id.in_(first.ids[2:]))).all()
    assert rest == [batch_id, batch_id]  # the room left goes to the batch's lines


def test_a_job_waiting_for_its_retry_time_or_past_its_deadline_is_not_admitted(
    window: Callable[[int], None], tenant: uuid.UUID
) -> None:
    window(10)
    later = backlog(tenant, 1, next_attempt_at=datetime.now(UTC) + timedelta(minutes=5))
    overdue = backlog(tenant, 1, deadline=datetime.now(UTC) - timedelta(seconds=1))
    ready = backlog(tenant, 1)
    assert admit().ids == ready
    assert not admitted(later[0]) and not admitted(overdue[0])


# --- caps and room -------------------------------------------------------------------------


def test_max_inflight_counts_running_and_admitted_jobs_and_others_take_the_room(
    window: Callable[[int], None],
) -> None:
    window(20)
    capped, free = new_tenant(max_inflight=5), new_tenant()
    running = backlog(capped, 2)
    for job_id in running:  # two of its jobs are running already
        with session_scope() as session:
            assert jobs.claim_job(session=session, job_id=job_id, worker="test:1") is not None
    backlog(capped, 50)
    backlog(free, 50)
    first = admit()
    assert tenants_of(first.ids) == {capped: 3, free: 17}
    dispatch.publish(first.ids)  # in the broker, not yet taken: still in flight
    finish([j for j in first.ids if j not in of(capped, first.ids)])
    second = admit()
    assert tenants_of(second.ids) == {free: 17}


def of(tenant: uuid.UUID, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    with session_scope() as session:
        return set(session.scalars(select(Job.id).where(Job.id.in_(ids), Job.tenant_id == tenant)))


def test_the_default_max_inflight_applies_to_a_tenant_without_its_own(
    window: Callable[[int], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    window(20)
    monkeypatch.setenv("CHATJOBS_TENANT_MAX_INFLIGHT", "3")
    get_settings.cache_clear()
    default, own, unlimited = new_tenant(), new_tenant(max_inflight=6), new_tenant(max_inflight=0)
    for tenant in (default, own, unlimited):
        backlog(tenant, 30)
    assert tenants_of(admit().ids) == {default: 3, own: 6, unlimited: 11}


def test_the_room_is_the_window_less_the_messages_the_broker_still_holds(
    window: Callable[[int], None], tenant: uuid.UUID
) -> None:
    window(10)
    backlog(tenant, 30)
    first = admit()
    assert (len(first.ids), first.room) == (10, 10)
    dispatch.publish(first.ids)
    full = admit()
    assert full.ids == [] and full.room == 0
    # Workers take four messages and claim their jobs: room for four more.
    for job_id in first.ids[:4]:
        dispatch.consumed(job_id)
        with session_scope() as session:
            assert jobs.claim_job(session=session, job_id=job_id, worker="test:1") is not None
    again = admit()
    assert (len(again.ids), again.room) == (4, 4)


# --- lost messages and the lock ------------------------------------------------------------


def test_an_admitted_job_missing_from_the_broker_for_10s_is_admitted_again_a_fresh_one_not(
    window: Callable[[int], None], tenant: uuid.UUID
) -> None:
    window(10)
    held, lost, fresh = backlog(tenant, 3)
    assert admit().ids == [held, lost, fresh]
    dispatch.publish([held])  # lost and fresh: admitted, never published
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_([held, lost]))
            .values(updated_at=datetime.now(UTC) - timedelta(seconds=11))
        )
    repaired = admit()
    assert repaired.readmitted == 1
    assert repaired.ids == [lost]  # eligible again, and admitted again in the same pass
    assert admitted(held) and admitted(fresh)
    assert dispatch.in_broker([held, lost, fresh]) == [True, False, False]


# A publish record outlives its message when the process between the two dies: a dispatcher
# killed after recording and before sending, or a worker killed after taking the message
# (BRPOP) and before marking it taken (``consumed``). A record that says "published" for a
# job whose message is not in the broker's list (read twice, 2 s apart) is not trusted.
def test_a_job_whose_recorded_message_is_gone_is_admitted_again_within_the_stale_interval(
    window: Callable[[int], None], tenant: uuid.UUID
) -> None:
    window(10)
    [job] = backlog(tenant, 1)
    assert admit().ids == [job]
    # Recorded, never sent (or taken by a worker that died before starting it).
    stale = get_settings().stale_queued_seconds + 1
    dispatch._redis().zadd(dispatch._published_key(), {str(job): time.time() - stale})
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job)
            .values(updated_at=datetime.now(UTC) - timedelta(seconds=stale))
        )
    # The passes a dispatcher loop and the reconciler make: one of them must find it.
    deadline = time.monotonic() + 10
    while True:
        with session_scope() as session:
            found, _ = dispatch.find_lost(session=session, after=None, limit=100)
        if found or job in admit().ids:
            break
        assert time.monotonic() < deadline, "the job is still waiting for a message that is gone"
        time.sleep(0.5)


def test_a_second_dispatcher_gets_nothing_while_the_first_holds_its_transaction(
    window: Callable[[int], None], tenant: uuid.UUID
) -> None:
    window(5)
    ids = backlog(tenant, 10)
    with session_scope() as first:
        taken = dispatch.admit(session=first)
        assert taken.ids == ids[:5]
        with session_scope() as second:
            assert dispatch.admit(session=second) == dispatch.Admitted([], 0, False)
    # The first committed and published nothing (as if killed before publishing): its five
    # hold the window until they are found missing from the broker (after 10 s).
    after = admit()
    assert after.ids == [] and after.room == 0


# --- the operator's settings ---------------------------------------------------------------


def test_tenants_set_and_list_show_weight_max_inflight_and_tpm_share(
    stack_env: dict[str, str],
) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        create_key(session=session, tenant_name=name)
    done = cli(
        stack_env, "tenants", "set", name, "--weight", "2", "--max-inflight", "100",
        "--tpm-share", "0.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "weight=2" in done.stdout and "max_inflight=100" in done.stdout
    assert "tpm_share=0.5" in done.stdout

    def shown() -> dict[str, str]:
        listed = cli(stack_env, "tenants", "list")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.splitlines()
        row = next(r.split() for r in rows if r.startswith(name))
        return dict(zip(header.split(), row, strict=True))

    assert (shown()["WEIGHT"], shown()["MAX_INFLIGHT"], shown()["TPM_SHARE"]) == (
        "2",
        "100",
        "0.5",
    )
    with session_scope() as session:
        tenant = session.scalars(select(Tenant).where(Tenant.name == name)).one()
        assert (tenant.weight, tenant.max_inflight, tenant.tpm_share) == (2, 100, 0.5)

    reset = ("--weight", "default", "--max-inflight", "default", "--tpm-share", "none")
    assert cli(stack_env, "tenants", "set", name, *reset).returncode == 0
    settings = get_settings()
    row = shown()
    assert row["WEIGHT"] == f"{settings.tenant_weight}*"
    assert row["MAX_INFLIGHT"] == f"{settings.tenant_max_inflight or 'none'}*"
    assert row["TPM_SHARE"] == "none"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--weight", "0", "a weight is from 1 to 1000"),
        ("--weight", "1001", "a weight is from 1 to 1000"),
        ("--weight", "two", "'two' is not a whole number or 'default'"),
        ("--max-inflight", "-1", "0 (no limit) or more"),
        ("--tpm-share", "0", "a TPM share is more than 0 and at most 1"),
        ("--tpm-share", "1.5", "a TPM share is more than 0 and at most 1"),
        ("--tpm-share", "half", "'half' is not a number or 'none'"),
    ],
)
def test_tenants_set_refuses_an_invalid_dispatch_setting_and_says_why(
    stack_env: dict[str, str], flag: str, value: str, message: str
) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        create_key(session=session, tenant_name=name)
    refused = cli(stack_env, "tenants", "set", name, flag, value)
    assert refused.returncode != 0
    assert message in refused.stderr
    with session_scope() as session:
        row = session.execute(
            text("SELECT weight, max_inflight, tpm_share FROM tenants WHERE name = :n"), {"n": name}
        ).one()
    assert tuple(row) == (None, None, None)


# --- several dispatchers at once, real processes -------------------------------------------


def calls_per_job(sim: httpx.Client, marker: str) -> Counter[str]:
    """The simulator's calls per job of this test (each job's body is marked ``marker-i``)."""
    calls = sim.get("/_sim/calls", params={"limit": 100000, "x_test": f"{marker}-"}).json()
    marks = (str(c["body"].get("x_test", "")) for c in calls)
    return Counter(m for m in marks if m.startswith(f"{marker}-"))


def submit_all(stack: MiniStack, key: str, marker: str, n: int, latency: float) -> list[str]:
    def post(i: int) -> str:
        with stack.client(key) as client:
            body = job_body(f"{marker}-{i}", x_sim={"latency": latency})
            response = client.post("/v1/jobs", json=body)
            while response.status_code == 429:  # the tenant's submission rate: as a client would
                time.sleep(float(response.headers.get("retry-after", "0.1")))
                response = client.post("/v1/jobs", json=body)
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(post, range(n)))


@pytest.mark.timeout(300)
def test_three_dispatchers_at_once_publish_each_job_once(
    make_stack: Callable[..., MiniStack], api_key: str, sim: httpx.Client
) -> None:
    # Three dispatchers (two workers, beat) race for every pass.
    stack = make_stack(workers=[["--concurrency", "8"], ["--concurrency", "8"]])
    marker = uuid.uuid4().hex
    ids = submit_all(stack, api_key, marker, 300, latency=0.05)
    wait_until(lambda: statuses(ids).get("succeeded") == 300, 180, "all 300 succeeded")
    assert calls_per_job(sim, marker) == {f"{marker}-{i}": 1 for i in range(300)}
    rows = sql(
        "SELECT min(attempts), max(attempts), max(claim_seq) FROM jobs "
        "WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=ids,
    )
    assert tuple(rows[0]) == (1, 1, 1)  # one claim each
    # A second message for a job would have reached a worker and found nothing to claim.
    logs = [p.log_path.read_text() for p in stack.procs if p.name == "worker"]
    assert all("nothing to claim" not in log for log in logs)
    assert all("upstream call" in log for log in logs)  # both workers ran jobs


@pytest.mark.timeout(300)
def test_a_worker_killed_while_jobs_are_dispatched_loses_no_job(
    make_stack: Callable[..., MiniStack], api_key: str, sim: httpx.Client
) -> None:
    stack = make_stack(workers=[["--concurrency", "16"], ["--concurrency", "16"]])
    victim = stack.procs[-2]
    marker = uuid.uuid4().hex
    ids = submit_all(stack, api_key, marker, 300, latency=0.5)
    wait_until(lambda: statuses(ids).get("succeeded", 0) >= 60, 120, "the backlog under way")
    victim.stop(signal.SIGKILL)  # its dispatcher, and the jobs it held, die with it
    wait_until(lambda: statuses(ids).get("succeeded") == 300, 180, "all 300 succeeded")
    assert successful_calls(ids) == dict.fromkeys(ids, 1)
    rerun = sql(
        "SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) AND attempts > 1", ids=ids
    )
    assert rerun[0][0] > 0, "the killed worker held no job: recovery was not tested"
