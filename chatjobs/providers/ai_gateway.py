"""Cloudflare AI Gateway in front of a provider:
``POST {base}/v1/{account_id}/{gateway_id}/{gateway_provider}/...`` (ai-gateway
usage/rest-api.mdx, usage/providers/*.mdx), OpenAI-shape requests and answers.

chatjobs owns retries, so it sends ``cf-aig-max-attempts`` (1 unless configured): gateway
retries would multiply chatjobs' own and the limiter would count one call where the provider
saw several. ``cf-aig-metadata`` carries the job's ids (the documented maximum of five keys)
so gateway logs join to chatjobs rows; the job's ``gateway`` options map to the cache headers;
``cf-aig-request-timeout`` comes from the call's own timeout. An answer with
``cf-aig-cache-status: HIT`` is marked cached: the provider saw no tokens.

Supported gateway providers: ``workers-ai`` (``.../workers-ai/v1/chat/completions``) and
``openai`` (``.../openai/chat/completions``).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from chatjobs.errors import UpstreamStatusError
from chatjobs.providers.base import (
    CallContext,
    Headers,
    Outgoing,
    Parsed,
    bearer,
    join_url,
)
from chatjobs.providers.openai import OpenAIAdapter, openai_body, parse_completion
from chatjobs.providers.workers_ai import cloudflare_error, with_usage

if TYPE_CHECKING:
    from chatjobs.routing import Route

_PATHS = {"workers-ai": "workers-ai/v1/chat/completions", "openai": "openai/chat/completions"}
# cf-aig-metadata: "up to five custom metadata entries per request"; extras are dropped.
METADATA_KEYS = ("job_id", "batch_id", "schedule_id", "tenant", "attempt")


def gateway_headers(route: Route, context: CallContext) -> dict[str, str]:
    """The cf-aig-* request headers for one call."""
    headers = {"cf-aig-max-attempts": str(route.gateway_max_attempts)}
    if token := route.gateway_token():
        headers["cf-aig-authorization"] = f"Bearer {token}"
    metadata = {key: value for key in METADATA_KEYS if (value := getattr(context, key)) is not None}
    if metadata:
        headers["cf-aig-metadata"] = json.dumps(metadata, separators=(",", ":"))
    options = context.gateway
    if options.get("cache_ttl") is not None:
        headers["cf-aig-cache-ttl"] = str(int(options["cache_ttl"]))
    if options.get("skip_cache"):
        headers["cf-aig-skip-cache"] = "true"
    if options.get("cache_key"):
        headers["cf-aig-cache-key"] = str(options["cache_key"])
    if context.timeout_seconds is not None and context.timeout_seconds > 0:
        headers["cf-aig-request-timeout"] = str(int(context.timeout_seconds * 1000))
    return headers


def cache_hit(headers: Headers) -> bool:
    return (headers.get("cf-aig-cache-status") or "").strip().upper() == "HIT"


class AIGatewayAdapter(OpenAIAdapter):
    """AI Gateway's provider-native endpoints for ``route.gateway_provider``: OpenAI's shapes
    (the stream inherited), Cloudflare's errors, and the cache status on every answer."""

    name = "ai-gateway"

    def build(
        self,
        request: dict[str, Any],
        *,
        model: str,
        route: Route,
        api_key: str,
        context: CallContext,
    ) -> Outgoing:
        path = _PATHS[route.gateway_provider]
        url = join_url(route.base_url, f"v1/{route.account_id}/{route.gateway_id}/{path}")
        headers = {**bearer(api_key), **gateway_headers(route, context)}
        return Outgoing("POST", url, headers, openai_body(request, route.upstream_model or model))

    def parse(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        *,
        request: dict[str, Any],
        route: Route,
    ) -> Parsed:
        completion = parse_completion(status, headers, body)
        return with_usage(completion, request, route, cached=cache_hit(headers))

    def parse_error(self, status: int, headers: Headers, body: bytes) -> UpstreamStatusError:
        return cloudflare_error(status, headers, body)

    def finish_stream(
        self, completion: dict[str, Any], headers: Headers, *, request: dict[str, Any], route: Route
    ) -> Parsed:
        return with_usage(completion, request, route, cached=cache_hit(headers))
