"""A batch's counts move with its lines, and it ends with its last line, in one transaction.

``lines_ended`` runs just before a transaction that ended batch lines commits (the hook is
in chatjobs.jobs._state). Under the batch's row lock it numbers the lines in the order they
end (``jobs.batch_seq``: commit order, since the next writer waits for this lock), adds them
to the request counts, the output and error file sizes and the usage, and when nothing is
left to run, ends the batch: status, timestamps, the output and error files (rows only: the
content is read from the jobs), and the webhook event. Finalizing is this one statement.

Lock order: the lines' job rows (already held by the caller), then batch rows in id order.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.orm import Session

from chatjobs import deliveries, files
from chatjobs.batches.output import LINE
from chatjobs.settings import get_settings

# A count from a usage block the upstream wrote: a non-negative integer of sane size, else 0.
_DETAIL = """CASE WHEN jsonb_typeof(j.result #> '{{usage,{path}}}') = 'number'
     AND (j.result #>> '{{usage,{path}}}')::numeric BETWEEN 0 AND 1e12
    THEN (j.result #>> '{{usage,{path}}}')::numeric::bigint ELSE 0 END"""

_COUNT = text(
    f"""
WITH ended AS (
    SELECT j.id, j.batch_id, j.status,
           octet_length({LINE}) + 1 AS nbytes,
           j.prompt_tokens, j.completion_tokens, j.total_tokens,
           {_DETAIL.format(path="prompt_tokens_details,cached_tokens")} AS cached,
           {_DETAIL.format(path="completion_tokens_details,reasoning_tokens")} AS reasoning,
           row_number() OVER (PARTITION BY j.batch_id ORDER BY j.id) AS rn
      FROM jobs j
     WHERE j.id = ANY(:ids) AND j.batch_id IS NOT NULL AND j.batch_seq IS NULL
       AND j.status IN ('succeeded', 'failed', 'expired', 'cancelled')
), numbered AS (
    UPDATE jobs j SET batch_seq = b.request_completed + b.request_failed + e.rn
      FROM ended e JOIN batches b ON b.id = e.batch_id
     WHERE j.id = e.id
), sums AS (
    SELECT batch_id,
           count(*) FILTER (WHERE status = 'succeeded') AS completed,
           count(*) FILTER (WHERE status <> 'succeeded') AS failed,
           count(*) FILTER (WHERE status = 'expired') AS expired,
           count(*) FILTER (WHERE status = 'cancelled') AS cancelled,
           COALESCE(sum(nbytes) FILTER (WHERE status = 'succeeded'), 0) AS output_bytes,
           COALESCE(sum(nbytes) FILTER (WHERE status <> 'succeeded'), 0) AS error_bytes,
           sum(prompt_tokens) AS input_tokens, sum(completion_tokens) AS output_tokens,
           sum(total_tokens) AS total_tokens, sum(cached) AS cached, sum(reasoning) AS reasoning
      FROM ended GROUP BY batch_id
)
UPDATE batches b SET
       request_completed = b.request_completed + s.completed,
       request_failed = b.request_failed + s.failed,
       request_expired = b.request_expired + s.expired,
       request_cancelled = b.request_cancelled + s.cancelled,
       output_bytes = b.output_bytes + s.output_bytes,
       error_bytes = b.error_bytes + s.error_bytes,
       input_tokens = b.input_tokens + s.input_tokens,
       output_tokens = b.output_tokens + s.output_tokens,
       total_tokens = b.total_tokens + s.total_tokens,
       cached_tokens = b.cached_tokens + s.cached,
       reasoning_tokens = b.reasoning_tokens + s.reasoning
  FROM sums s
 WHERE b.id = s.batch_id
RETURNING b.id
"""
)

# The batches whose every line has ended, moved to their final status.
_END = text(
    """
UPDATE batches SET
       status = CASE
           WHEN status = 'cancelling' THEN 'cancelled'
           WHEN request_expired > 0 THEN 'expired'
           ELSE 'completed' END,
       finalizing_at = CASE WHEN status = 'in_progress' AND request_expired = 0
                            THEN now() END,
       completed_at = CASE WHEN status = 'in_progress' AND request_expired = 0
                           THEN now() END,
       expired_at = CASE WHEN status = 'in_progress' AND request_expired > 0 THEN now() END,
       cancelled_at = CASE WHEN status = 'cancelling' THEN now() END,
       finished_at = now()
 WHERE id = ANY(:ids) AND status IN ('in_progress', 'cancelling')
   AND request_total > 0 AND request_completed + request_failed >= request_total
RETURNING id, tenant_id, status, request_completed, request_failed, output_bytes,
          error_bytes, output_expires_seconds, finished_at
"""
)


def lines_ended(session: Session, job_ids: Sequence[uuid.UUID]) -> None:
    """Count lines that ended in this transaction into their batches; end finished batches."""
    batch_ids = list(
        session.scalars(
            text(
                """SELECT b.id FROM batches b
                    WHERE b.id IN (SELECT DISTINCT batch_id FROM jobs WHERE id = ANY(:ids))
                    ORDER BY b.id FOR UPDATE"""
            ),
            {"ids": list(job_ids)},
        )
    )
    if not batch_ids:
        return
    touched = list(session.scalars(_COUNT, {"ids": list(job_ids)}))
    if touched:
        end_finished(session, touched)


def end_finished(session: Session, batch_ids: Sequence[str]) -> list[str]:
    """End those of ``batch_ids`` that have no line left to run (their rows locked or about to
    be); returns the ids ended. Their files are created and their webhook queued here."""
    ended = session.execute(_END, {"ids": list(batch_ids)}).all()
    by_status: dict[str, list[str]] = {}
    default_expiry = get_settings().batch_output_expiry_seconds
    for row in ended:
        # From the database's clock, as the batch's own timestamps are.
        expires_at = row.finished_at + timedelta(
            seconds=row.output_expires_seconds or default_expiry
        )
        made: dict[str, str | None] = {"output": None, "error": None}
        for kind, lines, size in (
            ("output", row.request_completed, row.output_bytes),
            ("error", row.request_failed, row.error_bytes),
        ):
            if lines:  # OpenAI's: no file at all for a kind with no line
                made[kind] = files.create_output_file(
                    session,
                    tenant_id=row.tenant_id,
                    batch_id=row.id,
                    kind=kind,  # type: ignore[arg-type]
                    bytes_=size,
                    expires_at=expires_at,
                ).id
        session.execute(
            text(
                "UPDATE batches SET output_file_id = :output, error_file_id = :error WHERE id = :id"
            ),
            {**made, "id": row.id},
        )
        by_status.setdefault(row.status, []).append(row.id)
    for status, ids in by_status.items():
        deliveries.queue_batch_event(session, ids, f"batch.{status}")
    return [row.id for row in ended]
