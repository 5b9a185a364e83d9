"""Requests longer than the model's window: count, then error, truncate, or plan a map-reduce
whose steps run as child jobs (see chatjobs.jobs.steps).

Planning is linear in the body but not free (about 0.1 s per MB), so the API plans only what
is small (``plan_at_submit``) and the worker that claims a large job plans it there.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from chatjobs.chunking import split_text
from chatjobs.errors import ContextTooLong, TooManyUpstreamCalls
from chatjobs.routing import model_spec, output_budget
from chatjobs.schemas import LongContext
from chatjobs.settings import get_settings
from chatjobs.tokens import (
    ModelSpec,
    count_messages,
    count_text,
    encode_text,
    get_encoding,
    upper_bound_tokens,
)

DEFAULT_MAP_PROMPT = (
    "You are reading part {index} of {total} of a longer document; only this part is shown. "
    "Apply the request below to this part alone, keeping every detail a later summary of the "
    "whole document would need.\n\n"
)
DEFAULT_REDUCE_PROMPT = (
    "Below are {total} partial answers, in document order, each made from one part of a long "
    "document for the same request. Combine them into one answer to the request for the whole "
    "document, without repeating yourself.\n\n"
)
# Room left for the differences between our count of a chunk alone and in its message.
_MARGIN = 16


@dataclass
class Plan:
    """What submit decided: the count, and how the job will reach the upstream."""

    prompt_tokens: int | None
    method: str | None
    window: int
    budget: int
    strategy: str | None = None
    upstream_request: dict[str, Any] | None = None
    record: dict[str, Any] | None = None
    map_requests: list[dict[str, Any]] = field(default_factory=list)
    map_tokens: list[int] = field(default_factory=list)


# Below these sizes (upper bounds, in tokens) counting and planning take a few ms to ~50 ms
# whatever the content (the counter is linear), so the API does them; above, the API stores
# the job unplanned and the worker that claims it plans it.
COUNT_AT_SUBMIT = 64 * 1024
PLAN_AT_SUBMIT = 512 * 1024


def warm() -> None:
    """Load the default model's encoding now (about 1.5 s), so no request pays for it."""
    spec = model_spec(get_settings().default_model)
    if spec.encoding is not None:
        get_encoding(spec.encoding)


def plan_at_submit(
    request: dict[str, Any],
    model: str,
    long_context: LongContext | None,
    *,
    max_calls: int | None = None,
) -> Plan | None:
    """The plan when it is cheap to make now; None when the worker must make it.

    A token is at least one byte, so a body whose bytes (plus framing) fit the window surely
    fits: it is counted only if small (the count feeds the limiter's reservation; the worker
    counts the rest itself).
    """
    spec = model_spec(model)
    budget = output_budget(request, spec)
    upper = upper_bound_tokens(request.get("messages") or [], request.get("tools"))
    if upper <= COUNT_AT_SUBMIT or upper > spec.context_window - budget:
        if upper > PLAN_AT_SUBMIT:
            return None
        return plan(request, model, long_context, max_calls=max_calls)
    return Plan(None, None, spec.context_window, budget)


def plan(
    request: dict[str, Any],
    model: str,
    long_context: LongContext | None,
    *,
    max_calls: int | None = None,
) -> Plan:
    """Count the prompt and, when prompt + output budget exceeds the window, apply the job's
    strategy (default map_reduce). Raises ContextTooLong for the error strategy, and
    TooManyUpstreamCalls when map_reduce needs more than ``max_calls`` map steps (the
    tenant's limit; None: CHATJOBS_TENANT_MAX_CALLS_PER_JOB; 0: no limit)."""
    spec = model_spec(model)
    messages = request.get("messages") or []
    count = count_messages(messages, spec, tools=request.get("tools"))
    budget = output_budget(request, spec)
    result = Plan(count.tokens, count.method, spec.context_window, budget)
    if count.tokens + budget <= spec.context_window:
        return result
    options = long_context or LongContext()
    result.strategy = options.strategy
    over = (
        f"the prompt is {count.tokens} tokens ({count.method}) and the output budget "
        f"{budget}, {count.tokens + budget} in all, over {model}'s context window of "
        f"{spec.context_window}"
    )
    if options.strategy == "error":
        raise ContextTooLong(over)
    if options.strategy == "truncate":
        result.upstream_request, result.record = _truncate(request, spec, budget)
        return result
    if max_calls is None:
        max_calls = get_settings().tenant_max_calls_per_job
    result.map_requests, result.map_tokens, result.record = _map_requests(
        request, spec, budget, options, max_calls
    )
    return result


