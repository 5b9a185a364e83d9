"""Anthropic's Message Batches API, in memory, for the simulator (``/v1/messages/batches``).

Create (``POST``), retrieve (``GET /{id}``), list (``GET``, newest first, ``limit``,
``after_id``, ``before_id``; ``data``, ``has_more``, ``first_id``, ``last_id``), cancel
(``POST /{id}/cancel``) and results (``GET /{id}/results``, JSONL, the batch's
``results_url``), in the shapes of anthropic-sdk-python's ``types/messages/`` and
docs.claude.com/en/api; errors are ``{"type": "error", "error": {"type", "message"}}``.

A batch is processed ``anthropic_batch_delay`` seconds after it is created, all at once, on
the first request that looks at it then (no background task): each request gets a Message
with the simulator's deterministic content and usage (chatjobs.simulator's helpers). Per
request, ``params.x_sim`` (the simulator's fault field; the real API has no such field)
forces an outcome: ``status`` (an HTTP error status) makes it ``errored`` with the error type
that status has (``type`` and ``message`` override), ``batch_result: "expired" | "canceled"``
that result. ``anthropic_batch_expire`` expires every request of the batches processed while
it is set. A cancelled batch is ``canceling`` in the cancel's answer and ends at the next look,
its unprocessed requests ``canceled``.

Assumptions (not documented by Anthropic): create refuses malformed ``params`` (no model,
max_tokens or messages) with a 400, as it does a bad ``custom_id``; the real API may instead
report some of them as errored results. Cancelling an ended batch answers 400.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from chatjobs.simulator import (
    _content_digest,
    _reply_content,
    _sample_value,
    _truncate_to_tokens,
    count_prompt_tokens,
    count_text_tokens,
)

if TYPE_CHECKING:
    from chatjobs.simulator import Simulator

PREFIX = "/v1/messages/batches"
CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_REQUESTS = 100_000
EXPIRES_AFTER = 24 * 3600
# HTTP status -> error type (docs.claude.com/en/api/errors; 402 and 504 from the SDK).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _error(status: int, message: str) -> Response:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return _json(error_body(kind, message), status)


def _json(data: Any, status: int = 200) -> Response:
    headers = {"request-id": "req_" + uuid.uuid4().hex[:24]}
    body = json.dumps(data, separators=(",", ":")).encode()
    return Response(body, status, headers, media_type="application/json")


def _rfc3339(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


@dataclass
class Batch:
    id: str
    seq: int
    created: float
    ends: float
    requests: list[dict[str, Any]]
    status: str = "in_progress"
    ended: float | None = None
    cancel_initiated: float | None = None
    results: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        counts = dict.fromkeys(("processing", "succeeded", "errored", "canceled", "expired"), 0)
        if self.status != "ended":
            counts["processing"] = len(self.requests)
            return counts
        for line in self.results:
            counts[line["result"]["type"]] += 1
        return counts

    def view(self, base: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": self.counts(),
            "ended_at": _rfc3339(self.ended),
            "created_at": _rfc3339(self.created),
            "expires_at": _rfc3339(self.created + EXPIRES_AFTER),
            "archived_at": None,
            "cancel_initiated_at": _rfc3339(self.cancel_initiated),
            "results_url": f"{base}{PREFIX}/{self.id}/results" if self.status == "ended" else None,
        }


def _text_of(content: Any) -> str:
    """A Messages content (string or blocks) as text, for counting and the digest."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    parts = []
    for block in content:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            parts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            parts.append(json.dumps(block.get("input") or {}, sort_keys=True))
        elif block.get("type") == "tool_result":
            parts.append(_text_of(block.get("content")))
    return "\n".join(parts)


def _forced_tool(params: dict[str, Any]) -> dict[str, Any] | None:
    tools = params.get("tools") or []
    choice = params.get("tool_choice") or {}
    if not tools or not isinstance(choice, dict):
        return None
    if choice.get("type") == "any":
        return dict(tools[0])
    if choice.get("type") == "tool":
        return next((dict(t) for t in tools if t.get("name") == choice.get("name")), None)
    return None


