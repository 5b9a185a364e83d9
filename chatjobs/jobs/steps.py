"""Chunked jobs: map and reduce steps are child jobs, and the parent advances as they end.

Every terminal transition of a step is followed, in the same transaction and with the
parent's row lock already held, by ``advance()``. The parent keeps per-level counters in its
``progress``, so a step's end costs O(1) and each level's results are read once, when the
level completes: O(N) for the whole job instead of re-reading every sibling on every finish.
"""

from __future__ import annotations

import copy
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs import longcontext
from chatjobs.errors import ContextTooLong
from chatjobs.jobs._state import ACTIVE, BROKEN, set_fields, transition
from chatjobs.models import Job, JobStatus, uuid7
from chatjobs.routing import model_spec, output_budget
from chatjobs.tokens import count_messages


@dataclass(frozen=True)
class StepEnd:
    """How one step ended: what its parent needs to move on."""

    kind: str
    level: int
    index: int
    status: JobStatus
    error: dict[str, Any] | None = None


def progress(map_total: int, map_done: int, reduce: dict[str, int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {"map": {"done": map_done, "total": map_total}}
    if reduce is not None:
        out["reduce"] = reduce
    return out


def lock_parent(session: Session, parent_id: uuid.UUID | None) -> None:
    """Take a step's parent row lock; always before any lock on the step itself."""
    if parent_id is not None:
        session.execute(select(Job.id).where(Job.id == parent_id).with_for_update())


def insert_steps(
    session: Session,
    parent: Job,
    kind: str,
    level: int,
    requests: list[dict[str, Any]],
    counts: list[int],
) -> list[uuid.UUID]:
    """Insert one queued child job per request (``counts``: each one's prompt tokens)."""
    if not requests:
        return []
    spec = model_spec(parent.model)
    rows = [
        {
            "id": uuid7(),
            "tenant_id": parent.tenant_id,
            "status": JobStatus.queued,
            "model": parent.model,
            "request": request,
            "prompt_token_estimate": count,
            "token_count_method": spec.encoding or "estimate",
            "priority": parent.priority,
            "cost": count + output_budget(request, spec),
            "next_attempt_at": func.now(),
            "queue": parent.queue,
            "max_attempts": parent.max_attempts,
            "deadline": parent.deadline,
            "parent_id": parent.id,
            "step_kind": kind,
            "step_level": level,
            "step_index": i,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "attempts": 0,
        }
        for i, (request, count) in enumerate(zip(requests, counts, strict=True))
    ]
    stmt = insert(Job).values(rows).on_conflict_do_nothing(constraint="uq_jobs_parent_id_step")
    return list(session.scalars(stmt.returning(Job.id)))


def end_steps(session: Session, parent_ids: list[uuid.UUID], to: JobStatus, reason: str) -> None:
    """End the unfinished steps of parents whose locks are held, locking them in id order."""
    if not parent_ids:
        return
    unfinished = (
        select(Job.id)
        .where(Job.parent_id.in_(parent_ids), Job.status.in_(ACTIVE))
        .order_by(Job.id)
        .with_for_update()
        .scalar_subquery()
    )
    transition(
        session,
        [Job.id.in_(unfinished)],
        to,
        error={"type": "parent_ended", "message": reason},
    )


def roll_up_usage(session: Session, parent_ids: list[uuid.UUID]) -> None:
    """Set each parent's usage to the sum over its steps (each step's is the sum of its calls)."""
    if not parent_ids:
        return
    sums = (
        select(
            Job.parent_id.label("parent_id"),
            func.sum(Job.prompt_tokens).label("prompt_tokens"),
            func.sum(Job.completion_tokens).label("completion_tokens"),
            func.sum(Job.total_tokens).label("total_tokens"),
        )
        .where(Job.parent_id.in_(parent_ids))
        .group_by(Job.parent_id)
        .subquery()
    )
    session.execute(
        update(Job)
        .where(Job.id == sums.c.parent_id)
        .values(
            prompt_tokens=sums.c.prompt_tokens,
            completion_tokens=sums.c.completion_tokens,
            total_tokens=sums.c.total_tokens,
        )
        .execution_options(synchronize_session=False)
    )


def _usage_of_steps(session: Session, parent_id: uuid.UUID) -> dict[str, int]:
    row = session.execute(
        select(
            func.coalesce(func.sum(Job.prompt_tokens), 0),
            func.coalesce(func.sum(Job.completion_tokens), 0),
            func.coalesce(func.sum(Job.total_tokens), 0),
        ).where(Job.parent_id == parent_id)
    ).one()
    return {"prompt_tokens": row[0], "completion_tokens": row[1], "total_tokens": row[2]}


def end_parent(
    session: Session,
    parent_id: uuid.UUID,
    to: JobStatus,
    *,
    result: dict[str, Any] | None = None,
    error: dict[str, Any] | None = None,
) -> bool:
    """End a running parent (its lock held) with its steps' usage (also the ``usage`` of its
    ``result``); its unfinished steps are cancelled."""
    usage = _usage_of_steps(session, parent_id)
    values: dict[str, Any] = dict(usage)
    if result is not None:
        values["result"] = {**result, "usage": usage}
    if error is not None:
        values["error"] = error
    ended = transition(
        session, [Job.id == parent_id, Job.status == JobStatus.running], to, **values
    )
    if not ended:
        return False
    # Ending a step does not change its usage: the sums above stand.
    end_steps(session, [parent_id], JobStatus.cancelled, f"the job ended {to.value}")
    return True


def advance(session: Session, parent_id: uuid.UUID, step: StepEnd) -> list[uuid.UUID]:
    """Move a chunked job on after one of its steps ended; returns the steps it made runnable.

    The caller holds the parent's lock. A step that ended failed, cancelled or expired fails
    the parent (and cancels the rest); the last map of a level starts the reduces over that
    level's answers (recursively, until one reduce remains); the last reduce's answer, with
    the usage of every step, is the parent's result.
    """
    parent = session.execute(
        select(Job.status, Job.progress).where(Job.id == parent_id)
    ).one_or_none()
    if parent is None or parent.status != JobStatus.running:
        return []
    if step.status in BROKEN:
        message = (step.error or {}).get("message") or step.status.value
        end_parent(
            session,
            parent_id,
            JobStatus.failed,
            error={
                "type": "step_failed",
                "message": f"{step.kind} step {step.index + 1} of level {step.level} ended "
                f"{step.status.value}: {message}",
            },
        )
        return []
    if step.status != JobStatus.succeeded:
        return []
    state = copy.deepcopy(parent.progress or {})
    level = (state.get("reduce") or {}).get("level", 0)
    counter = state["reduce"] if level else state["map"]
    counter["done"] += 1
    set_fields(session, parent_id, progress=state)
    if counter["done"] < counter["total"]:
        return []
    if level and counter["total"] == 1:
        result = session.scalar(
            select(Job.result).where(
                Job.parent_id == parent_id, Job.step_level == level, Job.step_index == 0
            )
        )
        end_parent(session, parent_id, JobStatus.succeeded, result=result or {})
        return []
    return _next_reduce(session, parent_id, level, state)


def _level_answers(session: Session, parent_id: uuid.UUID, level: int) -> list[str]:
    content = func.jsonb_extract_path_text(Job.result, "choices", "0", "message", "content")
    rows = session.execute(
        select(func.coalesce(content, ""))
        .where(Job.parent_id == parent_id, Job.step_level == level)
        .order_by(Job.step_index)
    ).all()
    return [row[0] for row in rows]


def _next_reduce(
    session: Session, parent_id: uuid.UUID, level: int, state: dict[str, Any]
) -> list[uuid.UUID]:
    parent = session.scalars(select(Job).where(Job.id == parent_id)).one()
    parts = _level_answers(session, parent_id, level)
    spec = model_spec(parent.model)
    reduce_prompt = (parent.long_context or {}).get("reduce_prompt")
    try:
        groups = longcontext.group_parts(parent.request, parts, spec, reduce_prompt)
    except ContextTooLong as exc:
        end_parent(
            session,
            parent_id,
            JobStatus.failed,
            error={"type": "context_length_exceeded", "message": str(exc)},
        )
        return []
    requests = [
        longcontext.reduce_request(parent.request, [parts[i] for i in group], spec, reduce_prompt)
        for group in groups
    ]
    counts = [count_messages(r["messages"], spec).tokens for r in requests]
    state["reduce"] = {"level": level + 1, "done": 0, "total": len(requests)}
    set_fields(session, parent_id, progress=state)
    return insert_steps(session, parent, "reduce", level + 1, requests, counts)


def list_steps(session: Session, parent_id: uuid.UUID) -> list[Job]:
    """A chunked job's steps in order (the caller has checked the parent is the tenant's)."""
    return list(
        session.scalars(
            select(Job).where(Job.parent_id == parent_id).order_by(Job.step_level, Job.step_index)
        )
    )