def _fill(template: str, **values: int) -> str:
    """Fill {index} and {total}; unlike str.format, other braces in a prompt are left alone."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template


def _fits(messages: list[dict[str, Any]], spec: ModelSpec, budget: int, tools: Any) -> int:
    """How many tokens over the window these messages are (<= 0 when they fit)."""
    return count_messages(messages, spec, tools=tools).tokens + budget - spec.context_window


def _truncate(
    request: dict[str, Any], spec: ModelSpec, budget: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Drop the oldest non-system messages, then trim the longest content, until it fits."""
    messages = copy.deepcopy(request["messages"])
    tools = request.get("tools")
    kept = list(range(len(messages)))
    dropped: list[int] = []
    keep_roles = {"system", "developer"}
    while _fits([messages[i] for i in kept], spec, budget, tools) > 0:
        droppable = [i for i in kept if messages[i].get("role") not in keep_roles]
        if len(droppable) <= 1:
            break
        dropped.append(droppable[0])
        kept.remove(droppable[0])
    record: dict[str, Any] = {"strategy": "truncate", "dropped_messages": dropped}
    over = _fits([messages[i] for i in kept], spec, budget, tools)
    if over > 0:
        strings = [i for i in kept if isinstance(messages[i].get("content"), str)]
        if not strings:
            raise ContextTooLong("nothing left to truncate: no message has text content")
        longest = max(strings, key=lambda i: len(messages[i]["content"]))
        text = messages[longest]["content"]
        before = count_text(text, spec.encoding)
        target = before - over - _MARGIN
        if target < 1:
            raise ContextTooLong(
                f"even with message {longest} emptied the request is over the window of "
                f"{spec.context_window}"
            )
        messages[longest]["content"] = _head(text, target, spec.encoding)
        while _fits([messages[i] for i in kept], spec, budget, tools) > 0 and target > 1:
            target = max(1, target - _MARGIN)
            messages[longest]["content"] = _head(text, target, spec.encoding)
        record["trimmed"] = {
            "message": longest,
            "from_tokens": before,
            "to_tokens": count_text(messages[longest]["content"], spec.encoding),
        }
    upstream = {**request, "messages": [messages[i] for i in kept]}
    return upstream, record


def _head(text: str, tokens: int, encoding: str | None) -> str:
    """The beginning of ``text``, at most ``tokens`` long."""
    if encoding is None:
        return text.encode()[: tokens * 3].decode(errors="ignore")
    enc = get_encoding(encoding)
    return enc.decode(encode_text(text, encoding)[:tokens])


def _document_index(messages: list[dict[str, Any]]) -> int:
    """The message holding the document: the longest user text."""
    users = [
        i
        for i, m in enumerate(messages)
        if m.get("role") == "user" and isinstance(m.get("content"), str)
    ]
    if not users:
        raise ContextTooLong("map_reduce needs a user message with text content to split")
    return max(users, key=lambda i: len(messages[i]["content"]))


