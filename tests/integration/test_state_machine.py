"""Every transition of the job state machine, in-process against real Postgres.

Each test runs on a broker queue of its own, so the session's dispatcher, reconciler and
worker never see these jobs; nothing here publishes a message.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update

from chatjobs import jobs
from chatjobs.db import session_scope
from chatjobs.errors import JobNotFound, UpstreamStatusError
from chatjobs.jobs import steps, sweeps
from chatjobs.models import Job, JobStatus, UpstreamCall, WebhookDelivery
from chatjobs.schemas import JobCreate, JobRead
from chatjobs.settings import get_settings

pytestmark = pytest.mark.integration

USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def submit(tenant: uuid.UUID, **extra: Any) -> uuid.UUID:
    body = JobCreate.model_validate(
        {"request": {"messages": [{"role": "user", "content": "hello"}]}, **extra}
    )
    with session_scope() as session:
        return jobs.create_job(session=session, tenant_id=tenant, body=body).job.id


def claim(job_id: uuid.UUID) -> jobs.Claim | None:
    with session_scope() as session:
        return jobs.claim_job(session=session, job_id=job_id, worker="test:1")


def succeed(c: jobs.Claim, content: str = "ok", usage: dict[str, int] = USAGE) -> jobs.Outcome:
    body = {"choices": [{"message": {"role": "assistant", "content": content}}], "usage": usage}
    with session_scope() as session:
        return jobs.record_outcome(session=session, claim=c, call=call(usage), result=body)


def call(usage: dict[str, int] | None = USAGE, error: str | None = None) -> jobs.Call:
    return jobs.Call(
        stream=False, latency_ms=5, status_code=200, usage=usage, request_id=None, error=error
    )


def row(job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


def calls(job_id: uuid.UUID) -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).where(UpstreamCall.job_id == job_id)) or 0


def error_503() -> UpstreamStatusError:
    return UpstreamStatusError("overloaded", status_code=503)


# --- claim, renew, defer, finish, retry ----------------------------------------------------


def test_claim_takes_a_queued_job_once_and_the_claim_sequence_grows(tenant: uuid.UUID) -> None:
    job_id = submit(tenant)
    first = claim(job_id)
    assert first is not None and (first.attempt, first.claim_seq) == (1, 1)
    assert claim(job_id) is None
    job = row(job_id)
    assert job.status == JobStatus.running and job.lease_expires_at is not None
    assert job.started_at is not None and job.claimed_by == "test:1"


def test_a_job_not_yet_due_or_past_its_deadline_is_not_claimed(tenant: uuid.UUID) -> None:
    later, overdue = submit(tenant), submit(tenant)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == later)
            .values(next_attempt_at=func.now() + timedelta(hours=1))
        )
        session.execute(update(Job).where(Job.id == overdue).values(deadline=func.now()))
    assert claim(later) is None and claim(overdue) is None


def test_defer_gives_the_attempt_back_but_never_the_claim_sequence(tenant: uuid.UUID) -> None:
    job_id = submit(tenant)
    first = claim(job_id)
    assert first is not None
    with session_scope() as session:
        assert jobs.defer_job(session=session, claim=first, delay=0)
    job = row(job_id)
    assert (job.status, job.attempts, job.claim_seq) == (JobStatus.queued, 0, 1)
    assert job.lease_expires_at is None and job.started_at is None
    second = claim(job_id)
    assert second is not None and (second.attempt, second.claim_seq) == (1, 2)
    # The first claim's fence no longer matches: its late result is refused.
    assert succeed(first).status == "stale"
    assert succeed(second).status == "succeeded"
    assert row(job_id).total_tokens == 30  # both calls were made, so both are counted


def test_renew_keeps_only_the_leases_still_held(tenant: uuid.UUID) -> None:
    held, cancelled = submit(tenant), submit(tenant)
    a, b = claim(held), claim(cancelled)
    assert a is not None and b is not None
    with session_scope() as session:
        jobs.cancel_job(session=session, tenant_id=tenant, job_id=cancelled)
    with session_scope() as session:
        kept = jobs.renew_leases(
            session=session, held={(held, a.claim_seq), (cancelled, b.claim_seq), (held, 99)}
        )
    assert kept == {(held, a.claim_seq)}


def test_success_writes_the_result_and_usage_once(tenant: uuid.UUID) -> None:
    job_id = submit(tenant, webhook_url="https://example.com/hook")
    c = claim(job_id)
    assert c is not None
    assert succeed(c, "answer").status == "succeeded"
    job = row(job_id)
    assert job.status == JobStatus.succeeded and job.completed_at is not None
    assert job.result is not None and job.result["choices"][0]["message"]["content"] == "answer"
    assert (job.prompt_tokens, job.completion_tokens, job.total_tokens) == (10, 5, 15)
    assert job.lease_expires_at is None
    with session_scope() as session:
        events = session.scalars(
            select(WebhookDelivery.event_type).where(WebhookDelivery.job_id == job_id)
        ).all()
    assert events == ["job.succeeded"]


def test_submit_answers_with_the_row_as_stored(tenant: uuid.UUID) -> None:
    # Keys JSONB reorders, and a deadline in a zone other than the database's.
    india = timezone(timedelta(hours=5, minutes=30))
    body = JobCreate.model_validate(
        {
            "request": {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4.1"},
            "metadata": {"longer": 1, "b": [1.5, None]},
            "deadline": (datetime.now(UTC) + timedelta(days=2)).astimezone(india).isoformat(),
            "webhook_url": "https://example.com/hook",
        }
    )
    with session_scope() as session:
        done = jobs.create_job(session=session, tenant_id=tenant, body=body)
        answered = JobRead.from_job(done.job).model_dump_json()
    assert done.created and done.runnable == [done.job.id]
    assert answered == JobRead.from_job(row(done.job.id)).model_dump_json()


def test_a_claim_holds_its_lease_and_a_retry_waits_its_delay(tenant: uuid.UUID) -> None:
    job_id = submit(tenant)
    c = claim(job_id)
    assert c is not None
    with session_scope() as session:
        now = session.scalar(select(func.now()))
    leased = row(job_id).lease_expires_at
    assert leased is not None and now is not None
    assert abs((leased - now).total_seconds() - get_settings().lease_seconds) < 5
    with session_scope() as session:
        out = jobs.record_outcome(
            session=session, claim=c, call=call(), error=error_503(), retry_in=600
        )
    assert out.status == "retrying"
    job = row(job_id)
    assert job.next_attempt_at is not None and job.claimed_by is None
    assert abs((job.next_attempt_at - now).total_seconds() - 600) < 5
    assert (job.prompt_tokens, job.completion_tokens, job.total_tokens) == (10, 5, 15)


def test_recording_the_same_call_again_counts_nothing_twice(tenant: uuid.UUID) -> None:
    # What a retried commit does after an ambiguous failure: the call is logged already.
    job_id = submit(tenant)
    c = claim(job_id)
    assert c is not None
    assert succeed(c).status == "succeeded"
    assert succeed(c).status.startswith("recorded already")
    assert calls(job_id) == 1 and row(job_id).total_tokens == 15


def test_a_transient_error_retries_and_a_permanent_one_fails(tenant: uuid.UUID) -> None:
    transient, permanent = submit(tenant), submit(tenant)
    a, b = claim(transient), claim(permanent)
    assert a is not None and b is not None
    with session_scope() as session:
        out = jobs.record_outcome(
            session=session, claim=a, call=call(None, "503"), error=error_503(), retry_in=30
        )
        assert out.status == "retrying"
        out = jobs.record_outcome(
            session=session,
            claim=b,
            call=call(None, "400"),
            error=UpstreamStatusError("bad", status_code=400, code=123),  # type: ignore[arg-type]
        )
        assert out.status == "failed"
    retrying, failed = row(transient), row(permanent)
    assert retrying.status == JobStatus.retrying and retrying.next_attempt_at is not None
    assert retrying.lease_expires_at is None and retrying.error is not None
    assert failed.status == JobStatus.failed and failed.error is not None
    assert failed.error["code"] == "123"


def test_cancel_refuses_the_running_call_but_counts_its_usage(tenant: uuid.UUID) -> None:
    job_id = submit(tenant)
    c = claim(job_id)
    assert c is not None
    with session_scope() as session:
        assert jobs.cancel_job(session=session, tenant_id=tenant, job_id=job_id).status == (
            JobStatus.cancelled
        )
    assert succeed(c).status == "stale"
    job = row(job_id)
    assert job.status == JobStatus.cancelled and job.result is None and job.total_tokens == 15


def test_an_internal_error_is_a_recorded_failure_of_that_attempt(tenant: uuid.UUID) -> None:
    job_id = submit(tenant, max_attempts=1)
    c = claim(job_id)
    assert c is not None
    with session_scope() as session:
        out = jobs.fail_attempt(session=session, claim=c, message="boom", retry_in=1)
    assert out.status == "failed"
    assert row(job_id).error == {"type": "internal_error", "message": "boom"}


# --- map-reduce steps ----------------------------------------------------------------------


def chunked(
    tenant: uuid.UUID, maps: int = 3, deadline_in: float = 3600
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """A parent running on ``maps`` map steps, as submit (or a planning worker) leaves it."""
    request = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "a long document"}]}
    parent_id = uuid.uuid4()
    with session_scope() as session:
        session.execute(
            insert(Job).values(
                id=parent_id,
                tenant_id=tenant,
                status=JobStatus.running,
                model="gpt-4.1",
                request=request,
                progress=steps.progress(maps, 0, None),
                queue=get_settings().queue_name,
                max_attempts=2,
                deadline=func.now() + timedelta(seconds=deadline_in),
                started_at=func.now(),
            )
        )
        parent = session.scalars(select(Job).where(Job.id == parent_id)).one()
        ids = steps.insert_steps(session, parent, "map", 0, [request] * maps, [10] * maps)
    return parent_id, ids


def test_a_step_id_is_not_found_on_the_public_api(tenant: uuid.UUID) -> None:
    parent_id, step_ids = chunked(tenant)
    with session_scope() as session:
        with pytest.raises(JobNotFound):
            jobs.get_job(session=session, tenant_id=tenant, job_id=step_ids[0])
        with pytest.raises(JobNotFound):
            jobs.cancel_job(session=session, tenant_id=tenant, job_id=step_ids[0])
        assert [
            s.id for s in jobs.list_steps(session=session, tenant_id=tenant, job_id=parent_id)
        ] == step_ids
        listed, _ = jobs.list_jobs(session=session, tenant_id=tenant)
    assert [j.id for j in listed] == [parent_id]


def test_maps_then_a_reduce_then_the_parent_succeeds_with_every_steps_usage(
    tenant: uuid.UUID,
) -> None:
    parent_id, step_ids = chunked(tenant)
    published: list[uuid.UUID] = []
    for i, step_id in enumerate(step_ids):
        c = claim(step_id)
        assert c is not None
        out = succeed(c, f"part {i}")
        published += out.runnable
        progress = row(parent_id).progress or {}
        assert progress["map"] == {"done": i + 1, "total": 3}
    assert len(published) == 1  # the reduce, once the last map ended
    reduce = row(published[0])
    assert reduce.step_kind == "reduce" and reduce.step_level == 1
    assert "part 0" in reduce.request["messages"][-1]["content"]
    c = claim(published[0])
    assert c is not None
    assert succeed(c, "the whole").runnable == []
    parent = row(parent_id)
    assert parent.status == JobStatus.succeeded
    assert (
        parent.result is not None
        and parent.result["choices"][0]["message"]["content"] == "the whole"
    )
    assert parent.total_tokens == 4 * 15 and parent.result["usage"]["total_tokens"] == 60


def test_a_failed_step_fails_its_parent_and_cancels_the_rest(tenant: uuid.UUID) -> None:
    parent_id, step_ids = chunked(tenant)
    c = claim(step_ids[1])
    assert c is not None
    with session_scope() as session:
        jobs.record_outcome(
            session=session,
            claim=c,
            call=call(None, "400"),
            error=UpstreamStatusError("refused", status_code=400),
        )
    parent = row(parent_id)
    assert parent.status == JobStatus.failed and parent.error is not None
    assert parent.error["type"] == "step_failed" and "refused" in parent.error["message"]
    assert {row(s).status for s in (step_ids[0], step_ids[2])} == {JobStatus.cancelled}


def test_cancelling_a_parent_ends_its_steps(tenant: uuid.UUID) -> None:
    parent_id, step_ids = chunked(tenant)
    running = claim(step_ids[0])
    assert running is not None
    with session_scope() as session:
        jobs.cancel_job(session=session, tenant_id=tenant, job_id=parent_id)
    assert {row(s).status for s in step_ids} == {JobStatus.cancelled}
    assert succeed(running).status == "stale"


def test_a_dead_step_out_of_attempts_fails_its_parent_in_the_sweep(tenant: uuid.UUID) -> None:
    parent_id, step_ids = chunked(tenant)
    for _ in range(2):  # max_attempts 2: two claims whose worker dies
        c = claim(step_ids[0])
        assert c is not None
        with session_scope() as session:
            session.execute(
                update(Job).where(Job.id == step_ids[0]).values(lease_expires_at=func.now())
            )
        with session_scope() as session:
            jobs.reconcile(session=session)
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == step_ids[0]).values(next_attempt_at=None))
    assert row(step_ids[0]).status == JobStatus.failed
    parent = row(parent_id)
    assert parent.status == JobStatus.failed and parent.error is not None
    assert "worker" in parent.error["message"]


def test_expiry_ends_the_parent_and_its_steps(tenant: uuid.UUID) -> None:
    parent_id, step_ids = chunked(tenant, deadline_in=3600)
    assert claim(step_ids[0]) is not None
    with session_scope() as session:
        session.execute(
            update(Job)
            .where((Job.id == parent_id) | (Job.parent_id == parent_id))
            .values(deadline=func.now() - timedelta(seconds=1))
        )
    with session_scope() as session:
        assert jobs.reconcile(session=session).expired == 1
    assert row(parent_id).status == JobStatus.expired
    assert {row(s).status for s in step_ids} == {JobStatus.expired}


# --- sweeps --------------------------------------------------------------------------------


def test_a_lost_lease_goes_back_to_retrying_or_fails_without_attempts(tenant: uuid.UUID) -> None:
    again, done = submit(tenant), submit(tenant, max_attempts=1)
    for job_id in (again, done):
        assert claim(job_id) is not None
    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id.in_([again, done])).values(lease_expires_at=func.now())
        )
    with session_scope() as session:
        out = jobs.reconcile(session=session)
    assert (out.requeued_lost_lease, out.failed_lost_lease) == (1, 1)
    assert row(again).status == JobStatus.retrying and row(again).next_attempt_at is not None
    assert row(done).status == JobStatus.failed


def test_only_jobs_whose_message_is_gone_are_republished(tenant: uuid.UUID) -> None:
    from chatjobs.jobs import dispatch

    held, lost = submit(tenant), submit(tenant)
    dispatch._redis().zadd(dispatch._published_key(), {str(held): __import__("time").time()})
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_([held, lost]))
            # Admitted (a message out for each) an hour ago.
            .values(next_attempt_at=None, updated_at=func.now() - timedelta(hours=1))
        )
    with session_scope() as session:
        assert sweeps.republish_lost(session) == 1
    assert row(lost).next_attempt_at is not None and row(held).next_attempt_at is None


def test_prune_deletes_old_finished_jobs_with_their_steps_and_nothing_unfinished(
    tenant: uuid.UUID,
) -> None:
    old, fresh, waiting = submit(tenant), submit(tenant), submit(tenant)
    hooked = submit(tenant, webhook_url="https://example.com/hook")
    parent_id, step_ids = chunked(tenant)
    for job_id in (old, fresh, hooked):
        c = claim(job_id)
        assert c is not None
        succeed(c)
    with session_scope() as session:
        jobs.cancel_job(session=session, tenant_id=tenant, job_id=parent_id)
        session.execute(
            update(Job)
            .where(Job.id.in_([old, hooked, parent_id, waiting]))
            .values(completed_at=func.now() - timedelta(days=40))
        )
    month = timedelta(days=30)
    with session_scope() as session:
        assert jobs.count_prunable(session=session, older_than=month) == 2
    with session_scope() as session:
        assert jobs.prune_batch(session=session, older_than=month) == 2
    with session_scope() as session:
        left = set(session.scalars(select(Job.id).where(Job.tenant_id == tenant)))
        assert calls(old) == 0
    # The webhook of `hooked` is still pending: kept until it is delivered.
    assert left == {fresh, waiting, hooked}
    assert not set(step_ids) & left


# --- concurrency ---------------------------------------------------------------------------


def test_steps_finishing_while_sweeps_run_never_deadlock(tenant: uuid.UUID) -> None:
    """Many parents' steps finish on threads while reconcile passes (some parents expiring
    mid-run) loop on two more; no deadlock is raised and every parent ends consistent."""
    families = [chunked(tenant, maps=6) for _ in range(8)]
    doomed = [chunked(tenant, maps=4) for _ in range(4)]  # past their deadline mid-run
    claims = [c for _, ids in families + doomed for s in ids if (c := claim(s)) is not None]
    errors: list[BaseException] = []
    stop = threading.Event()

    def finish(part: list[jobs.Claim]) -> None:
        try:
            for c in part:
                succeed(c)
        except BaseException as exc:
            errors.append(exc)

    def sweep() -> None:
        try:
            while not stop.is_set():
                with session_scope() as session:
                    jobs.reconcile(session=session)
        except BaseException as exc:
            errors.append(exc)

    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id.in_([p for p, _ in doomed]) | Job.parent_id.in_([p for p, _ in doomed]))
            .values(deadline=func.now())
        )
    threads = [threading.Thread(target=finish, args=(claims[i::4],)) for i in range(4)]
    sweepers = [threading.Thread(target=sweep) for _ in range(2)]
    for t in sweepers + threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    for t in sweepers:
        t.join(60)
    assert not errors, errors
    for parent_id, ids in families:
        # Each family's maps are done; its reduce waits (nobody runs it here).
        parent = row(parent_id)
        assert parent.status == JobStatus.running
        assert (parent.progress or {})["map"] == {"done": 6, "total": 6}
        assert all(row(s).status == JobStatus.succeeded for s in ids)
    for parent_id, ids in doomed:
        assert row(parent_id).status == JobStatus.expired
        assert {row(s).status for s in ids} <= {JobStatus.expired, JobStatus.cancelled}


def test_the_worker_plans_with_its_tenants_own_limit_on_map_calls(tenant: uuid.UUID) -> None:
    from chatjobs import longcontext
    from chatjobs.errors import TooManyUpstreamCalls
    from chatjobs.models import Tenant

    with session_scope() as session:
        session.execute(update(Tenant).where(Tenant.id == tenant).values(max_calls_per_job=2))
    job_id = submit(tenant)
    c = claim(job_id)
    assert c is not None
    with session_scope() as session:
        _, options, max_calls = jobs.load_for_plan(session=session, claim=c)
    assert max_calls == 2
    with pytest.raises(TooManyUpstreamCalls) as raised:
        longcontext.plan(
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 400_000}]},
            "gpt-4o",
            None,
            max_calls=max_calls,
        )
    with session_scope() as session:
        planned = jobs.apply_plan(session=session, claim=c, plan=raised.value, options=options)
    assert planned.outcome == "failed"
    assert (row(job_id).error or {})["type"] == "too_many_upstream_calls"
