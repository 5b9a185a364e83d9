"""The httpx client for an OpenAI-compatible POST {base_url}/chat/completions.

Maps every failure to an UpstreamError subclass; a streamed answer is assembled into the same
``chat.completion`` object a non-streamed call returns.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from chatjobs.errors import (
    UpstreamConnectionError,
    UpstreamError,
    UpstreamMalformedResponse,
    UpstreamStatusError,
    UpstreamTimeout,
)
from chatjobs.scrub import scrub_configured
from chatjobs.settings import Settings, get_settings

DeltaCallback = Callable[[dict[str, Any]], None]


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
    base_url: str,
    api_key: str = "",
    on_delta: DeltaCallback | None = None,
) -> Completion:
    """Send one chat-completion request; raises an UpstreamError on any failure."""
    body = {**request, "model": model}
    url = f"{base_url.rstrip('/')}/chat/completions"
    auth = {"authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.monotonic()
    first_event: float | None = None
    try:
        if body.get("stream"):
            options = dict(body.get("stream_options") or {})
            options["include_usage"] = True
            body["stream_options"] = options
            async with client.stream("POST", url, json=body, headers=auth) as response:
                if not response.is_success:
                    await response.aread()
                _raise_for_status(response)
                assembler = StreamAssembler(on_delta=on_delta)
                async for line in response.aiter_lines():
                    if first_event is None and line.startswith("data:"):
                        first_event = time.monotonic()
                    if assembler.feed(line):
                        break
                completion = assembler.result()
        else:
            response = await client.post(url, json=body, headers=auth)
            _raise_for_status(response)
            completion = _parse_completion(response)
    except httpx.TimeoutException as exc:
        raise UpstreamTimeout(f"upstream timed out: {type(exc).__name__}") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise UpstreamConnectionError(
            scrub_configured(f"upstream connection failed: {exc!r}")
        ) from exc
    usage = _usage(completion)
    return Completion(
        body=completion,
        usage=usage,
        status_code=response.status_code,
        request_id=response.headers.get("x-request-id"),
        latency_ms=int((time.monotonic() - started) * 1000),
        ratelimit={k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")},
        ttft_ms=None if first_event is None else int((first_event - started) * 1000),
    )


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    message, code = _error_detail(response)
    raise UpstreamStatusError(
        # Providers quote the key they refused: never let it reach the job or the log.
        scrub_configured(f"upstream answered {response.status_code}: {message}"),
        status_code=response.status_code,
        code=code,
        request_id=response.headers.get("x-request-id"),
        retry_after=retry_after(response.headers),
    )


def _error_detail(response: httpx.Response) -> tuple[str, str | None]:
    try:
        payload = response.json()
    except (ValueError, RecursionError):
        return response.text[:500] or response.reason_phrase, None
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        code = error.get("code")
        if code is None or code == "":
            code = error.get("type")
        return str(error.get("message") or error), _code_text(code)
    return json.dumps(payload)[:500], None


def _code_text(code: Any) -> str | None:
    """An error code as text: providers send strings, numbers (``"code": 123``) or null."""
    if code is None:
        return None
    return (code if isinstance(code, str) else json.dumps(code, default=str))[:200]


def retry_after(headers: httpx.Headers) -> float | None:
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


def _parse_completion(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (ValueError, RecursionError) as exc:
        raise UpstreamMalformedResponse(
            f"upstream answered {response.status_code} with a body that is not JSON: "
            f"{scrub_configured(response.text[:2000])[:200]!r}",
            status_code=response.status_code,
            request_id=response.headers.get("x-request-id"),
        ) from exc
    if not isinstance(body, dict) or not body.get("choices"):
        raise UpstreamMalformedResponse(
            f"upstream answered {response.status_code} with JSON that has no choices",
            status_code=response.status_code,
            request_id=response.headers.get("x-request-id"),
        )
    return body


def _usage(completion: dict[str, Any]) -> dict[str, int]:
    return clean_usage(completion.get("usage")) or dict.fromkeys(_USAGE_KEYS, 0)


_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def clean_usage(usage: Any) -> dict[str, int] | None:
    """An upstream's usage as three non-negative integers, whatever shape it came in: a
    malformed usage must never cost the answer it came with."""
    if not isinstance(usage, dict):
        return None
    out: dict[str, int] = {}
    for key in _USAGE_KEYS:
        value = usage.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**31:
            out[key] = int(value)
        else:  # missing, a string, negative, NaN, absurd: counted as nothing
            out[key] = 0
    if not out["total_tokens"]:
        out["total_tokens"] = min(out["prompt_tokens"] + out["completion_tokens"], 2**31 - 1)
    return out


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


__all__ = [
    "Completion",
    "StreamAssembler",
    "UpstreamError",
    "assemble_stream",
    "build_client",
    "chat_completion",
]
