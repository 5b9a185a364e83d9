"""The httpx client for chat-completion calls, whatever the provider.

The route's adapter (chatjobs.providers) builds the request and parses the answer; this
module sends it, times it and maps transport failures to UpstreamError subclasses. A streamed
answer is assembled into the same ``chat.completion`` object a non-streamed call returns.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from chatjobs.errors import UpstreamConnectionError, UpstreamError, UpstreamTimeout
from chatjobs.limiter import Limits
from chatjobs.providers import CallContext, for_route
from chatjobs.providers.base import (
    USAGE_KEYS,
    DeltaCallback,
    clean_usage,
    request_id,
    retry_after,
)
from chatjobs.providers.openai import StreamAssembler
from chatjobs.routing import Route
from chatjobs.scrub import scrub_configured
from chatjobs.settings import Settings, get_settings


@dataclass(frozen=True)
class Completion:
    """A successful call: the chat.completion object and what the call log needs."""

    body: dict[str, Any]
    usage: dict[str, int]
    status_code: int
    request_id: str | None
    latency_ms: int
    # The x-ratelimit-* headers, which tighten the shared limiter.
    ratelimit: dict[str, str]
    # A streamed call: from sending the request to its first event.
    ttft_ms: int | None = None
    # Served from a gateway cache: the provider saw and billed no tokens (usage is kept).
    cached: bool = False
    # The usage was counted by chatjobs' tokenizer: the provider reported none.
    usage_estimated: bool = False


def build_client(
    settings: Settings | None = None, *, slots: int | None = None
) -> httpx.AsyncClient:
    """The client a worker process shares for all its calls, with a connection per slot.

    It carries no base URL and no key: each call names its route's.
    """
    settings = settings or get_settings()
    headers = {"content-type": "application/json"}
    slots = slots or settings.worker_concurrency
    return httpx.AsyncClient(
        headers=headers,
        timeout=httpx.Timeout(
            connect=settings.upstream_connect_timeout,
            read=settings.upstream_read_timeout,
            write=30.0,
            pool=settings.upstream_connect_timeout,
        ),
        limits=httpx.Limits(max_connections=slots, max_keepalive_connections=slots),
        follow_redirects=False,
    )


async def chat_completion(
    request: dict[str, Any],
    *,
    model: str,
    client: httpx.AsyncClient,
    base_url: str = "",
    api_key: str = "",
    on_delta: DeltaCallback | None = None,
    route: Route | None = None,
    context: CallContext | None = None,
) -> Completion:
    """Send one chat-completion request through the route's provider adapter; raises an
    UpstreamError on any failure.

    Without a ``route``, an OpenAI-shape call to ``base_url`` (today's behaviour)."""
    if route is None:
        route = Route(model=model, base_url=base_url.rstrip("/"), api_key_env=None, limits=Limits())
    adapter = for_route(route)
    outgoing = adapter.build(
        request, model=model, route=route, api_key=api_key, context=context or CallContext()
    )
    started = time.monotonic()
    first_event: float | None = None
    try:
        if outgoing.stream:
            async with client.stream(
                outgoing.method, outgoing.url, json=outgoing.json, headers=outgoing.headers
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise adapter.parse_error(
                        response.status_code, response.headers, response.content
                    )
                parser = adapter.stream(request=request, route=route, on_delta=on_delta)
                async for line in response.aiter_lines():
                    if first_event is None and line.startswith("data:"):
                        first_event = time.monotonic()
                    if parser.feed(line):
                        break
                parsed = adapter.finish_stream(
                    parser.result(), response.headers, request=request, route=route
                )
        else:
            response = await client.request(
                outgoing.method, outgoing.url, json=outgoing.json, headers=outgoing.headers
            )
            if not response.is_success:
                raise adapter.parse_error(response.status_code, response.headers, response.content)
            parsed = adapter.parse(
                response.status_code,
                response.headers,
                response.content,
                request=request,
                route=route,
            )
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"upstream timed out: {type(exc).__name__}") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise UpstreamConnectionError(
            scrub_configured(f"upstream connection failed: {exc!r}")
        ) from exc
    completion = parsed.body
    return Completion(
        body=completion,
        usage=_usage(completion),
        status_code=response.status_code,
        request_id=request_id(response.headers),
        latency_ms=int((time.monotonic() - started) * 1000),
        ratelimit={k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")},
        ttft_ms=None if first_event is None else int((first_event - started) * 1000),
        cached=parsed.cached,
        usage_estimated=parsed.usage_estimated,
    )


def _usage(completion: dict[str, Any]) -> dict[str, int]:
    return clean_usage(completion.get("usage")) or dict.fromkeys(USAGE_KEYS, 0)


def assemble_stream(
    lines: Iterable[str], *, on_delta: DeltaCallback | None = None
) -> dict[str, Any]:
    """Fold a whole OpenAI event stream already in hand (tests, replays)."""
    assembler = StreamAssembler(on_delta=on_delta)
    for line in lines:
        if assembler.feed(line):
            break
    return assembler.result()


__all__ = [
    "Completion",
    "StreamAssembler",
    "UpstreamError",
    "assemble_stream",
    "build_client",
    "chat_completion",
    "clean_usage",
    "retry_after",
]
