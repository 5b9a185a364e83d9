"""The interface every provider adapter implements, and the helpers they share.

An adapter turns a job's chat-completion request into one HTTP request for its provider
(``build``), and the provider's answer back into an OpenAI ``chat.completion`` (``parse``,
``stream``) or an UpstreamError whose status and code drive the one retry decision
(``parse_error``, then chatjobs.errors.is_retryable). Adapters do no I/O: chatjobs.upstream
sends what they build and hands them what came back, so each one is tested on recorded
bodies alone.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from chatjobs.errors import UpstreamMalformedResponse, UpstreamStatusError
from chatjobs.scrub import scrub_configured

if TYPE_CHECKING:
    from chatjobs.routing import Route

DeltaCallback = Callable[[dict[str, Any]], None]
Headers = Mapping[str, str]


@dataclass(frozen=True)
class CallContext:
    """Who a call is for: what gateway logs and per-job cache options need; never a secret."""

    job_id: str | None = None
    batch_id: str | None = None
    schedule_id: str | None = None
    tenant: str | None = None
    attempt: int | None = None
    # The job's ``gateway`` options (cache_ttl, skip_cache, cache_key), as submitted.
    gateway: Mapping[str, Any] = field(default_factory=dict)
    # How long the provider may take to start answering, in seconds (None: not sent).
    timeout_seconds: float | None = None


@dataclass(frozen=True)
class Outgoing:
    """One HTTP request, as built by an adapter; the caller sends it."""

    method: str
    url: str
    headers: dict[str, str]
    json: dict[str, Any]

    @property
    def stream(self) -> bool:
        return bool(self.json.get("stream"))


@dataclass(frozen=True)
class Parsed:
    """A provider's answer as a chat.completion, and how far to trust its accounting."""

    body: dict[str, Any]
    # Served from a gateway cache: the provider saw (and billed) no tokens.
    cached: bool = False
    # The usage was counted by chatjobs' tokenizer, not reported by the provider.
    usage_estimated: bool = False


class StreamParser(Protocol):
    """Folds an event stream, line by line, into one chat.completion."""

    def feed(self, line: str) -> bool:
        """Take one line; True once the stream's end marker has arrived."""
        ...

    def result(self) -> dict[str, Any]: ...


class Adapter(Protocol):
    """One provider's wire shape. Adding a provider is one module with one of these."""

    name: str

    def build(
        self,
        request: dict[str, Any],
        *,
        model: str,
        route: Route,
        api_key: str,
        context: CallContext,
    ) -> Outgoing:
        """The HTTP request for ``request`` (the job's body) sent to ``model``'s route."""
        ...

    def parse(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        *,
        request: dict[str, Any],
        route: Route,
    ) -> Parsed:
        """A 2xx answer as a chat.completion; UpstreamMalformedResponse if it is not one."""
        ...

    def parse_error(self, status: int, headers: Headers, body: bytes) -> UpstreamStatusError:
        """A non-2xx answer as the error recorded on the job (code set for the retry rule)."""
        ...

    def stream(
        self,
        *,
        request: dict[str, Any],
        route: Route,
        on_delta: DeltaCallback | None,
    ) -> StreamParser:
        """A parser for this provider's event stream."""
        ...

    def finish_stream(
        self, completion: dict[str, Any], headers: Headers, *, request: dict[str, Any], route: Route
    ) -> Parsed:
        """The assembled stream as a Parsed answer (usage filled in, flags set)."""
        ...


# --- helpers the adapters share ------------------------------------------------------------


def load_json(status: int, headers: Headers, body: bytes) -> Any:
    """A 2xx body as JSON; UpstreamMalformedResponse if it is not."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        text = body[:2000].decode("utf-8", "replace")
        raise UpstreamMalformedResponse(
            f"upstream answered {status} with a body that is not JSON: "
            f"{scrub_configured(text)[:200]!r}",
            status_code=status,
            request_id=request_id(headers),
        ) from exc


def request_id(headers: Headers) -> str | None:
    for name in ("x-request-id", "apim-request-id", "cf-ray"):
        if value := headers.get(name):
            return value
    return None


def no_choices(status: int, headers: Headers) -> UpstreamMalformedResponse:
    return UpstreamMalformedResponse(
        f"upstream answered {status} with JSON that has no choices",
        status_code=status,
        request_id=request_id(headers),
    )


def status_error(
    status: int,
    headers: Headers,
    message: str,
    code: str | None,
    *,
    detail: dict[str, Any] | None = None,
) -> UpstreamStatusError:
    """The error for a non-2xx answer; the message is scrubbed of configured keys."""
    return UpstreamStatusError(
        # Providers quote the key they refused: never let it reach the job or the log.
        scrub_configured(f"upstream answered {status}: {message}"),
        status_code=status,
        code=code,
        request_id=request_id(headers),
        retry_after=retry_after(headers),
        detail=detail,
    )


def code_text(code: Any) -> str | None:
    """An error code as text: providers send strings, numbers (``"code": 123``) or null."""
    if code is None:
        return None
    return (code if isinstance(code, str) else json.dumps(code, default=str))[:200]


def error_payload(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def retry_after(headers: Headers) -> float | None:
    """Seconds the upstream asked us to wait: retry-after-ms, else Retry-After (secs or date).

    Garbled or non-finite values are ignored rather than trusted.
    """
    if (ms := headers.get("retry-after-ms")) is not None:
        seconds = _finite(ms)
        if seconds is not None:
            return max(0.0, seconds / 1000)
    value = headers.get("retry-after")
    if not value:
        return None
    seconds = _finite(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, parsed.timestamp() - time.time())


def _finite(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def clean_usage(usage: Any) -> dict[str, int] | None:
    """An upstream's usage as three non-negative integers, whatever shape it came in: a
    malformed usage must never cost the answer it came with."""
    if not isinstance(usage, dict):
        return None
    out: dict[str, int] = {}
    for key in USAGE_KEYS:
        value = usage.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**31:
            out[key] = int(value)
        else:  # missing, a string, negative, NaN, absurd: counted as nothing
            out[key] = 0
    if not out["total_tokens"]:
        out["total_tokens"] = min(out["prompt_tokens"] + out["completion_tokens"], 2**31 - 1)
    return out


def join_url(base: str, path: str) -> str:
    return f"{base.rstrip('/')}/{path.lstrip('/')}"


def bearer(api_key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}
