"""What an offload route needs from a provider's batch API: one implementation per provider
(``openai_batch.py``: OpenAI's Files + Batches; ``anthropic_batch.py``: Anthropic's Message
Batches), each a module of its own behind this interface, so adding one is one file.

Implementations are synchronous (the offload loops run on beat's threads) and do their own
HTTP through the ``httpx.Client`` they are given, against the route's base URL and key
(``route.base_url``, ``route.api_key()``); they never log a key or a prompt. They raise
``chatjobs.errors.UpstreamError`` subclasses for what the upstream refuses or cannot answer,
so the caller's retry decision is the one ``is_retryable`` makes everywhere else.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from chatjobs.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamMalformedResponse,
    UpstreamTimeout,
)

if TYPE_CHECKING:
    from chatjobs.routing import Route

# The provider's error for an answer that is not a success: (status, headers, body) -> error.
ErrorOf = Callable[[int, httpx.Headers, bytes], UpstreamError]


@dataclass(frozen=True)
class Item:
    """One job to send: its id (the line's ``custom_id``) and the chat-completion request as
    the route's synchronous call would send it (``model`` already the upstream model's)."""

    job_id: str
    request: dict[str, Any]
    # The output tokens the job may use (``routing.output_budget``): what an upstream that
    # requires a limit (Anthropic's ``max_tokens``) sends when the request sets none.
    max_output_tokens: int | None = None


@dataclass(frozen=True)
class EarlierSubmit:
    """What ``find`` knows of a submit that may have created an upstream batch before its
    answer was recorded."""

    ref: str  # the chatjobs row's id (in the upstream batch's metadata, where it has any)
    since: datetime  # just before that submit's create went out (chatjobs' clock)
    items: int  # how many requests it sent
    job_ids: frozenset[str]  # every job the row was gathered with (the custom_ids it may hold)
    taken: frozenset[str]  # upstream batch ids other rows recorded: never this row's


class NotOffloadable(ValueError):
    """``encode``: this request cannot be expressed faithfully in the upstream's batch
    format (the message says which field and why); the job runs synchronously instead."""


@dataclass(frozen=True)
class Submitted:
    """What creating the upstream batch gave back: recorded in Postgres at once."""

    upstream_batch_id: str
    # The uploaded input file (OpenAI); None where the requests go inline (Anthropic).
    upstream_file_id: str | None = None


@dataclass(frozen=True)
class UpstreamBatch:
    """The upstream batch as polled."""

    upstream_batch_id: str
    # The provider's own status word, kept for the console and logs.
    status: str
    # True once the upstream will not change it any more (completed, failed, expired,
    # cancelled; Anthropic: processing_status "ended").
    ended: bool
    # Where its results are (OpenAI: output and error file ids; Anthropic: results_url).
    output_ref: str | None = None
    error_ref: str | None = None
    # A batch the upstream refused as a whole (validation errors), as text for the row.
    error: str | None = None


@dataclass(frozen=True)
class Result:
    """One item's outcome, mapped back by ``custom_id``.

    Exactly one of: ``completion`` (a chat.completion, with ``usage``), ``error`` (the
    provider's error for this item, classified as a synchronous call's would be), or
    ``unfinished`` (the upstream expired or cancelled it before running it).
    """

    job_id: str
    completion: dict[str, Any] | None = None
    error: UpstreamError | None = None
    unfinished: bool = False


class BatchUpstream(Protocol):
    """A provider's batch API, as an offload route uses it."""

    name: str  # the models file's ``offload`` value: "openai-batch", "anthropic-batch"
    max_items: int  # per upstream batch (OpenAI 50,000; Anthropic 100,000)
    max_bytes: int  # of the encoded requests (OpenAI 200 MB; Anthropic 256 MB)

    def encode(self, item: Item) -> bytes:
        """The item as the upstream takes it (a JSONL line, or one entry of the requests
        array), so the caller can count bytes against ``max_bytes`` before submitting;
        ``NotOffloadable`` if the upstream cannot run it as the synchronous call would."""
        ...

    def submit(
        self, client: httpx.Client, route: Route, encoded: Sequence[bytes], *, ref: str
    ) -> Submitted:
        """Upload (where the provider needs a file) and create the batch, with ``ref`` (the
        chatjobs row's id) in its metadata, so a crash before the answer is recorded can
        ``find`` it again instead of creating a second one."""
        ...

    def find(self, client: httpx.Client, route: Route, earlier: EarlierSubmit) -> str | None:
        """The id of the upstream batch an earlier ``submit`` of this row created, or None if
        there is none. Called only when an earlier submit may have reached the upstream."""
        ...

    def poll(self, client: httpx.Client, route: Route, upstream_batch_id: str) -> UpstreamBatch:
        """The upstream batch's current state."""
        ...

    def results(self, client: httpx.Client, route: Route, batch: UpstreamBatch) -> Iterator[Result]:
        """Every item's outcome of an ended batch, streamed (never the whole file in
        memory); items the upstream left out are not yielded (the caller treats the jobs it
        sent and got nothing for as unfinished)."""
        ...

    def cancel(self, client: httpx.Client, route: Route, upstream_batch_id: str) -> None:
        """Ask the upstream to cancel the batch (idempotent; an ended batch is no error)."""
        ...


def send(
    client: httpx.Client,
    method: str,
    url: str,
    headers: Mapping[str, str],
    error_of: ErrorOf,
    **kwargs: Any,
) -> Any:
    """One control-plane request; its JSON answer, or the UpstreamError it comes to."""
    try:
        response = client.request(method, url, headers=dict(headers), **kwargs)
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"{method} {url}: timed out") from exc
    except httpx.HTTPError as exc:
        raise UpstreamConnectionError(f"{method} {url}: {type(exc).__name__}") from exc
    if not response.is_success:
        raise error_of(response.status_code, response.headers, response.content)
    try:
        return response.json()
    except ValueError as exc:
        raise UpstreamMalformedResponse(
            f"{method} {url}: answered {response.status_code} with a body that is not JSON",
            status_code=response.status_code,
        ) from exc


def stream_results(
    client: httpx.Client,
    url: str,
    headers: Mapping[str, str],
    error_of: ErrorOf,
    result_of: Callable[[dict[str, Any]], Result | None],
) -> Generator[Result]:
    """A JSONL results file, line by line (never the whole file in memory): each object
    line's outcome as ``result_of`` reads it; blank, non-JSON and unreadable lines skipped."""
    try:
        with client.stream("GET", url, headers=dict(headers)) as response:
            if not response.is_success:
                response.read()
                raise error_of(response.status_code, response.headers, response.content)
            for text in response.iter_lines():
                if not text.strip():
                    continue
                try:
                    line = json.loads(text)
                except ValueError:
                    continue
                if isinstance(line, dict):
                    result = result_of(line)
                    if result is not None:
                        yield result
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"GET {url}: timed out") from exc
    except httpx.HTTPError as exc:
        raise UpstreamConnectionError(f"GET {url}: {type(exc).__name__}") from exc
