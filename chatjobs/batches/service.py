"""Batches: create, read, list, cancel and retry them; validate and store their lines.

A batch is created ``validating`` and answered at once; its input file is then read line by
line (``ingest``), checked as OpenAI checks it, and either every line becomes a waiting job
in one transaction (COPY, so 50,000 lines take seconds) and the batch is ``in_progress``, or
nothing is stored and the batch is ``failed`` with ``errors.data``. The dispatcher admits
the lines at the batch class's priority, fairly with other tenants' work, as workers free up
(chatjobs.jobs.dispatch); their ends move the batch (chatjobs.batches.progress). The
reconciler finishes what a dead process left: validation whose lease ran out, and
cancellations (``sweep``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import delete, exists, func, select, text, update
from sqlalchemy.orm import Session

from chatjobs import deliveries, files
from chatjobs.batches import lines as batch_lines
from chatjobs.batches.lines import ENDPOINT, MAX_ERRORS, Checker, LineError
from chatjobs.db import session_scope
from chatjobs.errors import Conflict, IdempotencyConflict, InvalidRequest, NotFound
from chatjobs.jobs import dispatch, steps
from chatjobs.jobs._state import ACTIVE, transition
from chatjobs.jobs.dispatch import PRIORITY_BATCH
from chatjobs.jobs.submit import estimated_cost
from chatjobs.models import (
    Batch,
    DeliveryStatus,
    Job,
    JobStatus,
    Tenant,
    WebhookDelivery,
    uuid7,
)
from chatjobs.settings import get_settings
from chatjobs.tenants import TenantLimits, queued_jobs

log = logging.getLogger("chatjobs.batches")

OPEN = ("validating", "in_progress", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")
_WINDOW = re.compile(r"^([1-9][0-9]{0,7})([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW = 365 * 86400
# How long one validation may hold a batch before the reconciler takes it over.
VALIDATION_LEASE = timedelta(minutes=5)
MAX_VALIDATIONS = 3
# An unclaimed validating batch this old is validated by the reconciler (its API process
# died between answering and validating).
VALIDATION_GRACE = timedelta(seconds=30)
CANCEL_PAGE = 5000


class BatchNotFound(NotFound):
    """No batch with that id is visible to this tenant."""


class BatchNotCancellable(Conflict):
    """The batch has already ended."""


def window_seconds(value: str) -> int:
    """``24h``, ``30m``, ``7d``, ``90s`` in seconds; InvalidRequest past a year or malformed."""
    match = _WINDOW.match(value)
    seconds = int(match.group(1)) * _UNIT[match.group(2)] if match else 0
    if not match or seconds > MAX_WINDOW:
        raise InvalidRequest(
            "completion_window must be a whole number of s, m, h or d (e.g. 24h, 30m, 7d), "
            "at most 365d",
            param="completion_window",
        )
    return seconds


@dataclass(frozen=True)
class NewBatch:
    """What POST /v1/batches asks for."""

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_seconds: int | None = None
    webhook_url: str | None = None

    def fingerprint(self) -> str:
        canonical = json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(
    session: Session,
    tenant_id: uuid.UUID,
    key: str,
    fingerprint: str,
    retry_of: str | None = None,
) -> Batch | None:
    """The batch made earlier under ``key``, if any, when it was made from the same body (or,
    for a retry, of the same batch: each retry uploads a file of its own); else a 409."""
    existing = session.scalar(
        select(Batch).where(Batch.tenant_id == tenant_id, Batch.idempotency_key == key)
    )
    if existing is None or (retry_of is not None and existing.retry_of == retry_of):
        return existing
    if existing.request_hash != fingerprint:
        raise IdempotencyConflict(
            f"Idempotency-Key was already used with a different body (batch {existing.id}); "
            "use a new key for a new batch"
        )
    return existing


def create_batch(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    new: NewBatch,
    idempotency_key: str | None = None,
    retry_of: str | None = None,
) -> tuple[Batch, bool]:
    """Store the batch ``validating``; (batch, created). Validation happens in ``ingest``."""
    if new.endpoint != ENDPOINT:
        raise InvalidRequest(
            f"endpoint must be {ENDPOINT}: the only endpoint chatjobs runs", param="endpoint"
        )
    seconds = window_seconds(new.completion_window)
    fingerprint = new.fingerprint()
    if idempotency_key is not None:
        replay = _replay(session, tenant_id, idempotency_key, fingerprint, retry_of)
        if replay is not None:
            return replay, False
    try:
        source = files.get_file(session, tenant_id=tenant_id, file_id=new.input_file_id)
    except NotFound:
        raise InvalidRequest(f"no file {new.input_file_id}", param="input_file_id") from None
    if source.purpose != "batch":
        raise InvalidRequest(
            f"file {new.input_file_id} has purpose {source.purpose!r}; a batch reads a file "
            "uploaded with purpose 'batch'",
            param="input_file_id",
        )
    batch = Batch(
        id=f"batch_{uuid7().hex}",
        tenant_id=tenant_id,
        status="validating",
        endpoint=new.endpoint,
        input_file_id=new.input_file_id,
        completion_window=new.completion_window,
        window_seconds=seconds,
        output_expires_seconds=new.output_expires_seconds,
        metadata_=new.metadata,
        webhook_url=new.webhook_url,
        retry_of=retry_of,
        idempotency_key=idempotency_key,
        request_hash=fingerprint,
        queue=get_settings().queue_name,
        # From the database's clock, as created_at is: expires_at = created_at + window.
        expires_at=func.now() + timedelta(seconds=seconds),
    )
    try:
        # Added inside the savepoint: begin_nested() flushes what is pending first, outside
        # it, and a failed insert there would break the whole transaction.
        with session.begin_nested():
            session.add(batch)
            session.flush()
    except Exception:
        if idempotency_key is None:
            raise
        # A concurrent request with the same key won the insert.
        replay = _replay(session, tenant_id, idempotency_key, fingerprint, retry_of)
        if replay is None:
            raise
        return replay, False
    session.refresh(batch)
    return batch, True


def get_batch(session: Session, *, tenant_id: uuid.UUID, batch_id: str) -> Batch:
    batch = session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant_id == tenant_id))
    if batch is None:
        raise BatchNotFound(f"no batch {batch_id}")
    return batch


def running_lines(session: Session, batches: list[Batch]) -> dict[str, int]:
    """How many lines of each open batch are being called right now (one query)."""
    open_ids = [b.id for b in batches if b.status in OPEN]
    if not open_ids:
        return {}
    rows = session.execute(
        select(Job.batch_id, func.count())
        .where(Job.batch_id.in_(open_ids), Job.status == JobStatus.running)
        .group_by(Job.batch_id)
    ).all()
    return {str(batch_id): int(count) for batch_id, count in rows}


def list_batches(
    session: Session, *, tenant_id: uuid.UUID, after: str | None, limit: int
) -> tuple[list[Batch], bool]:
    """Newest first; ``after`` is the last id of the previous page."""
    stmt = select(Batch).where(Batch.tenant_id == tenant_id)
    if after is not None:
        stmt = stmt.where(Batch.id < after)
    rows = list(session.scalars(stmt.order_by(Batch.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def cancel_batch(session: Session, *, tenant_id: uuid.UUID, batch_id: str) -> Batch:
    """Move the batch to ``cancelling`` (its own transaction: the caller commits, then runs
    ``cancel_lines``); cancelling a cancelled batch again is a no-op."""
    moved = session.execute(
        update(Batch)
        .where(
            Batch.id == batch_id,
            Batch.tenant_id == tenant_id,
            Batch.status.in_(("validating", "in_progress")),
        )
        .values(status="cancelling", cancelling_at=func.now())
        .returning(Batch.id)
    ).first()
    batch = get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
    session.refresh(batch)
    if moved is None and batch.status not in ("cancelling", "cancelled"):
        raise BatchNotCancellable(f"batch {batch_id} is already {batch.status}")
    return batch


def cancel(*, tenant_id: uuid.UUID, batch_id: str) -> None:
    """Cancel the batch as POST /v1/batches/{id}/cancel does: ``cancel_batch`` committed, then
    its unfinished lines cancelled page by page (the reconciler finishes if this process
    dies first). BatchNotFound, or BatchNotCancellable once it has ended."""
    with session_scope() as session:
        cancelling = cancel_batch(session, tenant_id=tenant_id, batch_id=batch_id).status
    if cancelling == "cancelling":
        end_all(cancel_lines, batch_id)


def list_lines(
    session: Session,
    *,
    tenant_id: uuid.UUID,
    batch_id: str,
    statuses: Sequence[JobStatus],
    limit: int,
) -> list[Job]:
    """The batch's lines (jobs) in ``statuses``, in the order they ended, at most ``limit``;
    BatchNotFound as ``get_batch``."""
    get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
    return list(
        session.scalars(
            select(Job)
            .where(Job.batch_id == batch_id, Job.tenant_id == tenant_id, Job.status.in_(statuses))
            .order_by(Job.batch_seq.asc().nulls_last(), Job.id)
            .limit(limit)
        )
    )


def cancel_lines(batch_id: str, *, limit: int = CANCEL_PAGE) -> int:
    """Cancel up to ``limit`` of a cancelling batch's unfinished lines (those no one holds),
    and end the batch when none is left; returns how many were cancelled."""
    with session_scope() as session:
        status, total = session.execute(
            select(Batch.status, Batch.request_total).where(Batch.id == batch_id)
        ).one()
        if status != "cancelling":
            return 0
        if total == 0:
            # Cancelled while validating: no line was stored (the validation's fence fails),
            # so once no validator holds it the batch is simply cancelled.
            _cancel_unvalidated(
                session,
                batch_id,
                (Batch.lease_expires_at.is_(None)) | (Batch.lease_expires_at < func.now()),
            )
            return 0
        return _end_lines(
            session, batch_id, JobStatus.cancelled, "the batch was cancelled", limit=limit
        )


def expire_lines(batch_id: str, *, limit: int = CANCEL_PAGE) -> int:
    """End up to ``limit`` unfinished lines of a batch whose window has passed (``batch_expired``
    in its error file); the last one ends the batch ``expired``. The reconciler's deadline
    sweep would get there too, a few hundred jobs a pass; this is a batch's pages at once."""
    with session_scope() as session:
        return _end_lines(
            session,
            batch_id,
            JobStatus.expired,
            "the batch's completion window ended",
            limit=limit,
            where=[Job.deadline < func.now()],
        )