def message(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """The Message a request's params get: deterministic content and usage."""
    model = str(params["model"])
    system = _text_of(params.get("system"))
    flat = [{"role": "system", "content": system}] if system else []
    flat += [{"role": m["role"], "content": _text_of(m.get("content"))} for m in params["messages"]]
    digest = _content_digest(flat, model, seed)
    tool = _forced_tool(params)
    if tool is not None:
        arguments = _sample_value(tool.get("input_schema") or {"type": "object"}) or {}
        name = str(tool.get("name"))
        call_id = "toolu_" + digest.hex()[8:32]
        content = [{"type": "tool_use", "id": call_id, "name": name, "input": arguments}]
        output = count_text_tokens(name) + count_text_tokens(json.dumps(arguments))
        stop = "tool_use"
    else:
        target = 16 + int.from_bytes(digest[8:12], "big") % 49
        text = _reply_content(digest, target, False)
        stop = "end_turn"
        if count_text_tokens(text) > int(params["max_tokens"]):
            text = _truncate_to_tokens(text, int(params["max_tokens"]))
            stop = "max_tokens"
        content = [{"type": "text", "text": text}]
        output = count_text_tokens(text)
    return {
        "id": "msg_" + uuid.uuid4().hex[:24],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": count_prompt_tokens(flat),
            "output_tokens": output,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "service_tier": "batch",
        },
    }


def outcome(params: dict[str, Any], seed: int, expire: bool) -> dict[str, Any]:
    """One request's result: forced by x_sim or the expire knob, else a Message."""
    raw = params.get("x_sim")
    xsim: dict[str, Any] = raw if isinstance(raw, dict) else {}
    if expire or xsim.get("batch_result") == "expired":
        return {"type": "expired"}
    if xsim.get("batch_result") == "canceled":
        return {"type": "canceled"}
    status = xsim.get("status")
    if isinstance(status, int) and status >= 400:
        default = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        kind = str(xsim.get("type") or default)
        text = str(xsim.get("message") or f"Simulated {kind}.")
        return {"type": "errored", "error": {**error_body(kind, text), "request_id": None}}
    temperature = params.get("temperature")
    if isinstance(temperature, int | float) and not 0 <= temperature <= 1:
        text = "temperature: Input should be less than or equal to 1"
        return {"type": "errored", "error": error_body("invalid_request_error", text)}
    return {"type": "succeeded", "message": message(params, seed)}


