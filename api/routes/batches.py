"""/v1/batches: OpenAI's Batch API over chatjobs' jobs (the official SDK drives it as is),
plus live results while a batch runs and a retry of what failed."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.orm import Session

from api.deps import TenantDep
from api.openapi import V1_ERRORS, errors
from chatjobs import ssrf
from chatjobs.batches import output, service
from chatjobs.db import session_scope
from chatjobs.errors import InvalidRequest
from chatjobs.models import Batch
from chatjobs.schemas import refuse_unstorable
from chatjobs.settings import get_settings

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=V1_ERRORS)

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]


class OutputExpiresAfter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=3600, le=2_592_000)]


class BatchCreate(BaseModel):
    """The body of POST /v1/batches (OpenAI's, plus ``webhook_url``)."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[str, Field(min_length=1, max_length=64)]
    endpoint: Annotated[str, Field(max_length=64)]
    completion_window: Annotated[str, Field(max_length=16)] = Field(
        description="how long the batch may run: a whole number of s, m, h or d (24h, 30m, "
        "7d); lines unfinished by then end with batch_expired"
    )
    metadata: Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)] | None = None
    output_expires_after: OutputExpiresAfter | None = None
    webhook_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = Field(
        default=None,
        description="receives batch.completed, batch.failed, batch.expired, batch.cancelled",
    )

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        # NUL, lone surrogates and the like anywhere (metadata keys and values included)
        # are a 422 naming their place, never a database error.
        if isinstance(data, dict):
            refuse_unstorable(data, title=cls.__name__)
        return data

    @field_validator("webhook_url")
    @classmethod
    def _webhook_target(cls, value: str | None) -> str | None:
        # Literal addresses are judged now; hostnames after DNS, at each delivery.
        if value is not None:
            ssrf.check_literal(value, ssrf.parse_allowlist(get_settings().webhook_allow_private))
        return value


class BatchError(BaseModel):
    code: str
    line: int | None = None
    message: str
    param: str | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    """OpenAI's three counts (failed includes expired and cancelled lines), plus chatjobs'
    own: expired, cancelled, and lines being called right now."""

    total: int
    completed: int
    failed: int
    expired: int
    cancelled: int
    in_progress: int


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int


class BatchUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchObject(BaseModel):
    """A batch, as OpenAI's Batch API shapes it (unix-second timestamps)."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    model: str | None
    usage: BatchUsage
    webhook_url: str | None

    @classmethod
    def of(cls, batch: Batch, in_progress: int = 0) -> BatchObject:
        def ts(value: datetime | None) -> int | None:
            return None if value is None else int(value.timestamp())

        return cls(
            id=batch.id,
            endpoint=batch.endpoint,
            errors=BatchErrors(data=[BatchError(**e) for e in batch.errors])
            if batch.errors
            else None,
            input_file_id=batch.input_file_id,
            completion_window=batch.completion_window,
            status=batch.status,
            output_file_id=batch.output_file_id,
            error_file_id=batch.error_file_id,
            created_at=int(batch.created_at.timestamp()),
            in_progress_at=ts(batch.in_progress_at),
            expires_at=ts(batch.expires_at),
            finalizing_at=ts(batch.finalizing_at),
            completed_at=ts(batch.completed_at),
            failed_at=ts(batch.failed_at),
            expired_at=ts(batch.expired_at),
            cancelling_at=ts(batch.cancelling_at),
            cancelled_at=ts(batch.cancelled_at),
            request_counts=RequestCounts(
                total=batch.request_total,
                completed=batch.request_completed,
                failed=batch.request_failed,
                expired=batch.request_expired,
                cancelled=batch.request_cancelled,
                in_progress=in_progress,
            ),
            metadata=batch.metadata_,
            model=batch.model,
            usage=BatchUsage(
                input_tokens=batch.input_tokens,
                input_tokens_details=InputTokensDetails(cached_tokens=batch.cached_tokens),
                output_tokens=batch.output_tokens,
                output_tokens_details=OutputTokensDetails(reasoning_tokens=batch.reasoning_tokens),
                total_tokens=batch.total_tokens,
            ),
            webhook_url=batch.webhook_url,
        )


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


def _read(tenant_id: uuid.UUID, batch_id: str) -> BatchObject:
    with session_scope() as session:
        batch = service.get_batch(session, tenant_id=tenant_id, batch_id=batch_id)
        running = service.running_lines(session, [batch])
        return BatchObject.of(batch, running.get(batch.id, 0))


def _created(response: Response, make: Callable[[Session], tuple[Batch, bool]]) -> BatchObject:
    """Store a batch made by ``make`` and validate it once committed; a replay of an
    Idempotency-Key answers the first batch with ``Idempotent-Replayed: true``."""
    with session_scope() as session:
        batch, created = make(session)
        read = BatchObject.of(batch)
    if created:
        service.validate_soon(read.id)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return read


@router.post("", response_model=BatchObject, responses=errors(400, 409, 413, 422))
def create_batch(
    body: BatchCreate,
    tenant_id: TenantDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> BatchObject:
    """Create a batch from an uploaded `batch` file; it is `validating` until every line has
    been checked, then `in_progress` (or `failed`, with `errors.data` naming the lines).
    The same Idempotency-Key with the same body returns the first batch."""
    new = service.NewBatch(
        input_file_id=body.input_file_id,
        endpoint=body.endpoint,
        completion_window=body.completion_window,
        metadata=body.metadata,
        output_expires_seconds=body.output_expires_after.seconds
        if body.output_expires_after
        else None,
        webhook_url=body.webhook_url,
    )
    return _created(
        response,
        lambda session: service.create_batch(
            session, tenant_id=tenant_id, new=new, idempotency_key=idempotency_key
        ),
    )


@router.get("", response_model=BatchList)
def list_batches(
    tenant_id: TenantDep,
    after: Annotated[
        str | None,
        Query(pattern=r"^batch_[0-9a-f]{32}$", description="last id of the previous page"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    """The tenant's batches, newest first, with cursor pagination."""
    with session_scope() as session:
        page, has_more = service.list_batches(
            session, tenant_id=tenant_id, after=after, limit=limit
        )
        running = service.running_lines(session, page)
        data = [BatchObject.of(batch, running.get(batch.id, 0)) for batch in page]
    return BatchList(
        data=data,
        has_more=has_more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/{batch_id}", response_model=BatchObject, responses=errors(404))
def get_batch(batch_id: str, tenant_id: TenantDep) -> BatchObject:
    """One batch; its request_counts move while it runs."""
    return _read(tenant_id, batch_id)


@router.post("/{batch_id}/cancel", response_model=BatchObject, responses=errors(404, 409, 413))
def cancel_batch(batch_id: str, tenant_id: TenantDep) -> BatchObject:
    """Cancel a validating or running batch: `cancelling` until its unfinished lines are
    cancelled (they end with `batch_cancelled` in the error file), then `cancelled`, with
    the output of the lines that had finished. 409 once it has ended."""
    service.cancel(tenant_id=tenant_id, batch_id=batch_id)
    return _read(tenant_id, batch_id)


@router.post("/{batch_id}/retry", response_model=BatchObject, responses=errors(400, 404, 409, 413))
def retry_batch(
    batch_id: str,
    tenant_id: TenantDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> BatchObject:
    """A new batch of the failed, expired and cancelled lines of an ended batch (same
    custom_ids and bodies; `metadata.retry_of` names this one)."""
    return _created(
        response,
        lambda session: service.retry_batch(
            session, tenant_id=tenant_id, batch_id=batch_id, idempotency_key=idempotency_key
        ),
    )


@router.get(
    "/{batch_id}/results",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/jsonl": {"schema": {"type": "string"}}}},
        **errors(400, 404),
    },
)
def batch_results(
    batch_id: str,
    tenant_id: TenantDep,
    after: Annotated[
        str | None,
        Query(
            pattern=r"^batch_req_[0-9a-f]{32}$",
            description="the id (batch_req_...) of the last line already read: only lines "
            "that ended after it follow",
        ),
    ] = None,
) -> Response:
    """The lines that have ended so far, successes and failures alike, in the order they
    ended (JSONL, each in its output- or error-file form), while the batch still runs."""
    _read(tenant_id, batch_id)  # a 404 before the stream starts
    start = 0
    if after:
        seq = output.line_seq(batch_id, after)
        if seq is None:
            raise InvalidRequest(f"no finished line {after} in batch {batch_id}", param="after")
        start = seq
    return StreamingResponse(
        output.as_chunks(output.lines(batch_id, "all", after=start)), media_type="application/jsonl"
    )