def _end_lines(
    session: Session,
    batch_id: str,
    to: JobStatus,
    why: str,
    *,
    limit: int,
    where: list[Any] | None = None,
) -> int:
    """End up to ``limit`` of the batch's unfinished lines no one holds, with their steps."""
    ids = (
        select(Job.id)
        .where(Job.batch_id == batch_id, Job.status.in_(ACTIVE), *(where or []))
        .order_by(Job.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    rows = transition(
        session,
        [Job.id.in_(ids), Job.status.in_(ACTIVE)],
        to,
        error={"type": f"batch_{to.value}", "message": why},
    )
    ended = [row.id for row in rows]
    steps.end_steps(session, ended, to, why)
    steps.roll_up_usage(session, ended)
    return len(ended)


def _cancel_unvalidated(session: Session, batch_id: str, *where: Any) -> None:
    cancelled = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.status == "cancelling", Batch.request_total == 0, *where)
        .values(
            status="cancelled",
            cancelled_at=func.now(),
            finished_at=func.now(),
            lease_expires_at=None,
        )
        .returning(Batch.id)
    ).first()
    if cancelled is not None:
        deliveries.queue_batch_event(session, [batch_id], "batch.cancelled")


# --- validation and storage of the lines ------------------------------------------------


class _Invalid(Exception):
    def __init__(self, errors: list[LineError]) -> None:
        self.errors = errors


