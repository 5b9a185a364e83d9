"""The batch core in-process, on a queue of its own: validation, admission, expiry, prune."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import ColumnElement, func, select, update

from chatjobs import files, jobs
from chatjobs.batches import service
from chatjobs.db import session_scope
from chatjobs.jobs import dispatch
from chatjobs.models import Batch, Job, JobStatus
from chatjobs.schemas import JobCreate
from chatjobs.settings import get_settings

pytestmark = pytest.mark.integration


def upload_batch_file(tenant: uuid.UUID, lines: int) -> str:
    """A batch input file of ``lines`` requests, uploaded for ``tenant``; its id."""
    content = b"".join(
        json.dumps(
            {
                "custom_id": f"c-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": f"line {i}"}]},
            }
        ).encode()
        + b"\n"
        for i in range(lines)
    )
    with session_scope() as session:
        upload, _ = files.store_upload(
            session,
            tenant_id=tenant,
            chunks=[content],
            filename="in.jsonl",
            purpose="batch",
            expires_after_seconds=None,
            idempotency_key=None,
        )
        return upload.id


def new_batch(tenant: uuid.UUID, lines: int, window: str = "24h") -> str:
    file_id = upload_batch_file(tenant, lines)
    with session_scope() as session:
        batch, _ = service.create_batch(
            session,
            tenant_id=tenant,
            new=service.NewBatch(file_id, "/v1/chat/completions", window),
        )
        batch_id = batch.id
    assert service.ingest(batch_id) == "in_progress"
    return batch_id


def count(batch_id: str, *where: ColumnElement[bool]) -> int:
    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Job).where(Job.batch_id == batch_id, *where)
            )
            or 0
        )


def admit() -> list[uuid.UUID]:
    with session_scope() as session:
        return dispatch.admit(session=session).ids


def test_a_batch_fills_at_most_the_window_and_a_later_job_goes_before_its_lines(
    tenant: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHATJOBS_DISPATCH_WINDOW", "5")
    get_settings.cache_clear()
    batch_id = new_batch(tenant, 20)
    assert count(batch_id, Job.next_attempt_at.is_not(None)) == 20  # all waiting in Postgres

    first = admit()
    assert len(first) == 5
    dispatch.publish(first)
    assert admit() == []  # the five wait in the broker: no room
    # A worker takes the five: three run, two the rate limiter defers back to Postgres.
    for job_id in first:
        dispatch.consumed(job_id)
        with session_scope() as session:
            claim = jobs.claim_job(session=session, job_id=job_id, worker="test:1")
            assert claim is not None
            if job_id in first[3:]:
                assert jobs.defer_job(session=session, claim=claim, delay=3600)
    # A job submitted now goes before the batch's remaining lines, into the freed room.
    body = JobCreate.model_validate({"request": {"messages": [{"role": "user", "content": "hi"}]}})
    with session_scope() as session:
        later = jobs.create_job(session=session, tenant_id=tenant, body=body).job.id
    second = admit()
    assert second[0] == later and len(second) == 5
    assert count(batch_id, Job.next_attempt_at.is_(None), Job.status == JobStatus.queued) == 4
    assert count(batch_id, Job.next_attempt_at.is_not(None)) == 20 - 5 - 4 + 2


def test_a_batch_past_its_window_expires_every_line_in_one_pass(tenant: uuid.UUID) -> None:
    batch_id = new_batch(tenant, 12, window="1s")
    with session_scope() as session:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(expires_at=func.now() - timedelta(seconds=1))
        )
        session.execute(
            update(Job)
            .where(Job.batch_id == batch_id)
            .values(deadline=func.now() - timedelta(seconds=1))
        )
    assert service.end_all(service.expire_lines, batch_id, page=5) == 12
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        assert (batch.status, batch.request_expired, batch.request_failed) == ("expired", 12, 12)
        assert batch.output_file_id is None and batch.error_file_id is not None
        seqs = session.scalars(select(Job.batch_seq).where(Job.batch_id == batch_id)).all()
        assert sorted(s or 0 for s in seqs) == list(
            range(1, 13)
        )  # numbered once each, in commit order


def test_prune_deletes_an_old_batch_with_its_lines_a_page_at_a_time(tenant: uuid.UUID) -> None:
    batch_id = new_batch(tenant, 7)
    service.end_all(service.expire_lines, batch_id)  # nothing is overdue: nothing ends
    with session_scope() as session:
        session.execute(
            update(Batch)
            .where(Batch.id == batch_id)
            .values(status="cancelled", finished_at=func.now() - timedelta(days=400))
        )
    assert service.prune(page=3) == 1
    assert count(batch_id) == 0
    with session_scope() as session:
        assert session.get(Batch, batch_id) is None


def test_expires_at_is_created_at_plus_the_window_exactly(tenant: uuid.UUID) -> None:
    batch_id = new_batch(tenant, 1, window="90m")
    with session_scope() as session:
        batch = session.get(Batch, batch_id)
        assert batch is not None
        assert batch.expires_at - batch.created_at == timedelta(minutes=90)


def test_concurrent_creates_under_one_key_make_one_batch_and_every_caller_gets_it(
    tenant: uuid.UUID,
) -> None:
    """The losers of the insert race replay the winner; none sees an error (the insert runs
    in a savepoint, so a lost race does not break the caller's transaction)."""
    import threading

    file_id = upload_batch_file(tenant, 1)
    new = service.NewBatch(file_id, "/v1/chat/completions", "24h")
    key = f"race-{uuid.uuid4().hex}"
    start = threading.Barrier(6)
    made: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def create() -> None:
        try:
            with session_scope() as session:
                start.wait()
                batch, created = service.create_batch(
                    session, tenant_id=tenant, new=new, idempotency_key=key
                )
                made.append((batch.id, created))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len({batch_id for batch_id, _ in made}) == 1
    assert sorted(created for _, created in made) == [False] * 5 + [True]
