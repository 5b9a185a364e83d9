"""The chat-completion request (the seed's JSON schema, exactly) and the API's read shapes."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    PrivateAttr,
    StrictBool,
    StrictFloat,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from chatjobs import ssrf
from chatjobs.models import Job, JobStatus
from chatjobs.settings import get_settings
from chatjobs.storable import MAX_DEPTH, clean_text, first_offence, storable

# The seed types these as JSON "number": strict, so "0.5" and true are refused, not coerced.
Temperature = Annotated[StrictFloat, Field(ge=0, le=2)]
TopP = Annotated[StrictFloat, Field(ge=0, le=1)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]
PositiveNumber = Annotated[StrictFloat, Field(gt=0)]
# The jobs.model column is varchar(200).
ModelName = Annotated[StrictStr, Field(max_length=200)]
# How far ahead a deadline may be: a job waits at most a year (and a date this side of year
# 9999 cannot overflow on its way to UTC).
MAX_DEADLINE = timedelta(days=365)


def refuse_unstorable(data: Any, *, title: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise a ValidationError at the path of the first value of ``data`` that Postgres
    could not store or that would not read back (chatjobs.storable.first_offence)."""
    offence = first_offence(data, max_depth=max_depth)
    if offence is None:
        return
    error = PydanticCustomError(offence.rule, offence.message)
    raise ValidationError.from_exception_data(
        title, [InitErrorDetails(type=error, loc=offence.path, input=None)]
    )


class Message(BaseModel):
    """One chat message; keys beyond role and content (name, tool_calls, ...) pass through."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Any] | None

    @field_validator("content", mode="plain")
    @classmethod
    def _string_null_or_array(cls, value: Any) -> str | list[Any] | None:
        # One clear message instead of one error per member of the union.
        if value is None or isinstance(value, str | list):
            return value
        raise ValueError("content must be a string, null or an array")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool | None = None


class ChatCompletionRequest(BaseModel):
    """The body chatjobs sends upstream, validated against the seed's JSON schema.

    Unknown top-level keys are allowed. ``raw`` is the body exactly as the client sent it,
    which is what is stored and forwarded: re-serialising the model would turn 500 into 500.0.
    So anything in it that Postgres could not store or a reader could not serialise (NUL,
    lone surrogates, NaN/Infinity, nesting deeper than 64 levels) is refused, wherever it is.
    """

    model_config = ConfigDict(extra="allow")

    messages: list[Message]
    model: ModelName | None = None
    temperature: Temperature | None = None
    max_tokens: PositiveNumber | None = None
    max_completion_tokens: PositiveNumber | None = None
    top_p: TopP | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _keep_raw(cls, data: Any, handler: ModelWrapValidatorHandler[Self]) -> Self:
        if isinstance(data, dict):
            refuse_unstorable(data, title=cls.__name__)
        validated = handler(data)
        validated._raw = data if isinstance(data, dict) else validated.model_dump()
        return validated

    @property
    def raw(self) -> dict[str, Any]:
        return self._raw


class LongContext(BaseModel):
    """What to do when prompt + output budget exceeds the model's context window."""

    model_config = ConfigDict(extra="forbid")

    strategy: Literal["map_reduce", "truncate", "error"] = "map_reduce"
    # Prompts of the map and reduce steps; {index}/{total} and {total} are filled in.
    map_prompt: Annotated[str, Field(max_length=4000)] | None = None
    reduce_prompt: Annotated[str, Field(max_length=4000)] | None = None


class GatewayOptions(BaseModel):
    """Cloudflare AI Gateway cache options for the job's calls (sent only when its model's
    route goes through a gateway; ignored otherwise)."""

    model_config = ConfigDict(extra="forbid")

    # The gateway's documented range: at least 60 seconds, at most one month.
    cache_ttl: Annotated[int, Field(ge=60, le=2_592_000, strict=True)] | None = None
    skip_cache: Annotated[bool, Field(strict=True)] | None = None
    cache_key: (
        Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$")] | None
    ) = None