class _Fenced(Exception):
    """The batch changed hands (or was cancelled) while its lines were being stored."""


_COPY_COLUMNS = (
    "id, tenant_id, status, model, request, needs_plan, priority, queue, attempts, "
    "claim_seq, max_attempts, deadline, prompt_tokens, completion_tokens, total_tokens, "
    "batch_id, custom_id, next_attempt_at, cost"
)


def _claim_validation(batch_id: str) -> Any:
    with session_scope() as session:
        return session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                Batch.status == "validating",
                (Batch.lease_expires_at.is_(None)) | (Batch.lease_expires_at < func.now()),
            )
            .values(
                lease_expires_at=func.now() + VALIDATION_LEASE,
                validation_attempts=Batch.validation_attempts + 1,
            )
            .returning(
                Batch.tenant_id,
                Batch.input_file_id,
                Batch.endpoint,
                Batch.expires_at,
                Batch.lease_expires_at,
                Batch.validation_attempts,
            )
        ).first()


def ingest(batch_id: str) -> str | None:
    """Validate the batch's input file and store its lines; returns the batch's new status,
    or None when another process is validating it (or it is no longer validating).

    A validation that breaks on something other than the file (the database or the file
    store away) leaves the batch to the reconciler, which tries again once the lease has
    run out; after ``MAX_VALIDATIONS`` the batch fails with ``validation_error``.
    """
    claim = _claim_validation(batch_id)
    if claim is None:
        return None
    try:
        count, model = _store_lines(batch_id, claim)
    except _Invalid as invalid:
        if _fail(batch_id, claim.lease_expires_at, invalid.errors):
            return "failed"
    except _Fenced:
        pass
    except Exception:
        log.exception("batch %s: validation attempt %d broke", batch_id, claim.validation_attempts)
        if claim.validation_attempts < MAX_VALIDATIONS:
            return None
        error = LineError(
            "validation_error",
            None,
            f"The input file could not be read after {MAX_VALIDATIONS} attempts; "
            "upload it again, or ask the operator (see the server log).",
        )
        return "failed" if _fail(batch_id, claim.lease_expires_at, [error]) else None
    else:
        log.info("batch %s: %d lines stored for %s", batch_id, count, model)
        dispatch.poke()
        return "in_progress"
    # Cancelled meanwhile: nothing was stored, and this validator ends the cancellation.
    with session_scope() as session:
        _cancel_unvalidated(session, batch_id, Batch.lease_expires_at == claim.lease_expires_at)
    return None