def _map_requests(
    request: dict[str, Any], spec: ModelSpec, budget: int, options: LongContext, max_calls: int
) -> tuple[list[dict[str, Any]], list[int], dict[str, Any]]:
    messages = request["messages"]
    doc = _document_index(messages)
    map_prompt = options.map_prompt or DEFAULT_MAP_PROMPT
    header = _fill(map_prompt, index=999, total=999)
    skeleton = copy.deepcopy(messages)
    skeleton[doc]["content"] = header
    fixed = count_messages(skeleton, spec, tools=request.get("tools")).tokens
    room = spec.context_window - budget - fixed - _MARGIN
    if room < 32:
        raise ContextTooLong(
            f"the instructions alone ({fixed} tokens) and the output budget ({budget}) leave "
            f"no room for the document in a window of {spec.context_window}"
        )
    overlap = min(get_settings().chunk_overlap_tokens, room // 4)
    # Copied once without the document, not once per chunk with it (a 10 MB copy each).
    skeleton_request = {k: v for k, v in request.items() if k not in ("stream", "stream_options")}
    skeleton_request["messages"] = skeleton
    chunks = split_text(
        messages[doc]["content"], encoding=spec.encoding, max_tokens=room, overlap_tokens=overlap
    )
    if max_calls and len(chunks) > max_calls:
        # Before the copies: refusing a 10 MB document must not cost one copy per chunk.
        raise TooManyUpstreamCalls(
            f"the document splits into {len(chunks)} parts of at most {room} tokens for "
            f"{spec.name}'s window, so the job would make {len(chunks)} map calls (and "
            f"reduces), over this tenant's limit of {max_calls} upstream calls per job"
        )
    out_key = "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens"
    requests = []
    counts = []
    for i, chunk in enumerate(chunks):
        step = copy.deepcopy(skeleton_request)
        step[out_key] = budget
        step["messages"][doc]["content"] = _fill(map_prompt, index=i + 1, total=len(chunks)) + chunk
        requests.append(step)
        counts.append(count_messages(step["messages"], spec, tools=request.get("tools")).tokens)
    record = {
        "strategy": "map_reduce",
        "document_message": doc,
        "chunks": len(chunks),
        "chunk_tokens": room,
        "overlap_tokens": overlap,
    }
    return requests, counts, record


def reduce_request(
    request: dict[str, Any],
    parts: list[str],
    spec: ModelSpec,
    reduce_prompt: str | None,
) -> dict[str, Any]:
    """A reduce step: the original system messages, then the partial answers in order."""
    budget = output_budget(request, spec)
    out_key = "max_completion_tokens" if "max_completion_tokens" in request else "max_tokens"
    kept = [m for m in request["messages"] if m.get("role") in ("system", "developer")]
    body = _fill(reduce_prompt or DEFAULT_REDUCE_PROMPT, total=len(parts)) + "\n\n".join(
        f"[Part {i + 1} of {len(parts)}]\n{part}" for i, part in enumerate(parts)
    )
    step = {k: v for k, v in request.items() if k not in ("messages", "stream", "stream_options")}
    step["messages"] = [*kept, {"role": "user", "content": body}]
    step[out_key] = budget
    return step


def group_parts(
    request: dict[str, Any], parts: list[str], spec: ModelSpec, reduce_prompt: str | None
) -> list[list[int]]:
    """Contiguous groups of part indices whose reduce request fits the window.

    One group means the final reduce; several mean another level of reduces first.
    """
    budget = output_budget(request, spec)

    def fits(indices: list[int]) -> bool:
        step = reduce_request(request, [parts[i] for i in indices], spec, reduce_prompt)
        return count_messages(step["messages"], spec).tokens + budget <= spec.context_window

    groups: list[list[int]] = []
    current: list[int] = []
    for i in range(len(parts)):
        if fits([*current, i]):
            current.append(i)
            continue
        if len(current) < 2:
            raise ContextTooLong(
                "the partial answers are too long to combine two at a time within the window "
                f"of {spec.context_window}; lower max_tokens"
            )
        groups.append(current)
        current = [i]
    groups.append(current)
    if len(groups) > 1 and len(groups[-1]) < 2:
        # A lone tail part is carried up a level inside the previous group's reduce instead.
        groups[-2].extend(groups.pop())
    return groups
