"""Anthropic's Message Batches API as an offload upstream (chatjobs.offload.upstream).

Create a batch with the requests inline (``POST {base}/messages/batches``, body
``{"requests": [{"custom_id": job_id, "params": <Messages API body>}, ...]}``), poll it
(``GET {base}/messages/batches/{id}``: ``processing_status`` ``in_progress`` | ``canceling`` |
``ended``), stream its results line by line from the batch's ``results_url`` (JSONL,
``{"custom_id", "result": {"type": "succeeded" | "errored" | "canceled" | "expired", ...}}``,
in no particular order), list batches newest first (``GET {base}/messages/batches?limit=&
after_id=``, a page of ``data``, ``has_more``, ``first_id``, ``last_id``) and cancel one
(``POST {base}/messages/batches/{id}/cancel``). Every call carries ``x-api-key`` and
``anthropic-version: 2023-06-01``. These shapes are those of anthropic-sdk-python's
``types/messages/`` and of docs.claude.com/en/api (errors, batch results);
chatjobs.simulator_anthropic serves the same.

``encode`` turns the OpenAI chat request into Messages ``params`` and refuses
(``NotOffloadable``) what Anthropic cannot run as OpenAI would; ``results`` turns each
Message back into a ``chat.completion``. An errored item's error is classified by its type
as the synchronous call's HTTP status would be (``rate_limit_error`` 429,
``overloaded_error`` 529, ``api_error`` 500: retried; ``invalid_request_error`` 400 and the
other 4xx types: not). A batch has no whole-batch failure: an ended batch whose every item
errored is just results.

A Message Batch carries no metadata and its requests cannot be read back, so ``find``
recognises the batch an earlier ``submit`` made by when and how big it is; see ``find``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Generator, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx

from chatjobs.errors import (
    UpstreamError,
    UpstreamMalformedResponse,
    UpstreamStatusError,
)
from chatjobs.offload.upstream import (
    EarlierSubmit,
    Item,
    NotOffloadable,
    Result,
    Submitted,
    UpstreamBatch,
    send,
    stream_results,
)
from chatjobs.providers.base import error_payload, join_url, request_id, retry_after
from chatjobs.scrub import scrub_configured

if TYPE_CHECKING:
    from chatjobs.routing import Route

ANTHROPIC_VERSION = "2023-06-01"
# The HTTP status each error type is answered with (docs.claude.com/en/api/errors; 402 and
# 504 from the SDK's BillingError and GatewayTimeoutError), so an errored item is retried
# exactly when the same error answered synchronously would be.
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
# Message stop_reason -> chat.completion finish_reason.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# What Anthropic requires and OpenAI does not: a request that sets no limit gets this one.
DEFAULT_MAX_TOKENS = 4096
# Request fields that change nothing about the answer, left out.
_DROPPED = frozenset({"stream", "stream_options", "store", "metadata", "service_tier"})
# Request fields encode translates (everything else is refused as unknown).
_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "user",
        "n",
        "response_format",
        "logprobs",
        "top_logprobs",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        # The simulator's per-request faults, passed through as in an OpenAI batch line.
        "x_sim",
    }
)
_PAGE = 100
# find: how much earlier than ``since`` a batch may say it was made (the clocks differ).
CLOCK_SKEW = timedelta(seconds=60)
# Anthropic's rule for custom_id (a job id, a UUID, always passes).
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_FRACTION = re.compile(r"(\.\d{6})\d+")


def _headers(api_key: str) -> dict[str, str]:
    headers = {"anthropic-version": ANTHROPIC_VERSION}
    if api_key:
        headers["x-api-key"] = api_key
    return headers


def anthropic_error(
    status: int, headers: httpx.Headers | dict[str, str], body: bytes
) -> UpstreamStatusError:
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``, else the body's
    first 500 characters; the error type is the code."""
    payload = error_payload(body)
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or error.get("type") or f"HTTP {status}")
        code = error.get("type")
    else:
        message = body[:500].decode("utf-8", "replace") or f"HTTP {status}"
        code = None
    rid = request_id(headers) or headers.get("request-id")
    if rid is None and isinstance(payload, dict) and isinstance(payload.get("request_id"), str):
        rid = payload["request_id"]
    return UpstreamStatusError(
        # Providers may quote the key they refused: never let it reach the job or the log.
        scrub_configured(f"upstream answered {status}: {message}")[:2000],
        status_code=status,
        code=None if code is None else str(code)[:200],
        request_id=rid,
        retry_after=retry_after(headers),
    )


