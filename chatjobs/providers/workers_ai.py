"""Cloudflare Workers AI over its REST API, in either of its two shapes.

``mode = "openai"``: ``POST {base}/client/v4/accounts/{account_id}/ai/v1/chat/completions``,
an OpenAI chat request and answer (configuration/open-ai-compatibility.mdx).
``mode = "native"``: ``POST {base}/client/v4/accounts/{account_id}/ai/run/{model}``, the
job's body without ``model``; the answer is Cloudflare's envelope
``{"result": {"response", "tool_calls"?, "usage"?}, "success", "errors", "messages"}``
(get-started/rest-api.mdx), unwrapped here into a chat.completion. A missing usage is
counted with chatjobs' tokenizer and marked estimated. The native stream is
``data: {"response": "..."}`` lines (the last may carry ``usage``) up to ``data: [DONE]``.

Errors in both modes may come as Cloudflare's envelope ``{"success": false, "errors":
[{"code", "message"}]}``; the numeric code becomes the error's code (platform/errors.mdx), so
is_retryable decides on it: 3040 out of capacity and 3007/3008 timeouts retry, 3036 (the
daily allocation is spent) does not, whatever the status.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from chatjobs.errors import UpstreamConnectionError, UpstreamMalformedResponse, UpstreamStatusError
from chatjobs.providers.base import (
    CallContext,
    DeltaCallback,
    Headers,
    Outgoing,
    Parsed,
    bearer,
    clean_usage,
    code_text,
    error_payload,
    join_url,
    load_json,
    no_choices,
    request_id,
    status_error,
)
from chatjobs.providers.openai import StreamAssembler, openai_body, openai_error, parse_completion
from chatjobs.routing import model_spec
from chatjobs.scrub import scrub_configured
from chatjobs.tokens import count_messages, count_text

if TYPE_CHECKING:
    from chatjobs.routing import Route


def account_path(route: Route) -> str:
    return f"client/v4/accounts/{route.account_id}/ai"


def cloudflare_error(status: int, headers: Headers, body: bytes) -> UpstreamStatusError:
    """Cloudflare's ``errors: [{code, message}]`` envelope, else OpenAI's error shape."""
    payload = error_payload(body)
    errors = payload.get("errors") if isinstance(payload, dict) else None
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        first = errors[0]
        message = "; ".join(str(e.get("message", e)) for e in errors if isinstance(e, dict))
        return status_error(
            status, headers, message or f"HTTP {status}", code_text(first.get("code"))
        )
    return openai_error(status, headers, body)


def estimated_usage(
    request: dict[str, Any], completion: dict[str, Any], route: Route
) -> dict[str, int]:
    """Prompt and completion tokens counted by chatjobs, for an answer that reported none."""
    spec = model_spec(route.model)
    prompt = count_messages(request.get("messages") or [], spec, tools=request.get("tools")).tokens
    message = completion["choices"][0].get("message") or {}
    text = message.get("content") or ""
    calls = message.get("tool_calls")
    if calls:
        text += json.dumps(calls)
    output = count_text(text, spec.encoding)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def with_usage(
    completion: dict[str, Any], request: dict[str, Any], route: Route, cached: bool = False
) -> Parsed:
    """The completion with its usage: the provider's, else estimated (and marked so)."""
    if clean_usage(completion.get("usage")) is not None:
        return Parsed(completion, cached=cached)
    completion["usage"] = estimated_usage(request, completion, route)
    return Parsed(completion, cached=cached, usage_estimated=True)


def native_completion(result: dict[str, Any], model: str) -> dict[str, Any]:
    """``result`` of the native envelope as a chat.completion."""
    if result.get("choices"):
        # Proxied third-party models answer in OpenAI's shape inside the envelope.
        return result
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
    response = result.get("response")
    if response is not None:
        message["content"] = response if isinstance(response, str) else json.dumps(response)
    calls = result.get("tool_calls") or []
    if calls:
        message["tool_calls"] = [_tool_call(i, call) for i, call in enumerate(calls)]
    return {
        "id": f"chatcmpl-cf-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if calls else "stop",
                "logprobs": None,
            }
        ],
        "usage": result.get("usage"),
    }