_validators: ThreadPoolExecutor | None = None
_validators_lock = threading.Lock()
# Validations one API process runs at once: each holds two database connections (the COPY,
# and the reads of the file), so a burst of batches queues here instead of taking the pool.
VALIDATORS = 2


def validate_soon(batch_id: str) -> None:
    """Validate the batch on this process's validator threads (after the API's answer); if
    the process dies first, the reconciler validates it."""
    global _validators
    with _validators_lock:
        if _validators is None:
            _validators = ThreadPoolExecutor(VALIDATORS, thread_name_prefix="batch-validate")
    _validators.submit(_validate_logged, batch_id)


def _validate_logged(batch_id: str) -> None:
    try:
        ingest(batch_id)
    except Exception:
        log.exception("batch %s: validation failed to run; the reconciler retries", batch_id)


def _chunks(tenant_id: uuid.UUID, file_id: str) -> Iterator[bytes]:
    with session_scope() as session:
        try:
            source = files.get_file(session, tenant_id=tenant_id, file_id=file_id)
        except NotFound:
            raise _Invalid(
                [LineError("invalid_file", None, f"The input file {file_id} was deleted.")]
            ) from None
        session.expunge(source)
    yield from files.open_content(source)


def _store_lines(batch_id: str, claim: Any) -> tuple[int, str | None]:
    settings = get_settings()
    checker = Checker(max_lines=settings.batch_max_lines, default_model=settings.default_model)
    errors: list[LineError] = []
    now = datetime.now(UTC)
    with session_scope() as session:
        cursor = session.connection().connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY jobs ({_COPY_COLUMNS}) FROM STDIN") as copy:
            for number, raw in batch_lines.split_lines(
                _chunks(claim.tenant_id, claim.input_file_id), settings.max_body_bytes
            ):
                line = batch_lines.parse(
                    number, raw, endpoint=claim.endpoint, max_line=settings.max_body_bytes
                )
                problem = line if isinstance(line, LineError) else checker.check(line)
                if problem is not None:
                    errors.append(problem)
                    if len(errors) >= MAX_ERRORS or problem.code == "too_many_tasks":
                        break
                    continue
                if errors:
                    continue  # checking the rest; nothing more is stored
                assert not isinstance(line, LineError)
                model = line.model or settings.default_model
                copy.write_row(
                    (
                        uuid7(),
                        claim.tenant_id,
                        "queued",
                        model,
                        json.dumps(line.body, ensure_ascii=False, separators=(",", ":")),
                        True,
                        PRIORITY_BATCH,
                        settings.queue_name,
                        0,
                        0,
                        settings.max_attempts,
                        claim.expires_at,
                        0,
                        0,
                        0,
                        batch_id,
                        line.custom_id,
                        now,
                        estimated_cost(None, len(raw or b""), line.body, model),
                    )
                )
        if not errors and checker.count == 0:
            errors.append(LineError("empty_file", None, "The input file has no requests."))
        if not errors:
            errors.extend(_over_queue_limit(session, claim.tenant_id, checker.count))
        if errors:
            raise _Invalid(errors)
        started = session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                Batch.status == "validating",
                Batch.lease_expires_at == claim.lease_expires_at,
            )
            .values(
                status="in_progress",
                in_progress_at=func.now(),
                request_total=checker.count,
                model=checker.model,
                lease_expires_at=None,
            )
            .returning(Batch.id)
        ).first()
        if started is None:
            raise _Fenced()
    return checker.count, checker.model


