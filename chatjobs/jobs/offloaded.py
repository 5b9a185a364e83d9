"""Jobs sent to a provider's batch API (chatjobs.offload): claimed for an upstream batch,
and handed back when the upstream did not finish them.

An offloaded job is ``running`` with ``claimed_by = 'offload:<upstream_batches.id>'`` and
its lease running to its deadline (the reconciler's lost-lease sweep leaves it alone); its
outcome is written by ``record_outcome`` like any call's, fenced on this claim.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from chatjobs.jobs._state import PENDING, transition
from chatjobs.jobs.attempts import Claim, defer_job
from chatjobs.models import Job, JobStatus


def owner(upstream_batch: uuid.UUID) -> str:
    """The ``claimed_by`` of the jobs in one upstream batch."""
    return f"offload:{upstream_batch}"


def claim_offloaded(
    session: Session, job_ids: Sequence[uuid.UUID], upstream_batch: uuid.UUID
) -> list[uuid.UUID]:
    """Move pending jobs (locked by the caller) to running in ``upstream_batch``; returns
    those moved."""
    if not job_ids:
        return []
    rows = transition(
        session,
        [Job.id.in_(list(job_ids)), Job.status.in_(PENDING)],
        JobStatus.running,
        # lease_expires_at = now() + (deadline - now()): the deadline itself.
        lease=cast(Any, Job.deadline - func.now()),
        attempts=Job.attempts + 1,
        claim_seq=Job.claim_seq + 1,
        started_at=func.coalesce(Job.started_at, func.now()),
        claimed_by=owner(upstream_batch),
        upstream_batch_id=upstream_batch,
    )
    return [row.id for row in rows]


def offloaded_claims(session: Session, upstream_batch: uuid.UUID) -> dict[str, Claim]:
    """The claims of the jobs still running in ``upstream_batch``, by job id (text)."""
    rows = session.execute(
        select(
            Job.id,
            Job.claim_seq,
            Job.attempts,
            Job.model,
            Job.max_attempts,
            Job.prompt_token_estimate,
            Job.parent_id,
            Job.tenant_id,
            Job.batch_id,
        ).where(
            Job.upstream_batch_id == upstream_batch,
            Job.status == JobStatus.running,
            Job.claimed_by == owner(upstream_batch),
        )
    ).all()
    return {
        str(row.id): Claim(
            job_id=row.id,
            claim_seq=row.claim_seq,
            attempt=row.attempts,
            model=row.model,
            request={},
            max_attempts=row.max_attempts,
            prompt_tokens=row.prompt_token_estimate,
            parent_id=row.parent_id,
            tenant_id=row.tenant_id,
            batch_id=row.batch_id,
        )
        for row in rows
    }


def hand_back(session: Session, claim: Claim) -> bool:
    """An item the upstream never ran (expired, cancelled, missing): pending again at once,
    its attempt given back; offloaded again if its deadline still allows, else run here."""
    return defer_job(session=session, claim=claim, delay=0)
