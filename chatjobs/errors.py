"""Every error chatjobs raises, grouped by cause. Only api/ maps them to HTTP statuses."""

from __future__ import annotations

from typing import Any, TypeVar


class ChatJobsError(Exception):
    """Base of every chatjobs error."""


_E = TypeVar("_E", bound=ChatJobsError)


# --- the caller asked for something that cannot be done -------------------------------


class InvalidRequest(ChatJobsError):
    """The request is well-formed but names something it may not (400, naming ``param``)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.__dict__))


class FileTooLarge(InvalidRequest):
    """An uploaded file is larger than CHATJOBS_MAX_UPLOAD_BYTES."""


class NotFound(ChatJobsError):
    """The object does not exist, or belongs to another tenant."""


class JobNotFound(NotFound):
    """No job with that id is visible to this tenant."""


class DeliveryNotFound(NotFound):
    """No delivery with that id for that job is visible to this tenant."""


class DisabledUrlNotFound(NotFound):
    """The tenant has not got that webhook URL disabled."""


class TenantNotFound(NotFound):
    """No tenant has that name."""


class KeyNotFound(NotFound):
    """No API key of this tenant (or, for the operator, of any tenant) has that prefix."""


class FileNotFound(NotFound):
    """No file with that id is visible to this tenant."""


class Conflict(ChatJobsError):
    """The request clashes with the object's current state."""


class IdempotencyConflict(Conflict):
    """The Idempotency-Key was used before with a different body."""


class JobNotCancellable(Conflict):
    """The job has already finished."""


class DeliveryInProgress(Conflict):
    """The delivery is being attempted right now; it can be resent once the attempt ends."""


class WebhookUrlDisabled(Conflict):
    """The receiver answered 410 and its URL is disabled until the tenant enables it again."""


class AmbiguousKeyPrefix(Conflict):
    """More than one API key has that prefix; name the key by a longer one."""


class ContextTooLong(ChatJobsError):
    """The request does not fit the model's context window and cannot be made to."""


class TooManyUpstreamCalls(ContextTooLong):
    """Split to fit the window, the request needs more map calls than its tenant may make."""


class AuthenticationFailed(ChatJobsError):
    """The API key is missing, malformed or unknown."""


# --- a per-tenant limit ------------------------------------------------------------------


class LimitExceeded(ChatJobsError):
    """A per-tenant limit refuses the request for now; it may succeed after ``retry_after``.

    ``headers`` are the ones the answer carries besides Retry-After (x-ratelimit-*).
    """

    def __init__(
        self, message: str, *, retry_after: float, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.__dict__))


class SubmitRateExceeded(LimitExceeded):
    """The tenant submits jobs faster than its limit per second."""


class QueueLimitExceeded(LimitExceeded):
    """The tenant already has as many queued or retrying jobs as it may."""


class StreamLimitExceeded(LimitExceeded):
    """The tenant already has as many event streams open as it may."""


# --- the deployment's configuration ------------------------------------------------


class ConfigurationError(ChatJobsError):
    """The deployment is misconfigured (a setting or a file it names); retrying will not help."""


# --- the worker's hold on a job -------------------------------------------------------


class LeaseLost(ChatJobsError):
    """The job was cancelled, expired or re-run elsewhere while this worker's call ran."""


# --- the upstream provider ------------------------------------------------------------


class UpstreamError(ChatJobsError):
    """A call to the upstream chat-completions endpoint did not give a usable answer.

    Carries what the job's error record needs and nothing secret: no headers, no API key.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after
        # What the provider said beyond a message, kept on the job (Azure's filter result).
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only arguments do not survive the default pickling of exceptions.
        return (_rebuild, (type(self), self.message, self.__dict__))

    @property
    def type(self) -> str:
        """The error type recorded on the job."""
        return _TYPE_NAMES.get(type(self), "upstream_error")


def _rebuild(cls: type[_E], message: str, state: dict[str, object]) -> _E:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class UpstreamConnectionError(UpstreamError):
    """The upstream could not be reached or the connection broke."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within the configured timeout."""


class UpstreamMalformedResponse(UpstreamError):
    """The upstream answered 2xx with a body that is not a chat completion."""


class UpstreamStatusError(UpstreamError):
    """The upstream answered with a non-2xx status."""


_TYPE_NAMES: dict[type[UpstreamError], str] = {
    UpstreamConnectionError: "upstream_connection_error",
    UpstreamTimeout: "upstream_timeout",
    UpstreamMalformedResponse: "upstream_malformed_response",
    UpstreamStatusError: "upstream_status_error",
}

_RETRYABLE_STATUSES = frozenset({408, 409, 429})
# Codes that decide whatever the status: waiting will not refill an empty account (OpenAI's
# insufficient_quota, Workers AI's 3036 daily allocation) nor pass a content filter.
_TERMINAL_CODES = frozenset({"insufficient_quota", "3036", "content_filter"})
# Workers AI: out of capacity (3040), timed out or aborted (3007, 3008).
_RETRYABLE_CODES = frozenset({"3040", "3007", "3008"})


def is_retryable(err: UpstreamError) -> bool:
    """The one retry decision: transient causes are retried, everything else fails at once."""
    if isinstance(err, UpstreamConnectionError | UpstreamTimeout | UpstreamMalformedResponse):
        return True
    if err.code in _TERMINAL_CODES:
        return False
    if err.code in _RETRYABLE_CODES:
        return True
    status = err.status_code
    if status is None:
        return False
    return status in _RETRYABLE_STATUSES or status >= 500
