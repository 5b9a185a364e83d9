"""Provider wire shapes the simulator speaks besides OpenAI's: Cloudflare Workers AI (native and
OpenAI-compatible), Cloudflare AI Gateway and Azure OpenAI.

The simulator serves every shape at once and the request path picks one; this module holds the
path table, the envelopes, the error bodies, the native stream framing and the gateway's cache.
Which parts are taken from the providers' documentation and which are assumptions is written
next to each shape (and in the README's simulator section).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers

OPENAI = "openai"
WORKERS_AI = "workers-ai"
AI_GATEWAY = "ai-gateway"
AZURE = "azure"
PROVIDERS = (OPENAI, WORKERS_AI, AI_GATEWAY, AZURE)
ALL = "all"

# Shapes: the path decides which one a request gets.
SHAPE_OPENAI = "openai"
SHAPE_CF_OPENAI = "workers-ai-openai"  # /client/v4/accounts/{a}/ai/v1/chat/completions
SHAPE_CF_NATIVE = "workers-ai-native"  # /client/v4/accounts/{a}/ai/run/{model...}
SHAPE_GW_WORKERS_AI = "gateway-workers-ai"  # /v1/{a}/{g}/workers-ai/v1/chat/completions
SHAPE_GW_OPENAI = "gateway-openai"  # /v1/{a}/{g}/openai/chat/completions
SHAPE_AZURE = "azure"  # /openai/deployments/{d}/chat/completions?api-version=...

SHAPE_PROVIDER = {
    SHAPE_OPENAI: OPENAI,
    SHAPE_CF_OPENAI: WORKERS_AI,
    SHAPE_CF_NATIVE: WORKERS_AI,
    SHAPE_GW_WORKERS_AI: AI_GATEWAY,
    SHAPE_GW_OPENAI: AI_GATEWAY,
    SHAPE_AZURE: AZURE,
}
# Shapes whose errors come in Cloudflare's envelope (the gateway passes Workers AI's through).
CF_ERROR_SHAPES = frozenset({SHAPE_CF_OPENAI, SHAPE_CF_NATIVE, SHAPE_GW_WORKERS_AI})
GATEWAY_SHAPES = frozenset({SHAPE_GW_WORKERS_AI, SHAPE_GW_OPENAI})

# (path template, shape); Starlette's `:path` convertor lets a native model hold slashes.
ROUTES = (
    ("/client/v4/accounts/{account_id}/ai/v1/chat/completions", SHAPE_CF_OPENAI),
    ("/client/v4/accounts/{account_id}/ai/run/{model:path}", SHAPE_CF_NATIVE),
    ("/v1/{account_id}/{gateway_id}/workers-ai/v1/chat/completions", SHAPE_GW_WORKERS_AI),
    ("/v1/{account_id}/{gateway_id}/openai/chat/completions", SHAPE_GW_OPENAI),
    ("/openai/deployments/{deployment}/chat/completions", SHAPE_AZURE),
)

# Workers AI error codes -> (HTTP status, message), from cloudflare-docs
# src/content/docs/workers-ai/platform/errors.mdx; 3040's message is the one reject-if-busy.mdx
# quotes (errors.mdx says "No more data centers to forward the request to").
CF_ERRORS: dict[int, tuple[int, str]] = {
    3040: (429, "Capacity temporarily exceeded, please try again."),
    3036: (
        429,
        "You have used up your daily free allocation of 10,000 neurons. Please upgrade to "
        "Cloudflare's Workers Paid plan if you would like to continue usage.",
    ),
    5007: (400, "No such model or task"),
    3042: (404, "The model name is invalid"),
    3007: (408, "Request timeout"),
    3008: (408, "Request was aborted"),
    3006: (413, "Request is too large"),
    3003: (400, "Request is missing headers or body"),
    3023: (403, "Service unavailable for account"),
    5016: (403, "User has not agreed to the model terms"),
    5018: (403, "The account is not allowed to access this model"),
    # Assumed: errors.mdx lists no code for an internal error.
    3043: (500, "Internal server error"),
}
# The code a non-forced error gets in Cloudflare's envelope (limiter 429s, bad requests...).
# Assumption: Cloudflare's exact code for these cases is not documented per status.
_CF_CODE_FOR_STATUS = {429: 3040, 408: 3007, 404: 3042, 413: 3006, 401: 10000}
CF_AUTH_CODE = 10000
GATEWAY_AUTH_CODE = 2009

GATEWAY_MAX_ATTEMPTS = 5
GATEWAY_DEFAULT_TTL = 300.0  # a cf-aig-cache-key alone caches for five minutes
_GATEWAY_RETRYABLE = frozenset({408, 429})

AZURE_ACCESS_DENIED = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
    "a valid key for an active subscription and use a correct regional API endpoint for your "
    "resource."
)
AZURE_FILTERED = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management "
    "policy. Please modify your prompt and retry. To learn more about our content filtering "
    "policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)


def cf_status(code: int) -> int:
    """The HTTP status Workers AI answers error `code` with (400 for codes not in the table)."""
    return CF_ERRORS.get(code, (400, ""))[0]


def cf_error_body(code: int, message: str | None = None) -> dict[str, Any]:
    """Cloudflare's v4 envelope for a failure."""
    text = message or CF_ERRORS.get(code, (400, f"Simulated Workers AI error {code}."))[1]
    return {"success": False, "errors": [{"code": code, "message": text}], "result": None,
            "messages": []}  # fmt: skip


