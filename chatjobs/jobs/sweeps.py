"""The reconciler's repairs and the retention sweep.

Sweeps take their first rows with SKIP LOCKED, in id order, so they never wait on a row a
worker or the API holds; they wait only on the steps of parents whose locks they already
hold (parent, then step). A step that dies for good is handled one family at a time: its
parent's lock first (skipped if busy, retried next pass), then the step.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import delete, exists, func, select
from sqlalchemy.orm import Session

from chatjobs.db import session_scope
from chatjobs.jobs import dispatch, steps
from chatjobs.jobs._state import ACTIVE, TERMINAL, transition
from chatjobs.models import DeliveryStatus, Job, JobStatus, WebhookDelivery
from chatjobs.settings import get_settings

log = logging.getLogger("chatjobs.jobs")

_BATCH = 500


@dataclass(frozen=True)
class Reconciled:
    """What one reconciler pass changed."""

    expired: int
    requeued_lost_lease: int
    failed_lost_lease: int
    republished: int


def _mine() -> Any:
    return Job.queue == get_settings().queue_name


def _free(*where: Any, limit: int = _BATCH) -> Any:
    """Ids matching ``where`` that nobody holds right now, locked in id order."""
    return (
        select(Job.id)
        .where(_mine(), *where)
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )


def expire_overdue(session: Session) -> int:
    """End jobs past their deadline, and their steps (a step's deadline is its parent's).

    A running job's worker abandons its call at its next heartbeat.
    """
    rows = transition(
        session,
        [
            Job.id.in_(
                _free(Job.parent_id.is_(None), Job.status.in_(ACTIVE), Job.deadline < func.now())
            )
        ],
        JobStatus.expired,
        error={
            "type": "deadline_exceeded",
            "message": "the job did not finish before its deadline",
        },
    )
    ids = [row.id for row in rows]
    steps.end_steps(session, ids, JobStatus.expired, "the job passed its deadline")
    steps.roll_up_usage(session, ids)
    return len(ids)


def _lost_message() -> Any:
    return func.concat(
        "the worker running attempt ",
        Job.attempts,
        " stopped renewing its lease (crashed, killed or cut off)",
    )


def recover_lost_leases(session: Session) -> tuple[int, int]:
    """Running jobs whose lease ran out (the worker died) go back to retrying, or end failed
    once the crash has used their last attempt. Returns (requeued, failed)."""
    lost = (Job.status == JobStatus.running, Job.lease_expires_at < func.now())
    requeued = transition(
        session,
        [Job.id.in_(_free(*lost, Job.attempts < Job.max_attempts))],
        JobStatus.retrying,
        due_in=0,
        error=func.jsonb_build_object("type", "worker_lost", "message", _lost_message()),
    )
    out_of_attempts = (*lost, Job.attempts >= Job.max_attempts)
    failure = func.jsonb_build_object(
        "type", "worker_lost", "message", func.concat(_lost_message(), "; no attempts left")
    )
    failed = transition(
        session,
        [Job.id.in_(_free(*out_of_attempts, Job.parent_id.is_(None)))],
        JobStatus.failed,
        error=failure,
    )
    dead_steps = session.execute(
        select(Job.id, Job.parent_id)
        .where(_mine(), *out_of_attempts, Job.parent_id.is_not(None))
        .order_by(Job.parent_id, Job.id)
        .limit(_BATCH)
    ).all()
    failed_steps = 0
    for step_id, parent_id in dead_steps:
        assert parent_id is not None
        parent = session.scalar(
            select(Job.id).where(Job.id == parent_id).with_for_update(skip_locked=True)
        )
        if parent is None:
            continue  # a worker is advancing it: next pass
        ended = transition(
            session,
            [Job.id.in_(_free(Job.id == step_id, *out_of_attempts, limit=1))],
            JobStatus.failed,
            error=failure,
            returning=(Job.step_kind, Job.step_level, Job.step_index, Job.error),
        )
        if ended:
            failed_steps += 1
            row = ended[0]
            end = steps.StepEnd(
                row.step_kind, row.step_level, row.step_index, JobStatus.failed, row.error
            )
            # A failed step fails its parent: nothing becomes runnable to publish.
            steps.advance(session, parent_id, end)
    return len(requeued), len(failed) + failed_steps


_SCAN_KEY = "chatjobs:lost-scan:{queue}"


def republish_lost(session: Session, limit: int = 2000) -> int:
    """Make due the waiting jobs whose broker message is gone (see dispatch); a page of the
    backlog per pass, resuming where the last pass stopped."""
    key = _SCAN_KEY.format(queue=get_settings().queue_name)
    client = dispatch._redis()
    try:
        raw = client.get(key)
        after = uuid.UUID(raw.decode() if isinstance(raw, bytes) else raw) if raw else None
        lost, resume = dispatch.find_lost(session=session, after=after, limit=limit)
        if resume is None:
            client.delete(key)
        else:
            client.set(key, str(resume), ex=3600)
    except redis.RedisError:
        log.warning("Redis unreachable: lost messages not checked this pass", exc_info=True)
        return 0
    return lost


def reconcile(*, session: Session) -> Reconciled:
    """Repair what crashes and lost messages leave behind (each repair is described above)."""
    expired = expire_overdue(session)
    requeued, failed = recover_lost_leases(session)
    republished = republish_lost(session)
    return Reconciled(
        expired=expired,
        requeued_lost_lease=requeued,
        failed_lost_lease=failed,
        republished=republished,
    )


def _prunable(older_than: timedelta) -> list[Any]:
    unsent = exists().where(
        WebhookDelivery.job_id == Job.id,
        WebhookDelivery.status.in_((DeliveryStatus.pending, DeliveryStatus.delivering)),
    )
    return [
        _mine(),
        Job.parent_id.is_(None),
        # A batch's lines go with the batch, when its output expires (chatjobs.batches).
        Job.batch_id.is_(None),
        Job.status.in_(TERMINAL),
        Job.completed_at < func.now() - older_than,
        ~unsent,
    ]


def count_prunable(*, session: Session, older_than: timedelta) -> int:
    """How many finished jobs ``prune_batch`` would delete (steps not counted)."""
    return session.scalar(select(func.count()).where(*_prunable(older_than))) or 0


def prune_batch(*, session: Session, older_than: timedelta, limit: int = _BATCH) -> int:
    """Delete up to ``limit`` jobs finished before ``older_than`` ago, with their steps, calls,
    deliveries and attempts (foreign keys cascade). A job whose webhook is still being
    delivered is kept until it is done. Returns how many top-level jobs went."""
    batch = (
        select(Job.id)
        .where(*_prunable(older_than))
        .order_by(Job.completed_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return len(session.execute(delete(Job).where(Job.id.in_(batch)).returning(Job.id)).all())


def prune(*, older_than: timedelta, dry_run: bool = False) -> int:
    """Delete finished jobs older than ``older_than`` in bounded batches, a transaction each,
    so a large backlog of history never holds locks or memory for long. Returns the count."""
    if dry_run:
        with session_scope() as session:
            return count_prunable(session=session, older_than=older_than)
    total = 0
    while True:
        with session_scope() as session:
            deleted = prune_batch(session=session, older_than=older_than)
        total += deleted
        if deleted < _BATCH:
            return total