class JobCreate(BaseModel):
    """The body of POST /v1/jobs.

    Anywhere in it (the request included), a string holding NUL or a lone surrogate, a
    number that is NaN or Infinity, or arrays and objects nested more than 64 levels below
    a field are refused with a 422 naming their place: a job is stored only if it reads back.
    """

    model_config = ConfigDict(extra="forbid")

    request: ChatCompletionRequest
    webhook_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = None
    metadata: dict[str, Any] | None = None
    long_context: LongContext | None = None
    gateway: GatewayOptions | None = None
    priority: Annotated[int, Field(ge=-100, le=100, strict=True)] = 0
    deadline: Annotated[
        datetime | None,
        Field(description="with a timezone; in the future, at most 365 days ahead"),
    ] = None
    max_attempts: Annotated[int, Field(ge=1, le=100, strict=True)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # The request judges itself; the other fields are one level below this object.
            rest = {key: value for key, value in data.items() if key != "request"}
            refuse_unstorable(rest, title=cls.__name__, max_depth=MAX_DEPTH + 1)
        return data

    @field_validator("webhook_url")
    @classmethod
    def _webhook_target(cls, value: str | None) -> str | None:
        # Literal addresses are judged now; hostnames after DNS, at each delivery.
        if value is not None:
            allow = ssrf.parse_allowlist(get_settings().webhook_allow_private)
            ssrf.check_literal(value, allow)
        return value

    @field_validator("deadline")
    @classmethod
    def _deadline_ahead(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("deadline must carry a timezone, e.g. 2030-01-01T00:00:00Z")
        latest = f"at most {MAX_DEADLINE.days} days ahead"
        try:
            value = value.astimezone(UTC)
        except OverflowError:
            raise ValueError(f"deadline must be {latest}") from None
        now = datetime.now(UTC)
        if value <= now:
            raise ValueError("deadline must be in the future")
        if value > now + MAX_DEADLINE:
            raise ValueError(f"deadline must be {latest}")
        return value


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class JobError(BaseModel):
    type: str
    message: str
    status_code: int | None = None
    code: str | None = None
    request_id: str | None = None
    detail: dict[str, Any] | None = Field(
        None,
        description="what the provider said beyond a message, e.g. Azure's content filter "
        "result (innererror_code, content_filter_result)",
    )

    @classmethod
    def from_stored(cls, value: Any) -> JobError | None:
        """The error a row holds, whoever wrote it, never raising: a ``code`` that is a
        number is shown as its text, and a value that is not an error object as type
        ``unknown`` with the value as its message."""
        if not value:
            return None
        if not isinstance(value, dict):
            return cls(type="unknown", message=_text(value))
        status = value.get("status_code")
        if not (isinstance(status, int) and not isinstance(status, bool) and 0 < status < 1000):
            status = None
        return cls(
            type=_text(value.get("type") or "unknown"),
            message=_text(value.get("message") or ""),
            status_code=status,
            code=_optional_text(value.get("code")),
            request_id=_optional_text(value.get("request_id")),
            detail=value["detail"] if isinstance(value.get("detail"), dict) else None,
        )


def _text(value: Any) -> str:
    """A stored value shown where the contract has a string: itself, or its JSON text."""
    if isinstance(value, str):
        return clean_text(value)
    return json.dumps(storable(value), ensure_ascii=False, default=repr)


def _optional_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _json_object(value: Any) -> dict[str, Any] | None:
    """A JSON column the contract shows as an object, made readable (chatjobs.storable); a
    row holding another value there (an old row, another writer) shows it as {"value": it}."""
    if value is None:
        return None
    value = storable(value)
    return value if isinstance(value, dict) else {"value": value}


def _step_content(result: Any) -> str | None:
    """The first choice's message content of a step's result, whatever shape it has."""
    choices = result.get("choices") if isinstance(result, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    return None if content is None else _text(content)


class JobRead(BaseModel):
    """A job as the API shows it."""

    id: uuid.UUID
    object: Literal["job"] = "job"
    status: JobStatus
    model: str
    request: dict[str, Any]
    result: dict[str, Any] | None
    usage: Usage
    attempts: int
    max_attempts: int
    error: JobError | None
    metadata: dict[str, Any] | None
    webhook_url: str | None
    priority: int
    batch_id: str | None
    custom_id: str | None = None
    schedule_id: str | None
    scheduled_for: datetime | None = None
    progress: dict[str, Any] | None
    long_context: dict[str, Any] | None
    prompt_token_estimate: int | None
    token_count_method: str | None
    deadline: datetime | None
    next_attempt_at: datetime | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None

    @classmethod
    def from_job(cls, job: Job) -> JobRead:
        """The read shape of a row; never raises on what its JSON columns hold."""
        return cls(
            id=job.id,
            status=job.status,
            model=job.model,
            request=_json_object(job.request) or {},
            result=_json_object(job.result),
            usage=Usage(
                prompt_tokens=job.prompt_tokens,
                completion_tokens=job.completion_tokens,
                total_tokens=job.total_tokens,
            ),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            error=JobError.from_stored(job.error),
            metadata=_json_object(job.metadata_),
            webhook_url=job.webhook_url,
            priority=job.priority,
            batch_id=job.batch_id,
            custom_id=job.custom_id,
            schedule_id=job.schedule_id,
            scheduled_for=job.scheduled_for,
            progress=_json_object(job.progress),
            long_context=_json_object(job.long_context),
            prompt_token_estimate=job.prompt_token_estimate,
            token_count_method=job.token_count_method,
            deadline=job.deadline,
            next_attempt_at=job.next_attempt_at,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            completed_at=job.completed_at,
        )


class StepRead(BaseModel):
    """One map or reduce step of a chunked job."""

    id: uuid.UUID
    kind: str
    level: int
    index: int
    status: JobStatus
    attempts: int
    content: str | None
    usage: Usage
    error: JobError | None
    completed_at: datetime | None

    @classmethod
    def from_job(cls, job: Job) -> StepRead:
        """The read shape of a step's row; never raises on what its JSON columns hold."""
        return cls(
            id=job.id,
            kind=job.step_kind or "",
            level=job.step_level or 0,
            index=job.step_index or 0,
            status=job.status,
            attempts=job.attempts,
            content=_step_content(job.result),
            usage=Usage(
                prompt_tokens=job.prompt_tokens,
                completion_tokens=job.completion_tokens,
                total_tokens=job.total_tokens,
            ),
            error=JobError.from_stored(job.error),
            completed_at=job.completed_at,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobRead]
    has_more: bool
    first_id: uuid.UUID | None
    last_id: uuid.UUID | None