def _over_queue_limit(session: Session, tenant_id: uuid.UUID, lines: int) -> list[LineError]:
    """The tenant's limit on waiting jobs (CHATJOBS_TENANT_MAX_QUEUED or its own) holds for a
    batch as a whole: counted with its lines, already inserted in this transaction."""
    tenant = session.get(Tenant, tenant_id)
    settings = get_settings()
    limit = (
        TenantLimits.of(tenant, settings) if tenant else TenantLimits.resolve({}, settings)
    ).max_queued
    if not limit:
        return []
    waiting = queued_jobs(session=session, tenant_id=tenant_id, cap=limit + 1)
    if waiting <= limit:
        return []
    return [
        LineError(
            "queued_limit_exceeded",
            None,
            f"This batch's {lines} requests would take the jobs waiting for this tenant past "
            f"its limit of {limit}; retry once some have started, or split the file.",
        )
    ]


def _fail(batch_id: str, lease: datetime, errors: list[LineError]) -> bool:
    with session_scope() as session:
        failed = session.execute(
            update(Batch)
            .where(
                Batch.id == batch_id,
                Batch.status == "validating",
                Batch.lease_expires_at == lease,
            )
            .values(
                status="failed",
                failed_at=func.now(),
                finished_at=func.now(),
                lease_expires_at=None,
                errors=[e.to_wire() for e in errors],
            )
            .returning(Batch.id)
        ).first()
        if failed is None:
            return False
        deliveries.queue_batch_event(session, [batch_id], "batch.failed")
    log.info("batch %s failed validation: %d errors", batch_id, len(errors))
    return True


# --- retry ---------------------------------------------------------------------------------

_RETRY_LINE = text(
    """SELECT j.batch_seq, jsonb_build_object(
           'custom_id', j.custom_id, 'method', 'POST', 'url', CAST(:endpoint AS text),
           'body', j.request)::text
       FROM jobs j
      WHERE j.batch_id = :batch_id AND j.status IN ('failed', 'expired', 'cancelled')
        AND j.batch_seq > :after
      ORDER BY j.batch_seq LIMIT 1000"""
)


def _failed_lines(session: Session, batch_id: str, endpoint: str) -> Iterator[bytes]:
    # In the caller's session, between the writes of the new file's content: one
    # connection per retry, however many retries run at once.
    after = 0
    while True:
        page = session.execute(
            _RETRY_LINE, {"batch_id": batch_id, "endpoint": endpoint, "after": after}
        ).all()
        if not page:
            return
        yield ("\n".join(line for _, line in page) + "\n").encode()
        after = page[-1][0]


def retry_batch(
    session: Session, *, tenant_id: uuid.UUID, batch_id: str, idempotency_key: str | None
) -> tuple[Batch, bool]:
    """A new batch of the failed, expired and cancelled lines of an ended batch, with the
    same custom_ids and bodies, and ``metadata.retry_of`` naming the original."""
    original = get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
    if original.status not in ("completed", "expired", "cancelled"):
        raise BatchNotCancellable(
            f"batch {batch_id} is {original.status}: only a completed, expired or cancelled "
            "batch can be retried"
        )
    if original.request_failed == 0:
        raise InvalidRequest(f"batch {batch_id} has no failed lines to retry", param="batch_id")
    metadata = {**(original.metadata_ or {}), "retry_of": batch_id}
    if len(metadata) > 16:
        metadata = dict(list(metadata.items())[-16:])
    if idempotency_key is not None:
        existing = session.scalar(
            select(Batch).where(
                Batch.tenant_id == tenant_id, Batch.idempotency_key == idempotency_key
            )
        )
        if existing is not None:
            if existing.retry_of != batch_id:
                raise IdempotencyConflict(
                    f"Idempotency-Key was already used for batch {existing.id}"
                )
            return existing, False
    source, _ = files.store_upload(
        session,
        tenant_id=tenant_id,
        chunks=_failed_lines(session, batch_id, original.endpoint),
        filename=f"{batch_id}_retry.jsonl",
        purpose="batch",
        expires_after_seconds=None,
        idempotency_key=None,
    )
    new = NewBatch(
        input_file_id=source.id,
        endpoint=original.endpoint,
        completion_window=original.completion_window,
        metadata=metadata,
        output_expires_seconds=original.output_expires_seconds,
        webhook_url=original.webhook_url,
    )
    batch, created = create_batch(
        session,
        tenant_id=tenant_id,
        new=new,
        idempotency_key=idempotency_key,
        retry_of=batch_id,
    )
    if not created:  # a concurrent retry by the same key won: its file is the one used
        files.delete_file(session, tenant_id=tenant_id, file_id=source.id)
    return batch, created