def _tool_call(index: int, call: dict[str, Any]) -> dict[str, Any]:
    """A native ``{name, arguments}`` (arguments an object) as OpenAI's tool call."""
    if "function" in call:  # already OpenAI's shape
        return call
    arguments = call.get("arguments")
    return {
        "id": call.get("id") or f"call_{index}",
        "type": "function",
        "function": {
            "name": call.get("name"),
            "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments or {}),
        },
    }


class NativeStream:
    """Folds the native ``data: {"response": ...}`` stream into one chat.completion.

    Each piece is passed on as an OpenAI delta, so a watcher of the job's events sees the
    same shape whatever the provider."""

    def __init__(self, *, model: str, on_delta: DeltaCallback | None) -> None:
        self.model = model
        self.on_delta = on_delta
        self.parts: list[str] = []
        self.tool_calls: list[dict[str, Any]] = []
        self.usage: dict[str, Any] | None = None
        self.done = False

    def feed(self, line: str) -> bool:
        if not line.startswith("data:"):
            return self.done
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return True
        try:
            event = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise UpstreamMalformedResponse(
                f"stream event is not JSON: {scrub_configured(data[:2000])[:200]!r}"
            ) from exc
        if not isinstance(event, dict):
            raise UpstreamMalformedResponse("stream event is not an object")
        if event.get("errors") or "error" in event:
            error = event.get("errors") or event.get("error")
            raise UpstreamMalformedResponse(
                scrub_configured(f"upstream sent an error mid-stream: {error}")
            )
        if isinstance(event.get("usage"), dict):
            self.usage = event["usage"]
        piece = event.get("response")
        if isinstance(piece, str) and piece:
            self.parts.append(piece)
            if self.on_delta is not None:
                self.on_delta({"index": 0, "delta": {"content": piece}})
        for call in event.get("tool_calls") or []:
            if isinstance(call, dict):
                self.tool_calls.append(call)
        return False

    def result(self) -> dict[str, Any]:
        if not self.done:
            raise UpstreamConnectionError("stream ended before data: [DONE]")
        result: dict[str, Any] = {"response": "".join(self.parts), "usage": self.usage}
        if self.tool_calls:
            result["tool_calls"] = self.tool_calls
        return native_completion(result, self.model)


class WorkersAIAdapter:
    """Workers AI's REST API, OpenAI-compatible or native (``route.mode``)."""

    name = "workers-ai"

    def build(
        self,
        request: dict[str, Any],
        *,
        model: str,
        route: Route,
        api_key: str,
        context: CallContext,
    ) -> Outgoing:
        name = route.upstream_model or model
        headers = bearer(api_key)
        if route.gateway_id:
            # Selects a gateway's logs, cache and limits on api.cloudflare.com (the AI Gateway
            # REST page asks for it on Workers AI calls; the compatibility page omits it).
            headers["cf-aig-gateway-id"] = route.gateway_id
        if route.mode == "native":
            body = {k: v for k, v in request.items() if k != "model"}
            url = join_url(route.base_url, f"{account_path(route)}/run/{name}")
            return Outgoing("POST", url, headers, body)
        url = join_url(route.base_url, f"{account_path(route)}/v1/chat/completions")
        return Outgoing("POST", url, headers, openai_body(request, name))

    def parse(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        *,
        request: dict[str, Any],
        route: Route,
    ) -> Parsed:
        if route.mode != "native":
            return with_usage(parse_completion(status, headers, body), request, route)
        payload = load_json(status, headers, body)
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, dict):
            raise UpstreamMalformedResponse(
                f"upstream answered {status} without a result object",
                status_code=status,
                request_id=request_id(headers),
            )
        completion = native_completion(result, route.upstream_model or route.model)
        if not completion.get("choices"):
            raise no_choices(status, headers)
        return with_usage(completion, request, route)

    def parse_error(self, status: int, headers: Headers, body: bytes) -> UpstreamStatusError:
        return cloudflare_error(status, headers, body)

    def stream(
        self, *, request: dict[str, Any], route: Route, on_delta: DeltaCallback | None
    ) -> StreamAssembler | NativeStream:
        if route.mode == "native":
            return NativeStream(model=route.upstream_model or route.model, on_delta=on_delta)
        return StreamAssembler(on_delta=on_delta)

    def finish_stream(
        self, completion: dict[str, Any], headers: Headers, *, request: dict[str, Any], route: Route
    ) -> Parsed:
        return with_usage(completion, request, route)
