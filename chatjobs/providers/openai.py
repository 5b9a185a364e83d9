"""OpenAI's chat-completions shape: ``POST {base_url}/chat/completions``, Bearer auth.

The default provider, and the shape the other adapters' answers are turned into. Its stream
(``chat.completion.chunk`` events up to ``data: [DONE]``) is assembled into the same
``chat.completion`` a non-streamed call returns; ``stream_options.include_usage`` is always
asked for so a streamed call is counted too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from chatjobs.errors import (
    UpstreamConnectionError,
    UpstreamMalformedResponse,
    UpstreamStatusError,
)
from chatjobs.providers.base import (
    CallContext,
    DeltaCallback,
    Headers,
    Outgoing,
    Parsed,
    bearer,
    code_text,
    error_payload,
    join_url,
    load_json,
    no_choices,
    status_error,
)
from chatjobs.scrub import scrub_configured

if TYPE_CHECKING:
    from chatjobs.routing import Route


def openai_body(request: dict[str, Any], model: str) -> dict[str, Any]:
    """The request as sent: the upstream's model name; a stream always asks for its usage."""
    body = {**request, "model": model}
    if body.get("stream"):
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return body


def parse_completion(status: int, headers: Headers, body: bytes) -> dict[str, Any]:
    """An OpenAI-shape 2xx body; UpstreamMalformedResponse unless it has choices."""
    payload = load_json(status, headers, body)
    if not isinstance(payload, dict) or not payload.get("choices"):
        raise no_choices(status, headers)
    return payload


def openai_error(status: int, headers: Headers, body: bytes) -> UpstreamStatusError:
    """``{"error": {"message", "code" | "type"}}``, else the body's first 500 characters."""
    payload = error_payload(body)
    if payload is None:
        text = body[:500].decode("utf-8", "replace")
        return status_error(status, headers, text or f"HTTP {status}", None)
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        if code is None or code == "":
            code = error.get("type")
        return status_error(status, headers, str(error.get("message") or error), code_text(code))
    return status_error(status, headers, json.dumps(payload)[:500], None)


class OpenAIAdapter:
    """Today's behaviour: the route's base URL (with its /v1) plus /chat/completions."""

    name = "openai"

    def build(
        self,
        request: dict[str, Any],
        *,
        model: str,
        route: Route,
        api_key: str,
        context: CallContext,
    ) -> Outgoing:
        return Outgoing(
            "POST",
            join_url(route.base_url, "chat/completions"),
            bearer(api_key),
            openai_body(request, route.upstream_model or model),
        )

    def parse(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        *,
        request: dict[str, Any],
        route: Route,
    ) -> Parsed:
        return Parsed(parse_completion(status, headers, body))

    def parse_error(self, status: int, headers: Headers, body: bytes) -> UpstreamStatusError:
        return openai_error(status, headers, body)

    def stream(
        self, *, request: dict[str, Any], route: Route, on_delta: DeltaCallback | None
    ) -> StreamAssembler:
        return StreamAssembler(on_delta=on_delta)

    def finish_stream(
        self, completion: dict[str, Any], headers: Headers, *, request: dict[str, Any], route: Route
    ) -> Parsed:
        return Parsed(completion)


class StreamAssembler:
    """Folds chat.completion.chunk events, line by line, into one chat.completion object."""

    def __init__(self, *, on_delta: DeltaCallback | None = None) -> None:
        self.on_delta = on_delta
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False

    def feed(self, line: str) -> bool:
        """Take one line of the event stream; True once ``data: [DONE]`` has arrived."""
        if not line.startswith("data:"):
            return self.done
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return True
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise UpstreamMalformedResponse(
                f"stream chunk is not JSON: {scrub_configured(data[:2000])[:200]!r}"
            ) from exc
        if not isinstance(chunk, dict):
            raise UpstreamMalformedResponse(
                f"stream chunk is not an object: {scrub_configured(data[:2000])[:200]!r}"
            )
        if "error" in chunk:
            raise UpstreamMalformedResponse(
                scrub_configured(f"upstream sent an error mid-stream: {chunk['error']}")
            )
        for key in ("id", "created", "model", "system_fingerprint", "service_tier"):
            if key in chunk and key not in self.head:
                self.head[key] = chunk[key]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for delta_choice in chunk.get("choices") or []:
            _fold_choice(self.choices, delta_choice)
            if self.on_delta is not None:
                self.on_delta(delta_choice)
        return False

    def result(self) -> dict[str, Any]:
        if not self.done:
            raise UpstreamConnectionError("stream ended before data: [DONE]")
        if not self.choices:
            raise UpstreamMalformedResponse("stream carried no choices")
        head = self.head
        return {
            "id": head.get("id"),
            "object": "chat.completion",
            "created": head.get("created"),
            "model": head.get("model"),
            **{k: head[k] for k in ("system_fingerprint", "service_tier") if k in head},
            "choices": [_finish_choice(self.choices[i]) for i in sorted(self.choices)],
            "usage": self.usage,
        }


def assemble_stream(
    lines: Iterable[str], *, on_delta: DeltaCallback | None = None
) -> dict[str, Any]:
    """Fold a whole event stream already in hand (tests, replays)."""
    assembler = StreamAssembler(on_delta=on_delta)
    for line in lines:
        if assembler.feed(line):
            break
    return assembler.result()


def _fold_choice(choices: dict[int, dict[str, Any]], delta_choice: dict[str, Any]) -> None:
    index = int(delta_choice.get("index", 0))
    choice = choices.setdefault(
        index,
        {
            "index": index,
            "message": {"role": "assistant"},
            "finish_reason": None,
            "logprobs": None,
            "tool_calls": {},
        },
    )
    delta = delta_choice.get("delta") or {}
    message = choice["message"]
    if delta.get("role"):
        message["role"] = delta["role"]
    for key in ("content", "refusal"):
        if delta.get(key) is not None:
            message[key] = (message.get(key) or "") + delta[key]
    for call in delta.get("tool_calls") or []:
        slot = choice["tool_calls"].setdefault(
            int(call.get("index", 0)), {"type": "function", "function": {"arguments": ""}}
        )
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        if function.get("name"):
            slot["function"]["name"] = function["name"]
        slot["function"]["arguments"] += function.get("arguments") or ""
    if delta_choice.get("finish_reason"):
        choice["finish_reason"] = delta_choice["finish_reason"]
    logprobs = delta_choice.get("logprobs")
    if logprobs and logprobs.get("content"):
        held = choice["logprobs"] or {"content": []}
        held["content"].extend(logprobs["content"])
        choice["logprobs"] = held


def _finish_choice(choice: dict[str, Any]) -> dict[str, Any]:
    message = choice["message"]
    # The shape of a non-streamed message: both keys present, null when unused.
    message.setdefault("content", None)
    message.setdefault("refusal", None)
    calls = choice.pop("tool_calls")
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return choice