def _validate(body: Any) -> str | None:
    """What is wrong with a create body (None: nothing)."""
    if not isinstance(body, dict) or not isinstance(body.get("requests"), list):
        return "requests: Field required"
    requests = body["requests"]
    if not 1 <= len(requests) <= MAX_REQUESTS:
        return f"requests: must hold between 1 and {MAX_REQUESTS} requests"
    seen: set[str] = set()
    for i, entry in enumerate(requests):
        where = f"requests.{i}"
        if not isinstance(entry, dict):
            return f"{where}: Input should be an object"
        custom_id = entry.get("custom_id")
        if not isinstance(custom_id, str) or not CUSTOM_ID.match(custom_id):
            return f"{where}.custom_id: String should match pattern '{CUSTOM_ID.pattern}'"
        if custom_id in seen:
            return f"{where}.custom_id: Duplicate custom_id {custom_id!r} in the batch"
        seen.add(custom_id)
        params = entry.get("params")
        if not isinstance(params, dict):
            return f"{where}.params: Field required"
        if not isinstance(params.get("model"), str) or not params["model"]:
            return f"{where}.params.model: Field required"
        tokens = params.get("max_tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            return f"{where}.params.max_tokens: Field required (an integer >= 1)"
        messages = params.get("messages")
        if not isinstance(messages, list) or not messages:
            return f"{where}.params.messages: Field required (a non-empty array)"
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
                return f"{where}.params.messages.{j}.role: Input should be 'user' or 'assistant'"
    return None


class MessageBatches:
    """The batches one simulator app holds, and their processing."""

    def __init__(self, sim: Simulator, clock: Callable[[], float] = time.time) -> None:
        self.sim = sim
        self.clock = clock
        self.batches: dict[str, Batch] = {}
        self._seq = 0

    def create(self, requests: list[dict[str, Any]]) -> Batch:
        now = self.clock()
        self._seq += 1
        batch = Batch(
            id="msgbatch_" + uuid.uuid4().hex[:24],
            seq=self._seq,
            created=now,
            ends=now + self.sim.config.anthropic_batch_delay,
            requests=requests,
        )
        self.batches[batch.id] = batch
        return batch

    def get(self, batch_id: str) -> Batch | None:
        batch = self.batches.get(batch_id)
        if batch is not None:
            self._advance(batch)
        return batch

    def _advance(self, batch: Batch) -> None:
        """Process the batch if its time has come, or end it if it was cancelled."""
        if batch.status == "ended":
            return
        now = self.clock()
        if batch.status == "canceling":
            batch.results = [
                {"custom_id": r["custom_id"], "result": {"type": "canceled"}}
                for r in batch.requests
            ]
        elif now >= batch.ends:
            expire = self.sim.config.anthropic_batch_expire
            seed = self.sim.config.seed
            batch.results = [
                {"custom_id": r["custom_id"], "result": outcome(r["params"], seed, expire)}
                for r in batch.requests
            ]
        else:
            return
        batch.status, batch.ended = "ended", now

    def newest_first(self) -> list[Batch]:
        ordered = sorted(self.batches.values(), key=lambda b: b.seq, reverse=True)
        for batch in ordered:
            self._advance(batch)
        return ordered


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def batch_routes(sim: Simulator) -> list[Route]:
    """The Message Batches routes of one simulator app."""
    store = MessageBatches(sim)

    def denied(request: Request) -> Response | None:
        key = sim.config.api_key
        if key is None:
            return None
        given = request.headers.get("x-api-key")
        if not given:
            return _error(401, "x-api-key header is required")
        return None if given == key else _error(401, "invalid x-api-key")

    async def create_or_list(request: Request) -> Response:
        if (refused := denied(request)) is not None:
            return refused
        if request.method == "GET":
            return listing(request)
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError:
            return _error(400, "The request body is not valid JSON.")
        if (problem := _validate(body)) is not None:
            return _error(400, problem)
        requests = [{"custom_id": r["custom_id"], "params": r["params"]} for r in body["requests"]]
        return _json(store.create(requests).view(_base(request)))

    def listing(request: Request) -> Response:
        try:
            limit = int(request.query_params.get("limit", "20"))
        except ValueError:
            return _error(400, "limit: Input should be a valid integer")
        if not 1 <= limit <= 1000:
            return _error(400, "limit: Input should be between 1 and 1000")
        ordered = store.newest_first()
        after, before = request.query_params.get("after_id"), request.query_params.get("before_id")
        ids = [b.id for b in ordered]
        if after is not None:
            ordered = ordered[ids.index(after) + 1 :] if after in ids else []
            page = ordered[:limit]
            more = len(ordered) > limit
        elif before is not None:
            ordered = ordered[: ids.index(before)] if before in ids else []
            page = ordered[-limit:]
            more = len(ordered) > limit
        else:
            page, more = ordered[:limit], len(ordered) > limit
        base = _base(request)
        return _json(
            {
                "data": [b.view(base) for b in page],
                "has_more": more,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
            }
        )

    def named(request: Request) -> Batch | Response:
        """The batch the path names, or the answer refusing the request."""
        if (refused := denied(request)) is not None:
            return refused
        batch = store.get(request.path_params["batch_id"])
        if batch is None:
            return _error(404, f"Message Batch {request.path_params['batch_id']!r} not found.")
        return batch

    async def retrieve(request: Request) -> Response:
        batch = named(request)
        if isinstance(batch, Response):
            return batch
        return _json(batch.view(_base(request)))

    async def cancel(request: Request) -> Response:
        batch = named(request)
        if isinstance(batch, Response):
            return batch
        if batch.status == "ended":
            return _error(400, f"Message Batch {batch.id!r} has already ended.")
        if batch.status == "in_progress":
            batch.status, batch.cancel_initiated = "canceling", store.clock()
        return _json(batch.view(_base(request)))

    async def results(request: Request) -> Response:
        batch = named(request)
        if isinstance(batch, Response):
            return batch
        if batch.status != "ended":
            return _error(400, f"Message Batch {batch.id!r} has not ended: no results yet.")
        lines = list(batch.results)

        def body() -> Iterator[bytes]:
            for line in lines:
                yield json.dumps(line, separators=(",", ":")).encode() + b"\n"

        return StreamingResponse(body(), media_type="application/x-jsonl")

    return [
        Route(PREFIX, create_or_list, methods=["GET", "POST"]),
        Route(PREFIX + "/{batch_id}", retrieve, methods=["GET"]),
        Route(PREFIX + "/{batch_id}/cancel", cancel, methods=["POST"]),
        Route(PREFIX + "/{batch_id}/results", results, methods=["GET"]),
    ]
