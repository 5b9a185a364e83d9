"""Getting jobs onto the broker exactly when they need a message, and noticing lost ones.

Postgres says which jobs are waiting; the broker holds at most one wake-up per job. Every
publish is recorded in a Redis sorted set (job id -> publish time) on the broker's own Redis,
and a worker removes the id when it takes the message. So "the broker no longer holds it" is
one ZMSCORE away: an id missing from the set was consumed or lost with the broker's data
(a flush, a restart without persistence, a publish that failed after commit), and a deep but
healthy backlog is never republished, however long it waits.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from datetime import timedelta
from functools import lru_cache

import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from chatjobs import db
from chatjobs.jobs._state import PENDING
from chatjobs.models import Job, JobStatus
from chatjobs.queue import enqueue_jobs
from chatjobs.settings import get_settings

log = logging.getLogger("chatjobs.jobs")

# A message handed to a worker that died unacknowledged is given back by the broker after
# its visibility timeout (chatjobs.queue); past that, an id still in the set is presumed lost.
_PRESUMED_LOST_AFTER = 3600.0


def _published_key() -> str:
    return f"chatjobs:published:{get_settings().queue_name}"


@lru_cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=2)


def publish(job_ids: Sequence[uuid.UUID]) -> None:
    """Publish one wake-up per job and record it. Call only after the rows have committed.

    Recorded first, published second: a worker may take the message (and remove the record)
    the moment it is published, and a record written after that would say the broker holds
    a message it does not. Raises on a broker failure (the records are taken back): the
    caller logs it, and the reconciler finds the job unpublished.
    """
    if not job_ids:
        return
    recorded = True
    try:
        now = time.time()
        _redis().zadd(_published_key(), {str(job_id): now for job_id in job_ids})
    except redis.RedisError:
        # Unrecorded, the job looks lost and may get one more message: the claim is
        # conditional, so a duplicate costs a no-op task.
        recorded = False
        log.warning("publishing %d jobs without recording it", len(job_ids), exc_info=True)
    try:
        enqueue_jobs(job_ids)
    except Exception:
        if recorded:
            with contextlib.suppress(redis.RedisError):
                _redis().zrem(_published_key(), *(str(job_id) for job_id in job_ids))
        raise


def consumed(job_id: uuid.UUID) -> None:
    """A worker took this job's message: the broker no longer holds one for it."""
    try:
        _redis().zrem(_published_key(), str(job_id))
    except redis.RedisError:
        log.debug("could not mark job %s consumed", job_id, exc_info=True)


def in_broker(job_ids: Sequence[uuid.UUID]) -> list[bool]:
    """For each job, whether the broker still holds an unconsumed message for it."""
    if not job_ids:
        return []
    scores = _redis().zmscore(_published_key(), [str(j) for j in job_ids])
    horizon = time.time() - _PRESUMED_LOST_AFTER
    return [score is not None and score > horizon for score in scores]


def take_due(*, session: Session, limit: int = 1000) -> list[uuid.UUID]:
    """Claim the right to publish jobs whose delay is over, clearing next_attempt_at."""
    return db.take_due(
        session,
        Job,
        Job.queue == get_settings().queue_name,
        Job.status.in_(PENDING),
        limit=limit,
    )


def waiting_in_broker() -> int:
    """How many published messages of this queue no worker has said it took (a gauge for
    operators and benchmarks; a record can outlive its message, see ``release_held``)."""
    horizon = time.time() - _PRESUMED_LOST_AFTER
    return int(_redis().zcount(_published_key(), horizon, "+inf"))


def release_held(*, session: Session) -> int:
    """Make due as many held batch lines as there is room for, highest priority and oldest
    first; ``take_due`` then publishes them.

    The room is ``batch_release_window`` less the batch lines already released and not yet
    started (waiting in the broker, or deferred by the rate limiter until the upstream can
    take them): a batch goes at the pace the workers and the upstream's limits allow, and a
    job submitted after a 50,000-line batch waits behind at most that many of its messages,
    not behind the batch.
    """
    settings = get_settings()
    mine = Job.queue == settings.queue_name
    window = settings.batch_release_window
    # From Postgres, not the broker's records: a record can outlive its message (a worker
    # killed between taking it and saying so), and a window that counted it would stall.
    started_not = (
        select(Job.id)
        .where(
            mine,
            Job.batch_id.is_not(None),
            Job.held.is_(False),
            Job.status.in_(PENDING),
        )
        .limit(window)
        .subquery()
    )
    released = session.scalar(select(func.count()).select_from(started_not)) or 0
    room = window - released
    if room <= 0:
        return 0
    held = (
        select(Job.id)
        .where(mine, Job.held, Job.status == JobStatus.queued)
        .order_by(Job.priority.desc(), Job.id)
        .limit(room)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return len(
        session.execute(
            update(Job)
            .where(Job.id.in_(held))
            .values(held=False, next_attempt_at=func.now(), updated_at=func.now())
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        ).all()
    )


def find_lost(
    *, session: Session, after: uuid.UUID | None, limit: int
) -> tuple[int, uuid.UUID | None]:
    """Make due the waiting jobs whose message is gone, scanning ``limit`` of them after the
    id ``after``; returns (how many were lost, where the next scan starts: None to wrap).

    Only jobs untouched for ``stale_queued_seconds`` are looked at, so a job published a
    moment ago is never mistaken for lost. The scan walks the whole backlog a page per pass
    rather than re-reading its oldest page forever.
    """
    settings = get_settings()
    stmt = select(Job.id).where(
        Job.queue == settings.queue_name,
        Job.status.in_(PENDING),
        Job.next_attempt_at.is_(None),
        Job.held.is_(False),
        Job.updated_at < func.now() - timedelta(seconds=settings.stale_queued_seconds),
    )
    if after is not None:
        stmt = stmt.where(Job.id > after)
    ids = list(session.scalars(stmt.order_by(Job.id).limit(limit)))
    if not ids:
        return 0, None
    lost = [job_id for job_id, held in zip(ids, in_broker(ids), strict=True) if not held]
    if lost:
        # Due now: the dispatcher publishes them. Fenced on the same conditions, so a job
        # that a worker claimed meanwhile is left alone.
        session.execute(
            update(Job)
            .where(Job.id.in_(lost), Job.status.in_(PENDING), Job.next_attempt_at.is_(None))
            .values(next_attempt_at=func.now(), updated_at=func.now())
            .execution_options(synchronize_session=False)
        )
    return len(lost), (ids[-1] if len(ids) == limit else None)


def publish_after_commit(job_ids: Iterable[uuid.UUID], what: str) -> None:
    """Publish, logging instead of raising: the rows are durable and the reconciler repairs."""
    ids = list(job_ids)
    try:
        publish(ids)
    except Exception:
        log.exception("%s: %d jobs stored but not published; the reconciler will", what, len(ids))
