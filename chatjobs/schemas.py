"""The chat-completion request (the seed's JSON schema, exactly) and the API's read shapes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
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
    field_validator,
    model_validator,
)

from chatjobs import ssrf
from chatjobs.models import Job, JobStatus
from chatjobs.settings import get_settings

# The seed types these as JSON "number": strict, so "0.5" and true are refused, not coerced.
Temperature = Annotated[StrictFloat, Field(ge=0, le=2)]
TopP = Annotated[StrictFloat, Field(ge=0, le=1)]
Penalty = Annotated[StrictFloat, Field(ge=-2, le=2)]
PositiveNumber = Annotated[StrictFloat, Field(gt=0)]


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
    """

    model_config = ConfigDict(extra="allow")

    messages: list[Message]
    model: StrictStr | None = None
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


class JobCreate(BaseModel):
    """The body of POST /v1/jobs."""

    model_config = ConfigDict(extra="forbid")

    request: ChatCompletionRequest
    webhook_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = None
    metadata: dict[str, Any] | None = None
    long_context: LongContext | None = None
    priority: Annotated[int, Field(ge=-100, le=100)] = 0
    deadline: datetime | None = None
    max_attempts: Annotated[int, Field(ge=1, le=100)] | None = None

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
        if value <= datetime.now(UTC):
            raise ValueError("deadline must be in the future")
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
    schedule_id: str | None
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
        return cls(
            id=job.id,
            status=job.status,
            model=job.model,
            request=job.request,
            result=job.result,
            usage=Usage(
                prompt_tokens=job.prompt_tokens,
                completion_tokens=job.completion_tokens,
                total_tokens=job.total_tokens,
            ),
            attempts=job.attempts,
            max_attempts=job.max_attempts,
            error=JobError.model_validate(job.error) if job.error else None,
            metadata=job.metadata_,
            webhook_url=job.webhook_url,
            priority=job.priority,
            batch_id=job.batch_id,
            schedule_id=job.schedule_id,
            progress=job.progress,
            long_context=job.long_context,
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
        content = None
        if job.result:
            content = (job.result.get("choices") or [{}])[0].get("message", {}).get("content")
        return cls(
            id=job.id,
            kind=job.step_kind or "",
            level=job.step_level or 0,
            index=job.step_index or 0,
            status=job.status,
            attempts=job.attempts,
            content=content,
            usage=Usage(
                prompt_tokens=job.prompt_tokens,
                completion_tokens=job.completion_tokens,
                total_tokens=job.total_tokens,
            ),
            error=JobError.model_validate(job.error) if job.error else None,
            completed_at=job.completed_at,
        )


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobRead]
    has_more: bool
    first_id: uuid.UUID | None
    last_id: uuid.UUID | None
