"""A batch's output and error files, read from its jobs line by line: never assembled.

Each finished line is rendered by one SQL expression (``LINE``) in OpenAI's format, so the
bytes counted when the line ended (chatjobs.batches.progress) are exactly the bytes served.
Lines are served in the order they ended (``jobs.batch_seq``), a page at a time, each page in
a short transaction of its own: a 50,000-line file streams in bounded memory and holds no
snapshot for the length of the download.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import text

from chatjobs.db import session_scope

# Rows per query, and bytes per chunk sent: a line can be megabytes (a long completion).
PAGE = 100
CHUNK_BYTES = 256 * 1024

# The request id of the call that ended the job: its last claim's (a job that ended is never
# claimed again), so a stale claim's late call cannot change a finished line's bytes.
_REQUEST_ID = """COALESCE(
    (SELECT c.request_id FROM upstream_calls c
      WHERE c.job_id = j.id AND c.claim_seq = j.claim_seq),
    'req_' || replace(j.id::text, '-', ''))"""
_HTTP_FAILURE = "j.status = 'failed' AND jsonb_typeof(j.error -> 'status_code') = 'number'"
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was cancelled before it completed."

# One line of the output (a success) or error file, as jsonb text, for the job aliased ``j``.
LINE = f"""jsonb_build_object(
    'id', 'batch_req_' || replace(j.id::text, '-', ''),
    'custom_id', j.custom_id,
    'response', CASE
        WHEN j.status = 'succeeded' THEN jsonb_build_object(
            'status_code', 200, 'request_id', {_REQUEST_ID}, 'body', j.result)
        WHEN {_HTTP_FAILURE} THEN jsonb_build_object(
            'status_code', j.error -> 'status_code',
            'request_id', COALESCE(j.error -> 'request_id', to_jsonb({_REQUEST_ID})),
            'body', jsonb_build_object('error', jsonb_build_object(
                'message', j.error -> 'message',
                'type', COALESCE(j.error -> 'code', j.error -> 'type'),
                'param', NULL,
                'code', j.error -> 'code')))
        END,
    'error', CASE
        WHEN j.status = 'expired' THEN jsonb_build_object(
            'code', 'batch_expired', 'message', '{EXPIRED_MESSAGE}')
        WHEN j.status = 'cancelled' THEN jsonb_build_object(
            'code', 'batch_cancelled', 'message', '{CANCELLED_MESSAGE}')
        WHEN j.status = 'failed' AND NOT ({_HTTP_FAILURE}) THEN jsonb_build_object(
            'code', CASE j.error ->> 'type' WHEN 'upstream_timeout' THEN 'request_timeout'
                         ELSE COALESCE(j.error ->> 'type', 'error') END,
            'message', COALESCE(j.error -> 'message', to_jsonb(''::text)))
        END
)::text"""

_KINDS = {
    "output": "j.status = 'succeeded'",
    "error": "j.status IN ('failed', 'expired', 'cancelled')",
    "all": "j.status IN ('succeeded', 'failed', 'expired', 'cancelled')",
}


def _page(batch_id: str, kind: str, after: int, limit: int) -> list[Any]:
    sql = text(
        f"""SELECT j.batch_seq, {LINE} AS line FROM jobs j
            WHERE j.batch_id = :batch_id AND j.batch_seq > :after AND {_KINDS[kind]}
            ORDER BY j.batch_seq LIMIT :limit"""
    )
    with session_scope() as session:
        return list(
            session.execute(sql, {"batch_id": batch_id, "after": after, "limit": limit}).all()
        )


def lines(batch_id: str, kind: str, *, after: int = 0) -> Iterator[tuple[int, str]]:
    """(batch_seq, line) of every finished line of ``kind`` (output, error or all) after the
    sequence number ``after``, in the order they ended."""
    while True:
        page = _page(batch_id, kind, after, PAGE)
        yield from ((seq, line) for seq, line in page)
        if len(page) < PAGE:
            return
        after = page[-1][0]


def as_chunks(lines: Iterator[tuple[int, str]]) -> Iterator[bytes]:
    """JSONL of ``lines``, in chunks of about CHUNK_BYTES."""
    buffer: list[bytes] = []
    size = 0
    for _, line in lines:
        data = line.encode() + b"\n"
        buffer.append(data)
        size += len(data)
        if size >= CHUNK_BYTES:
            yield b"".join(buffer)
            buffer.clear()
            size = 0
    if buffer:
        yield b"".join(buffer)


def chunks(batch_id: str, kind: str) -> Iterator[bytes]:
    """The content of the batch's output or error file."""
    return as_chunks(lines(batch_id, kind))


def line_seq(batch_id: str, line_id: str) -> int | None:
    """The sequence number of a finished line named by its id (``batch_req_<hex>``)."""
    hex_id = line_id.removeprefix("batch_req_")
    if len(hex_id) != 32 or any(c not in "0123456789abcdef" for c in hex_id):
        return None
    with session_scope() as session:
        return session.scalar(
            text(
                "SELECT batch_seq FROM jobs WHERE id = CAST(:id AS uuid) AND batch_id = :batch_id"
            ),
            {"id": hex_id, "batch_id": batch_id},
        )