def _send(client: httpx.Client, method: str, url: str, api_key: str, **kwargs: Any) -> Any:
    headers = {**_headers(api_key), **kwargs.pop("headers", {})}
    return send(client, method, url, headers, anthropic_error, **kwargs)


# --- OpenAI request -> Messages params ------------------------------------------------------


def _text(content: Any, where: str) -> list[dict[str, Any]]:
    """A message's content (a string, null or text parts) as text blocks; other parts refused."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise NotOffloadable(f"{where}.content: expected a string or an array of parts")
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise NotOffloadable(f"{where}.content[{j}]: {kind!r} parts are not offloaded")
        if part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
    return blocks


def _tool_use(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or call.get("type", "function") != "function":
        raise NotOffloadable(f"{where}: only function tool calls are offloaded")
    if not isinstance(call.get("id"), str) or not call["id"]:
        raise NotOffloadable(f"{where}.id: a tool call needs an id")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise NotOffloadable(f"{where}.function.name: a tool call needs a name")
    raw = fn.get("arguments")
    if raw is not None and not isinstance(raw, str):
        raise NotOffloadable(f"{where}.function.arguments: expected a JSON string")
    try:
        arguments = json.loads(raw or "{}")
    except ValueError:
        raise NotOffloadable(f"{where}.function.arguments: not JSON") from None
    if not isinstance(arguments, dict):
        raise NotOffloadable(f"{where}.function.arguments: not a JSON object")
    return {"type": "tool_use", "id": call["id"], "name": fn["name"], "input": arguments}


def _messages(messages: Any) -> tuple[str | None, list[dict[str, Any]]]:
    """OpenAI messages as Anthropic's ``system`` and alternating user/assistant turns."""
    if not isinstance(messages, list):
        raise NotOffloadable("messages: expected an array")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise NotOffloadable(f"{where}: expected an object")
        role = message.get("role")
        if message.get("name") is not None:
            raise NotOffloadable(f"{where}.name: Anthropic has no participant names")
        if role in ("system", "developer"):
            system.extend(block["text"] for block in _text(message.get("content"), where))
            continue
        if role == "user":
            blocks = _text(message.get("content"), where)
        elif role == "assistant":
            blocks = _text(message.get("content"), where)
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise NotOffloadable(f"{where}.tool_calls: expected an array")
            blocks += [_tool_use(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
        elif role == "tool":
            result = _text(message.get("content"), where)
            if not isinstance(message.get("tool_call_id"), str):
                raise NotOffloadable(f"{where}.tool_call_id: missing")
            block = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
            if result:
                block["content"] = result
            blocks = [block]
            role = "user"
        else:
            raise NotOffloadable(f"{where}.role: {role!r} messages are not offloaded")
        if not blocks:
            continue
        # Anthropic's turns alternate: a run of one role (tool results, then text) is one turn.
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    if not turns:
        raise NotOffloadable("messages: no user or assistant content")
    for turn in turns:
        # A user turn's tool results come before its text (Anthropic refuses them after).
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")
        # One text block is sent as plain text, as most requests are written.
        if len(turn["content"]) == 1 and turn["content"][0]["type"] == "text":
            turn["content"] = turn["content"][0]["text"]
    return ("\n\n".join(system) or None), turns


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise NotOffloadable("tools: expected an array")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise NotOffloadable(f"tools[{i}]: {kind!r} tools are not offloaded")
        if fn.get("strict"):
            raise NotOffloadable(f"tools[{i}].function.strict: schema adherence not guaranteed")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise NotOffloadable(f"tools[{i}].function.name: a tool needs a name")
        schema = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(schema, dict):
            raise NotOffloadable(f"tools[{i}].function.parameters: expected a JSON schema object")
        spec: dict[str, Any] = {"name": fn["name"], "input_schema": schema}
        if isinstance(fn.get("description"), str) and fn["description"]:
            spec["description"] = fn["description"]
        out.append(spec)
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    if choice in ("auto", "none"):
        return {"type": choice}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and choice.get("type") == "function":
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return {"type": "tool", "name": fn["name"]}
    raise NotOffloadable(f"tool_choice: {choice!r} is not offloaded")


def _number(request: dict[str, Any], field: str, low: float, high: float) -> None:
    """NotOffloadable unless ``field`` is absent or a number in [low, high]."""
    value = request.get(field)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise NotOffloadable(f"{field}: Anthropic takes a number from {low:g} to {high:g}")


def _stop_sequences(stop: Any) -> list[str]:
    """OpenAI's ``stop`` as Anthropic's ``stop_sequences``: each must hold a non-space
    character (Anthropic answers 400 to "\n", which OpenAI clients often send)."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise NotOffloadable("stop: expected a string or an array of strings")
    if not all(s.strip() for s in stops):
        raise NotOffloadable("stop: Anthropic refuses stop sequences of only whitespace")
    return list(stops)


def _refuse_unfaithful(request: dict[str, Any]) -> None:
    """NotOffloadable for every field Anthropic cannot honour as OpenAI would."""
    if (request.get("n") or 1) != 1:
        raise NotOffloadable("n: Anthropic answers one choice per request")
    _number(request, "temperature", 0, 1)
    _number(request, "top_p", 0, 1)
    for field in ("max_tokens", "max_completion_tokens"):
        value = request.get(field)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise NotOffloadable(f"{field}: expected a positive integer")
    response_format = request.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise NotOffloadable("response_format: only text is offloaded")
    if request.get("logprobs") or request.get("top_logprobs") is not None:
        raise NotOffloadable("logprobs: Anthropic returns no log probabilities")
    if request.get("seed") is not None:
        raise NotOffloadable("seed: Anthropic has no seeded sampling")
    for penalty in ("frequency_penalty", "presence_penalty"):
        if request.get(penalty):
            raise NotOffloadable(f"{penalty}: Anthropic has no penalties")
    if request.get("logit_bias"):
        raise NotOffloadable("logit_bias: Anthropic has no logit bias")
    unknown = sorted(set(request) - _DROPPED - _HANDLED)
    if unknown:
        raise NotOffloadable(f"{unknown[0]}: not a field the offload translates")


def _sampling(temperature: Any, top_p: Any) -> dict[str, Any]:
    """temperature and top_p as Anthropic takes them: its newer models (Opus 4.1, Sonnet 4.5
    on) refuse both at once (400 "temperature and top_p cannot both be specified for this
    model"), so one at its default (1, the same for both APIs) is left out."""
    if temperature is not None and top_p is not None:
        if top_p == 1:
            top_p = None
        elif temperature == 1:
            temperature = None
        else:
            raise NotOffloadable("top_p: Anthropic takes temperature or top_p, not both")
    sampling = {"temperature": temperature, "top_p": top_p}
    return {key: value for key, value in sampling.items() if value is not None}


def anthropic_params(request: dict[str, Any], max_output_tokens: int | None) -> dict[str, Any]:
    """The chat request as Messages API params; NotOffloadable if it cannot be run faithfully."""
    _refuse_unfaithful(request)
    system, turns = _messages(request.get("messages"))
    max_tokens = (
        request.get("max_completion_tokens")
        or request.get("max_tokens")
        or max_output_tokens
        or DEFAULT_MAX_TOKENS
    )
    params: dict[str, Any] = {
        "model": request.get("model"),
        "max_tokens": int(max_tokens),
        "messages": turns,
    }
    if system is not None:
        params["system"] = system
    params.update(_sampling(request.get("temperature"), request.get("top_p")))
    stop = request.get("stop")
    if stop is not None:
        params["stop_sequences"] = _stop_sequences(stop)
    if request.get("tools"):
        params["tools"] = _tools(request["tools"])
        choice = _tool_choice(request.get("tool_choice") or "auto")
        # OpenAI's parallel_tool_calls=false is Anthropic's disable_parallel_tool_use (which
        # "none" does not take: it calls no tool at all).
        if request.get("parallel_tool_calls") is False and choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
        if request.get("tool_choice") is not None or "disable_parallel_tool_use" in choice:
            params["tool_choice"] = choice
    elif request.get("tool_choice") not in (None, "none", "auto"):
        raise NotOffloadable("tool_choice: names a tool but there are no tools")
    if request.get("user"):
        params["metadata"] = {"user_id": str(request["user"])}
    if request.get("x_sim") is not None:
        params["x_sim"] = request["x_sim"]
    return params


# --- Messages -> chat.completion ---------------------------------------------------------------


def message_completion(message: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Message as the ``chat.completion`` a synchronous call would give."""
    content = message.get("content")
    if not isinstance(content, list):
        raise UpstreamMalformedResponse("batch result's message has no content array")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": str(block.get("id")),
                    "type": "function",
                    "function": {
                        "name": str(block.get("name")),
                        "arguments": json.dumps(block.get("input") or {}, separators=(",", ":")),
                    },
                }
            )
    text = "".join(texts) if texts else None
    out: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if calls:
        out["tool_calls"] = calls
    raw_usage = message.get("usage")
    usage: dict[str, Any] = raw_usage if isinstance(raw_usage, dict) else {}
    prompt = sum(
        _count(usage.get(key))
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    completion = _count(usage.get("output_tokens"))
    cached = _count(usage.get("cache_read_input_tokens"))
    return {
        "id": str(message.get("id")),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": str(message.get("model")),
        "choices": [
            {
                "index": 0,
                "message": out,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(str(message.get("stop_reason")), "stop"),
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            # OpenAI's name for the prompt tokens read from the cache.
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


def _count(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return 0


def errored(error: Any) -> UpstreamStatusError:
    """An errored item's ErrorResponse as the error its synchronous call would have been."""
    inner = error.get("error") if isinstance(error, dict) else None
    if not isinstance(inner, dict):
        inner = error if isinstance(error, dict) else {}
    kind = str(inner.get("type") or "api_error")
    status = ERROR_STATUS.get(kind, 400 if kind.endswith("_request_error") else 500)
    message = str(inner.get("message") or kind)
    rid = error.get("request_id") if isinstance(error, dict) else None
    return UpstreamStatusError(
        scrub_configured(f"batch item errored ({kind}): {message}")[:2000],
        status_code=status,
        code=kind[:200],
        request_id=rid if isinstance(rid, str) else None,
    )


def line_result(line: dict[str, Any]) -> Result | None:
    """One results line as the item's outcome (None: no custom_id)."""
    job_id = line.get("custom_id")
    if not isinstance(job_id, str):
        return None
    result = line.get("result")
    kind = result.get("type") if isinstance(result, dict) else None
    if kind == "succeeded" and isinstance(result, dict):
        message = result.get("message")
        if not isinstance(message, dict):
            return Result(job_id, error=UpstreamMalformedResponse("succeeded with no message"))
        try:
            return Result(job_id, completion=message_completion(message))
        except UpstreamError as exc:
            return Result(job_id, error=exc)
    if kind == "errored" and isinstance(result, dict):
        return Result(job_id, error=errored(result.get("error")))
    if kind in ("canceled", "expired"):
        return Result(job_id, unfinished=True)
    return Result(job_id, error=UpstreamMalformedResponse(f"batch result of type {kind!r}"))


def _created(batch: dict[str, Any]) -> datetime | None:
    """A batch's ``created_at`` (RFC 3339, sometimes with more than microseconds)."""
    raw = batch.get("created_at")
    if not isinstance(raw, str):
        return None
    try:
        created = datetime.fromisoformat(_FRACTION.sub(r"\1", raw.replace("Z", "+00:00")))
    except ValueError:
        return None
    return created if created.tzinfo else created.replace(tzinfo=UTC)


def _size(batch: dict[str, Any]) -> int:
    counts = batch.get("request_counts")
    return sum(_count(v) for v in counts.values()) if isinstance(counts, dict) else -1


class AmbiguousBatch(UpstreamStatusError):
    """More than one unfinished upstream batch could be the row's: find again once they end."""


class AnthropicBatch:
    """The ``anthropic-batch`` offload upstream."""

    name = "anthropic-batch"
    max_items = 100_000
    max_bytes = 256 * 1024 * 1024

    def encode(self, item: Item) -> bytes:
        # One entry of the requests array; submit joins them with commas.
        if not CUSTOM_ID.match(item.job_id):
            raise NotOffloadable("custom_id: the job id is not 1-64 letters, digits, - or _")
        entry = {
            "custom_id": item.job_id,
            "params": anthropic_params(item.request, item.max_output_tokens),
        }
        return json.dumps(entry, separators=(",", ":")).encode()

    def submit(
        self, client: httpx.Client, route: Route, encoded: Sequence[bytes], *, ref: str
    ) -> Submitted:
        # Anthropic batches take no metadata: ref cannot go upstream (find does without it).
        body = b'{"requests":[' + b",".join(e.strip() for e in encoded) + b"]}"
        created = _send(
            client,
            "POST",
            join_url(route.base_url, "messages/batches"),
            route.api_key(),
            content=body,
            headers={"content-type": "application/json"},
        )
        return Submitted(upstream_batch_id=str(created["id"]), upstream_file_id=None)

    def find(self, client: httpx.Client, route: Route, earlier: EarlierSubmit) -> str | None:
        """The batch an earlier submit of the row made, recognised without metadata.

        Candidates are the batches created at or after ``earlier.since`` (less CLOCK_SKEW)
        holding exactly ``earlier.items`` requests, and not recorded by another row
        (``earlier.taken``). An ended candidate is the row's if the first line of its
        results names one of ``earlier.job_ids`` (job ids are unique, so this is proof). If
        none is proved, a single unfinished candidate is taken; several unfinished ones
        raise AmbiguousBatch (retryable), so the caller finds again once they have ended
        rather than guess or create a second batch.

        The limit: an unfinished batch of the same size made in that window by another
        system using this key, not yet recorded anywhere, is taken for the row's if it is
        the only candidate (and the row's own create never reached Anthropic).
        """
        since, wanted = earlier.since, earlier.job_ids
        key = route.api_key()
        if since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        oldest = since - CLOCK_SKEW
        unproved: list[str] = []
        after: str | None = None
        while True:
            params: dict[str, Any] = {"limit": _PAGE}
            if after:
                params["after_id"] = after
            url = join_url(route.base_url, "messages/batches")
            page = _send(client, "GET", url, key, params=params)
            data = page.get("data") or []
            reached_older = False
            for batch in data:
                created = _created(batch)
                if created is None:
                    continue
                if created < oldest:
                    reached_older = True
                    continue
                if _size(batch) != earlier.items or str(batch.get("id")) in earlier.taken:
                    continue
                if batch.get("processing_status") == "ended":
                    if self._first_custom_id(client, route, batch) in wanted:
                        return str(batch["id"])
                else:
                    unproved.append(str(batch["id"]))
            # Newest first: once a page reaches back before the row, nothing older matters.
            if reached_older or not data or not page.get("has_more"):
                break
            after = str(page.get("last_id") or data[-1]["id"])
        if len(unproved) == 1:
            return unproved[0]
        if unproved:
            raise AmbiguousBatch(
                f"{len(unproved)} unfinished upstream batches of {earlier.items} requests "
                "since the row's submit: finding again once they end",
                status_code=409,
                code="ambiguous_batch",
            )
        return None

    def _first_custom_id(self, client: httpx.Client, route: Route, batch: dict[str, Any]) -> Any:
        url = batch.get("results_url")
        if not url:
            return None
        try:
            # Closing the stream after one line: the rest of the file is not read.
            with contextlib.closing(self._stream(client, route, str(url))) as lines:
                for result in lines:
                    return result.job_id
        except UpstreamStatusError as exc:
            # Another batch's results gone (archived) or refused: not proof of anything, and
            # no reason to refuse this row's submit.
            if exc.status_code is None or exc.status_code >= 500 or exc.status_code == 429:
                raise
        return None

    def poll(self, client: httpx.Client, route: Route, upstream_batch_id: str) -> UpstreamBatch:
        url = join_url(route.base_url, f"messages/batches/{upstream_batch_id}")
        batch = _send(client, "GET", url, route.api_key())
        status = str(batch.get("processing_status"))
        return UpstreamBatch(
            upstream_batch_id=upstream_batch_id,
            status=status,
            ended=status == "ended",
            output_ref=batch.get("results_url"),
        )

    def results(self, client: httpx.Client, route: Route, batch: UpstreamBatch) -> Iterator[Result]:
        if batch.output_ref:
            yield from self._stream(client, route, batch.output_ref)

    def _stream(self, client: httpx.Client, route: Route, url: str) -> Generator[Result]:
        """The results file at ``url``, line by line (never the whole file in memory)."""
        return stream_results(client, url, _headers(route.api_key()), anthropic_error, line_result)

    def cancel(self, client: httpx.Client, route: Route, upstream_batch_id: str) -> None:
        url = join_url(route.base_url, f"messages/batches/{upstream_batch_id}/cancel")
        try:
            _send(client, "POST", url, route.api_key())
        except UpstreamStatusError as exc:
            # Anthropic's answer for cancelling an ended batch is not documented: a 4xx is
            # no error when the batch has in fact ended or is being cancelled already.
            if exc.status_code not in (400, 409):
                raise
            if self.poll(client, route, upstream_batch_id).status not in ("ended", "canceling"):
                raise