# --- the reconciler's part and retention ---------------------------------------------------


def sweep() -> int:
    """This deployment's repairs: validate batches whose validator died, go on cancelling
    cancelling batches, expire batches past their window. One batch that breaks is logged
    and left for the next pass; the others go on."""
    mine = Batch.queue == get_settings().queue_name
    with session_scope() as session:
        stale = list(
            session.scalars(
                select(Batch.id).where(
                    mine,
                    Batch.status == "validating",
                    (Batch.lease_expires_at < func.now())
                    | (
                        Batch.lease_expires_at.is_(None)
                        & (Batch.created_at < func.now() - VALIDATION_GRACE)
                    ),
                )
            )
        )
        cancelling = list(
            session.scalars(select(Batch.id).where(mine, Batch.status == "cancelling"))
        )
        overdue = list(
            session.scalars(
                select(Batch.id).where(
                    mine, Batch.status == "in_progress", Batch.expires_at < func.now()
                )
            )
        )
    done = 0
    work: list[tuple[Callable[[str], object], str]] = [
        *((ingest, batch_id) for batch_id in stale),
        *((partial(end_all, cancel_lines), batch_id) for batch_id in cancelling),
        *((partial(end_all, expire_lines), batch_id) for batch_id in overdue),
    ]
    for step, batch_id in work:
        try:
            result = step(batch_id)
        except Exception:
            log.exception("batch %s: the reconciler's pass broke; the next one retries", batch_id)
            continue
        done += result if isinstance(result, int) else 1
    return done


def end_all(end: Callable[..., int], batch_id: str, *, page: int = CANCEL_PAGE) -> int:
    """Run ``cancel_lines`` or ``expire_lines`` page after page until a page is not full."""
    total = 0
    while (done := end(batch_id, limit=page)) == page:
        total += done
    return total + done


def prune(*, page: int = 5000) -> int:
    """Delete this deployment's ended batches, with their lines, once both their output has
    expired (``output_expires_after``, else CHATJOBS_BATCH_OUTPUT_EXPIRY_SECONDS) and
    CHATJOBS_RETENTION_DAYS have passed; a batch whose webhook is still being delivered is
    kept until it is done. Lines go ``page`` at a time, a transaction each."""
    settings = get_settings()
    kept = func.greatest(
        func.coalesce(Batch.output_expires_seconds, settings.batch_output_expiry_seconds),
        int(settings.retention_days * 86400),
    )
    due = select(Batch.id).where(
        Batch.queue == settings.queue_name,
        Batch.finished_at < func.now() - func.make_interval(0, 0, 0, 0, 0, 0, kept),
        ~exists().where(
            WebhookDelivery.batch_id == Batch.id,
            WebhookDelivery.status.in_((DeliveryStatus.pending, DeliveryStatus.delivering)),
        ),
    )
    with session_scope() as session:
        doomed = list(session.scalars(due))
    for batch_id in doomed:
        while True:
            with session_scope() as session:
                lines = select(Job.id).where(Job.batch_id == batch_id).limit(page)
                deleted = len(
                    session.execute(
                        delete(Job).where(Job.id.in_(lines.scalar_subquery())).returning(Job.id)
                    ).all()
                )
            if deleted < page:
                break
        with session_scope() as session:
            session.execute(text("DELETE FROM batches WHERE id = :b"), {"b": batch_id})
    return len(doomed)
