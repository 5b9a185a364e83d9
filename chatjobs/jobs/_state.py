"""The one path for every change of a job's status, and the statuses grouped by what they mean.

``transition()`` is the only function that writes ``jobs.status``: it sets the timestamps,
the lease and ``next_attempt_at`` that belong with the new status, queues the webhook event of
a terminal status in the same transaction, counts a batch's lines as they end (just before
the transaction commits: chatjobs.batches.progress), and remembers the live event to publish
once the transaction commits (never before: a listener must not see a state that was rolled
back).
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import Row, event, func, update
from sqlalchemy.orm import Session

from chatjobs import deliveries, events
from chatjobs.models import TERMINAL_STATUSES, Job, JobStatus

log = logging.getLogger("chatjobs.jobs")

PENDING = (JobStatus.queued, JobStatus.retrying)
ACTIVE = (JobStatus.queued, JobStatus.retrying, JobStatus.running)
BROKEN = (JobStatus.failed, JobStatus.cancelled, JobStatus.expired)
TERMINAL = tuple(TERMINAL_STATUSES)

_EVENTS_KEY = "chatjobs.job_events"
_BATCH_LINES_KEY = "chatjobs.batch_lines_ended"


def transition(
    session: Session,
    where: list[Any],
    to: JobStatus | Any,
    *,
    lease: timedelta | None = None,
    due_in: float | None = None,
    returning: tuple[Any, ...] = (),
    **values: Any,
) -> list[Row[Any]]:
    """Move every job matching ``where`` to ``to`` in one conditional UPDATE ... RETURNING.

    ``to`` may be an SQL expression choosing between pending statuses (a deferral). Running
    takes a ``lease``; a pending status waits for the dispatcher, eligible ``due_in`` seconds
    from now (None: at once); a terminal status completes the job. Each returned row starts with
    ``id`` and ``parent_id``, then ``returning``.
    """
    values.setdefault("updated_at", func.now())
    if to == JobStatus.running:
        assert lease is not None, "a running job holds a lease"
        values.update(lease_expires_at=func.now() + lease, next_attempt_at=None)
    elif to in TERMINAL_STATUSES:
        values.update(
            completed_at=func.now(),
            lease_expires_at=None,
            next_attempt_at=None,
            claimed_by=None,
        )
    else:  # queued or retrying (or a CASE choosing one)
        values.update(
            lease_expires_at=None,
            claimed_by=None,
            next_attempt_at=func.now() + timedelta(seconds=due_in or 0),
        )
    rows = list(
        session.execute(
            update(Job)
            .where(*where)
            .values(status=to, **values)
            .returning(
                Job.id,
                Job.parent_id,
                *returning,
                Job.batch_id,
                Job.webhook_url.is_not(None).label("hooked"),
            )
            .execution_options(synchronize_session=False)
        ).all()
    )
    if rows and isinstance(to, JobStatus):
        if to in TERMINAL_STATUSES:
            # Only jobs that asked for a webhook: no statement at all for the rest.
            hooked = [row.id for row in rows if row.hooked]
            deliveries.queue_events(session, hooked, f"job.{to.value}")
            lines = [row.id for row in rows if row.batch_id is not None and row.parent_id is None]
            session.info.setdefault(_BATCH_LINES_KEY, []).extend(lines)
        pending = session.info.setdefault(_EVENTS_KEY, [])
        pending.extend((row.id, to.value) for row in rows if row.parent_id is None)
    return rows


def set_fields(session: Session, job_id: uuid.UUID, **values: Any) -> None:
    """Change a job's bookkeeping (progress, plan, usage) without touching its status."""
    values.setdefault("updated_at", func.now())
    session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(**values)
        .execution_options(synchronize_session=False)
    )


@event.listens_for(Session, "before_commit")
def _count_batch_lines(session: Session) -> None:
    # Last in the transaction, so the lines' usage and results are final; the batch rows
    # are locked after the job rows, as everywhere (chatjobs.batches.progress).
    ended = session.info.pop(_BATCH_LINES_KEY, None)
    if ended:
        from chatjobs.batches import progress

        progress.lines_ended(session, ended)


@event.listens_for(Session, "after_commit")
def _publish_after_commit(session: Session) -> None:
    for job_id, status in session.info.pop(_EVENTS_KEY, ()):
        events.publish(job_id, "status", {"status": status})


@event.listens_for(Session, "after_rollback")
def _forget_after_rollback(session: Session) -> None:
    session.info.pop(_EVENTS_KEY, None)
    session.info.pop(_BATCH_LINES_KEY, None)