def cf_code_for(status: int, forced_code: object) -> int:
    """The Cloudflare code an error of `status` carries: x_sim.cf_code, else a default."""
    if isinstance(forced_code, int) and not isinstance(forced_code, bool):
        return forced_code
    return _CF_CODE_FOR_STATUS.get(status, 3043 if status >= 500 else 5006)


def to_cf_error(status: int, openai_body: bytes, forced_code: object) -> dict[str, Any]:
    """Rewrap an OpenAI-shaped error body in Cloudflare's envelope, keeping the message."""
    message: str | None = None
    try:
        error = json.loads(openai_body).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message = error["message"]
    except (ValueError, AttributeError):
        pass
    code = cf_code_for(status, forced_code)
    if isinstance(forced_code, int) and code in CF_ERRORS:
        message = None  # a forced code speaks with Cloudflare's own message
    return cf_error_body(code, message)


def azure_error(code: str, message: str) -> dict[str, Any]:
    """Azure OpenAI's gateway-level error shape (401, 404): code is a string."""
    return {"error": {"code": code, "message": message}}


def azure_content_filter() -> dict[str, Any]:
    """Azure's 400 for a prompt its content filter refused."""
    detail = {"filtered": False, "severity": "safe"}
    return {
        "error": {
            "message": AZURE_FILTERED,
            "type": None,
            "param": "prompt",
            "code": "content_filter",
            "status": 400,
            "innererror": {
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {
                    "hate": {"filtered": True, "severity": "high"},
                    "self_harm": dict(detail),
                    "sexual": dict(detail),
                    "violence": dict(detail),
                },
            },
        }
    }


def native_body(
    content: str | None, tool_call: Mapping[str, Any] | None, usage: Mapping[str, int] | None
) -> dict[str, Any]:
    """Workers AI's native envelope; tool calls in Workers AI's own shape (arguments an object)."""
    result: dict[str, Any] = {"response": content}
    if tool_call is not None:
        fn = tool_call["function"]
        result["tool_calls"] = [{"name": fn["name"], "arguments": json.loads(fn["arguments"])}]
    if usage is not None:
        result["usage"] = dict(usage)
    return {"result": result, "success": True, "errors": [], "messages": []}


def native_stream(
    pieces: list[str], tool_call: Mapping[str, Any] | None, usage: Mapping[str, int] | None
) -> list[bytes]:
    """`data: {"response": piece}` lines, the last carrying usage, then `data: [DONE]`."""
    events: list[dict[str, Any]] = [{"response": piece} for piece in pieces]
    last: dict[str, Any] = {"response": ""}
    if tool_call is not None:
        fn = tool_call["function"]
        last["tool_calls"] = [{"name": fn["name"], "arguments": json.loads(fn["arguments"])}]
    if usage is not None:
        last["usage"] = dict(usage)
    events.append(last)
    out = [b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events]
    out.append(b"data: [DONE]\n\n")
    return out


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("1", "true", "yes")


@dataclass
class GatewayOptions:
    """The per-request cf-aig-* headers the simulated gateway acts on."""

    cache_ttl: float | None
    skip_cache: bool
    cache_key: str | None
    max_attempts: int | None


def gateway_options(headers: Headers) -> GatewayOptions:
    """Read the cf-aig-* headers (and their old cf-* names); bad numbers count as absent."""

    def number(*names: str) -> float | None:
        for name in names:
            raw = headers.get(name)
            if raw is not None:
                try:
                    return float(raw)
                except ValueError:
                    return None
        return None

    attempts = number("cf-aig-max-attempts")
    return GatewayOptions(
        cache_ttl=number("cf-aig-cache-ttl", "cf-cache-ttl"),
        skip_cache=_truthy(headers.get("cf-aig-skip-cache") or headers.get("cf-skip-cache")),
        cache_key=headers.get("cf-aig-cache-key"),
        max_attempts=None if attempts is None else max(1, min(GATEWAY_MAX_ATTEMPTS, int(attempts))),
    )


def gateway_retryable(status: int) -> bool:
    """Whether the simulated gateway retries an upstream attempt that answered `status`."""
    return status in _GATEWAY_RETRYABLE or status >= 500


@dataclass
class CachedAnswer:
    expires: float
    body: bytes
    media_type: str
    prompt_tokens: int
    completion_tokens: int


def cache_key(path: str, explicit: str | None, raw_body: bytes) -> str:
    """The gateway cache key: cf-aig-cache-key if sent, else a hash of path and body."""
    if explicit:
        return "key:" + explicit
    return "body:" + hashlib.sha256(path.encode() + b"\0" + raw_body).hexdigest()


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def describe_request(
    shape: str, path: str, headers: Headers, query: Mapping[str, str]
) -> dict[str, Any]:
    """What the call log keeps about a provider request; secrets only as presence and a hash."""
    seen: dict[str, Any] = {
        "path": path,
        "shape": shape,
        "provider": SHAPE_PROVIDER[shape],
        "authorization": "authorization" in headers,
        "api_key": "api-key" in headers,
    }
    if "api-key" in headers:
        seen["api_key_sha256"] = _digest(headers["api-key"])
    if shape == SHAPE_AZURE:
        seen["api_version"] = query.get("api-version")
    cf: dict[str, Any] = {}
    for name, value in headers.items():
        if not name.startswith("cf-aig-"):
            continue
        cf[name] = value if name != "cf-aig-authorization" else True
    if cf:
        seen["cf_aig"] = cf
    raw_meta = headers.get("cf-aig-metadata")
    if raw_meta is not None:
        try:
            seen["metadata"] = json.loads(raw_meta)
        except ValueError:
            seen["metadata"] = None
    return seen
