"""An OpenAI-compatible chat-completions upstream simulator for tests, benchmarks and `make run`.

Besides OpenAI's path it serves Workers AI's, AI Gateway's and Azure OpenAI's, each in that
provider's shape (chatjobs.simulator_providers); the path decides the shape.

Everything is in-process asyncio state: one `Simulator` per app holds the live config, the rate
limiter, the counters and the call log, so a benchmark can hold thousands of sleeping requests
without threads. Behaviour is deterministic: the same request body gives the same content and
usage, and injected faults follow a seeded RNG.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from chatjobs import logs
from chatjobs import simulator_providers as prov
from chatjobs.tokens import count_messages, count_text, lookup_model

__all__ = [
    "SimConfig",
    "Simulator",
    "add_arguments",
    "config_from_args",
    "config_from_env",
    "count_prompt_tokens",
    "count_text_tokens",
    "create_app",
    "main",
    "serve",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gpt-4.1"
ENV_PREFIX = "CHATJOBS_SIM_"
CALLS_MAXLEN = 100_000
DEFAULT_CALLS_LIMIT = 1000
# Status recorded for requests whose client went away before we answered (nginx's convention).
CLIENT_CLOSED = 499
MALFORMED_BODY = b'{"id": "chatcmpl-broken", "choices": ['
SERVER_ERROR_MESSAGE = "The server had an error while processing your request."
MODELS = ("gpt-4.1", "gpt-4.1-mini", "gpt-4o-mini")
# Three-letter words, each exactly one o200k_base (and cl100k_base) token with its leading space,
# so a reply grows by one token per word and usage can match any target exactly.
_VOCAB = (
    "the", "job", "sim", "api", "run", "log", "key", "box", "fox", "red", "sky", "sun", "cat",
    "dog", "map", "net", "cup", "pen", "web", "row", "set", "bit", "hub", "jar", "kit", "lab",
    "mix", "oak", "pod", "ray", "tag", "zip",
)  # fmt: skip
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_PIECE_RE = re.compile(r"\S+\s*|\s+")


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass
class SimConfig:
    """Behaviour knobs of the simulator; all of them can be changed live via POST /_sim/config."""

    latency: float = 0.0
    jitter: float = 0.0
    rpm: int | None = None
    tpm: int | None = None
    limit_window: str = "minute"
    error_rate: float = 0.0
    error_statuses: tuple[int, ...] = (500, 502, 503, 529)
    timeout_rate: float = 0.0
    hang_seconds: float = 3600.0
    malformed_rate: float = 0.0
    context_window: int | None = None
    api_key: str | None = None
    stream_chunk_delay: float = 0.0
    seed: int = 0
    provider: str = "all"
    gateway_cache: bool = False
    gateway_default_attempts: int = 5
    gateway_token: str | None = None
    native_usage: bool = True
    # Anthropic's Message Batches (chatjobs.simulator_anthropic).
    anthropic_batch_delay: float = 1.0
    anthropic_batch_expire: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce_field(f.name, getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["error_statuses"] = list(self.error_statuses)
        return data


_SECONDS_FIELDS = frozenset(
    {"latency", "jitter", "hang_seconds", "stream_chunk_delay", "anthropic_batch_delay"}
)
_RATE_FIELDS = frozenset({"error_rate", "timeout_rate", "malformed_rate"})
_LIMIT_FIELDS = frozenset({"rpm", "tpm", "context_window"})
_BOOL_FIELDS = frozenset({"gateway_cache", "native_usage", "anthropic_batch_expire"})
_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(SimConfig))
# Spellings of "no limit" accepted from the environment and the command line.
_UNLIMITED = frozenset({"", "none", "null", "off", "unlimited"})
# How the RPM/TPM limits are enforced (see _RateLimiter).
LIMIT_WINDOWS = ("minute", "second", "sliding")
# --provider: restrict the simulator to one provider's paths.
PROVIDER_CHOICES = (prov.ALL, *prov.PROVIDERS)


def _coerce_field(name: str, value: object) -> Any:
    """Validate one SimConfig field and normalise its type; ValueError names the field."""
    if name in _SECONDS_FIELDS or name in _RATE_FIELDS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{name}: expected a number, got {value!r}")
        number = float(value)
        if not math.isfinite(number) or number < 0:
            raise ValueError(f"{name}: must be a finite number >= 0, got {value!r}")
        if name in _RATE_FIELDS and number > 1:
            raise ValueError(f"{name}: must be between 0 and 1, got {value!r}")
        return number
    if name in _LIMIT_FIELDS:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a non-negative integer or null, got {value!r}")
        # 0 means "no limit": a limit nothing can pass is never what anyone wants.
        return value or None
    if name == "limit_window":
        if value not in LIMIT_WINDOWS:
            expected = ", ".join(repr(w) for w in LIMIT_WINDOWS)
            raise ValueError(f"{name}: expected one of {expected}, got {value!r}")
        return value
    if name == "error_statuses":
        if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
            raise ValueError(f"{name}: expected a non-empty list of HTTP statuses, got {value!r}")
        statuses = tuple(value)
        for status in statuses:
            if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
                raise ValueError(f"{name}: {status!r} is not an HTTP error status (400-599)")
        return statuses
    if name == "provider":
        if value not in PROVIDER_CHOICES:
            expected = ", ".join(repr(p) for p in PROVIDER_CHOICES)
            raise ValueError(f"{name}: expected one of {expected}, got {value!r}")
        return value
    if name in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"{name}: expected a boolean, got {value!r}")
        return value
    if name == "gateway_default_attempts":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 5:
            raise ValueError(f"{name}: expected an integer between 1 and 5, got {value!r}")
        return value
    if name in ("api_key", "gateway_token"):
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise ValueError(f"{name}: expected a string or null, got {value!r}")
        return value
    if name == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return value
    raise ValueError(f"unknown simulator setting {name!r}")


def _parse_text(name: str, raw: str) -> object:
    """Turn the text form of a field (env var, CLI flag) into its Python value."""
    text = raw.strip()
    try:
        if name in _SECONDS_FIELDS or name in _RATE_FIELDS:
            return float(text)
        if name in _LIMIT_FIELDS:
            return None if text.lower() in _UNLIMITED else int(text)
        if name in ("seed", "gateway_default_attempts"):
            return int(text)
        if name in _BOOL_FIELDS:
            if text.lower() not in _BOOL_TEXT:
                raise ValueError(name)
            return _BOOL_TEXT[text.lower()]
        if name == "error_statuses":
            return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{name}: cannot parse {raw!r}") from None
    if name in ("limit_window", "provider"):
        return text.lower()
    return raw


_BOOL_TEXT = {"1": True, "true": True, "yes": True, "on": True}
_BOOL_TEXT.update({"0": False, "false": False, "no": False, "off": False})


def config_from_env(environ: Mapping[str, str] | None = None) -> SimConfig:
    """Build a SimConfig from CHATJOBS_SIM_* variables; unset or empty means the default."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for name in _FIELD_NAMES:
        var = ENV_PREFIX + name.upper()
        raw = env.get(var)
        if raw is None or not raw.strip():
            continue
        try:
            values[name] = _coerce_field(name, _parse_text(name, raw))
        except ValueError as exc:
            raise ValueError(f"{var}={raw!r} is invalid: {exc}") from None
    return SimConfig(**values)


def _arg_type(name: str) -> Callable[[str], object]:
    def parse(raw: str) -> object:
        try:
            return _coerce_field(name, _parse_text(name, raw))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    # argparse quotes the converter's name in its error messages.
    parse.__name__ = name
    return parse


_ARG_HELP = {
    "latency": "seconds before answering (streams: before the first chunk)",
    "jitter": "extra uniform 0..JITTER seconds of latency",
    "rpm": "requests per minute limit (0 = unlimited)",
    "tpm": "tokens per minute limit (0 = unlimited)",
    "limit_window": "'minute': 60 s sliding window; 'second': rpm/60 and tpm/60 per calendar "
    "second; 'sliding': rpm/60 and tpm/60 in every sliding 1 s interval",
    "error_rate": "fraction of requests answered with a 5xx",
    "error_statuses": "comma-separated statuses injected errors are drawn from",
    "timeout_rate": "fraction of requests that hang for --hang-seconds",
    "hang_seconds": "how long a hanging request sleeps before answering",
    "malformed_rate": "fraction of requests answered 200 with invalid JSON",
    "context_window": "reject prompt + requested output above this many tokens",
    "api_key": "require 'Authorization: Bearer API_KEY'",
    "stream_chunk_delay": "seconds between streamed chunks",
    "seed": "seed of content and fault randomness",
    "provider": "serve only this provider's paths (others 404); 'all' serves every shape",
    "gateway_cache": "AI Gateway caches every request, as if cf-aig-cache-ttl were sent",
    "gateway_default_attempts": "attempts the AI Gateway makes when cf-aig-max-attempts is absent",
    "gateway_token": "AI Gateway is authenticated: require 'cf-aig-authorization: Bearer TOKEN'",
    "native_usage": "Workers AI native answers carry result.usage (false: omit it)",
    "anthropic_batch_delay": "seconds before an Anthropic Message Batch is processed",
    "anthropic_batch_expire": "Anthropic Message Batches processed now expire every request",
}


def add_arguments(parser: argparse.ArgumentParser, *, server_options: bool = False) -> None:
    """Add --latency, --rpm, ... (one flag per SimConfig field) to an argparse parser."""
    if server_options:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8100)
    for name in _FIELD_NAMES:
        kwargs: dict[str, Any] = {
            "dest": name,
            "type": _arg_type(name),
            # Absent flags leave no attribute, so config_from_args falls back to the env.
            "default": argparse.SUPPRESS,
            "help": _ARG_HELP.get(name, "") + f" (env {ENV_PREFIX}{name.upper()})",
        }
        if name == "limit_window":
            kwargs["choices"] = LIMIT_WINDOWS
        if name == "provider":
            kwargs["choices"] = PROVIDER_CHOICES
        parser.add_argument("--" + name.replace("_", "-"), **kwargs)


def config_from_args(ns: argparse.Namespace, base: SimConfig | None = None) -> SimConfig:
    """SimConfig from parsed add_arguments flags, layered over `base` (default: the env)."""
    config = config_from_env() if base is None else base
    given = {name: getattr(ns, name) for name in _FIELD_NAMES if hasattr(ns, name)}
    return dataclasses.replace(config, **given)


# --------------------------------------------------------------------------------------------
# Tokens and content


# Every model the simulator serves uses o200k_base; counting like chatjobs.tokens does lets a
# test assert that chatjobs never sends a call the simulator would find over the window.
SIM_ENCODING = "o200k_base"
_SIM_SPEC = lookup_model(DEFAULT_MODEL)


def count_text_tokens(text: str) -> int:
    """Tokens of text in o200k_base, exactly as chatjobs.tokens.count_text counts them."""
    return count_text(text, SIM_ENCODING)


def count_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens as chatjobs.tokens.count_messages counts them for gpt-4.1 (o200k_base)."""
    return count_messages(messages, _SIM_SPEC).tokens


def _content_digest(messages: list[Any], model: str, seed: int) -> bytes:
    canonical = json.dumps([messages, model, seed], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).digest()


def _word_bytes(digest: bytes) -> bytes:
    # 64 bytes so a 57-word reply does not visibly repeat the digest's 32-byte cycle.
    return digest + hashlib.sha256(digest).digest()


def _render_reply(digest: bytes, words: int, json_mode: bool) -> str:
    pool = _word_bytes(digest)
    picked = " ".join(_VOCAB[pool[i % len(pool)] % len(_VOCAB)] for i in range(words))
    text = f"Simulated reply {digest.hex()[:8]}: {picked}."
    return json.dumps({"reply": text}) if json_mode else text


def _reply_content(digest: bytes, target: int, json_mode: bool) -> str:
    """Content whose count_text_tokens is `target` (or as close as the counting rule allows)."""
    words = max(0, target - (10 if json_mode else 7))
    text = _render_reply(digest, words, json_mode)
    # Only adjusts anything if count_text_tokens changes; with the placeholder rule it's exact.
    while count_text_tokens(text) < target:
        words += 1
        text = _render_reply(digest, words, json_mode)
    while words > 0 and count_text_tokens(text) > target:
        words -= 1
        text = _render_reply(digest, words, json_mode)
    return text


def _truncate_to_tokens(text: str, limit: int) -> str:
    """Longest prefix of text within `limit` tokens, as a model cut off by max_tokens would be."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_text_tokens(text[:mid]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def _sample_value(schema: object, depth: int = 0) -> Any:
    """A deterministic value that satisfies a (simple) JSON schema."""
    if not isinstance(schema, dict) or depth > 4:
        return None
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "string":
        return "sim"
    if kind == "integer":
        return 1
    if kind == "number":
        return 1.5
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "object" or "properties" in schema:
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        required = schema.get("required")
        names = required if isinstance(required, list) else list(properties)
        return {
            str(key): _sample_value(properties.get(key), depth + 1)
            for key in names
            if key in properties
        }
    return None


# --------------------------------------------------------------------------------------------
# Errors and helpers


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _error_body(
    message: str, type_: str | None, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> Response:
    merged = {"x-request-id": _request_id()}
    if headers:
        merged.update(headers)
    return Response(_dumps(data), status, merged, media_type="application/json")


def _error_response(
    status: int,
    message: str,
    type_: str | None,
    param: str | None = None,
    code: str | None = None,
) -> Response:
    return _json_response(_error_body(message, type_, param, code), status)


def _request_id() -> str:
    return "req_" + uuid.uuid4().hex


def _invalid(message: str, param: str | None = None, code: str | None = None) -> Response:
    return _error_response(400, message, "invalid_request_error", param, code)


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".")


def _fmt_duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: '250ms', '1s', '17.28s', '1m30s'."""
    ms = math.ceil(max(0.0, seconds) * 1000)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = _seconds_text(rest / 1000)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _header_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_STATUS_ERRORS: dict[int, tuple[str, str | None, str | None]] = {
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to access this resource.", "invalid_request_error", None),
    404: ("The model does not exist.", "invalid_request_error", "model_not_found"),
    429: ("Rate limit reached for requests (simulated).", "requests", "rate_limit_exceeded"),
}
_QUOTA_MESSAGE = "You exceeded your current quota, please check your plan and billing details."


def _status_error(status: int, xsim: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI-shaped error body for a forced status, with x_sim's message/type/code/param."""
    type_: str | None
    code: str | None
    if status == 429 and xsim.get("code") == "insufficient_quota":
        message, type_, code = _QUOTA_MESSAGE, "insufficient_quota", "insufficient_quota"
    elif status >= 500:
        type_ = "overloaded_error" if status == 529 else "server_error"
        message, code = SERVER_ERROR_MESSAGE, None
    else:
        default = (f"Simulated error {status}.", "invalid_request_error", "invalid_request_error")
        message, type_, code = _STATUS_ERRORS.get(status, default)
    body = _error_body(message, type_, None, code)
    error = body["error"]
    for key in ("message", "type", "code", "param"):
        if key in xsim:
            error[key] = xsim[key]
    return body


# --------------------------------------------------------------------------------------------
# Rate limiting


@dataclass
class _Admission:
    allowed: bool
    headers: dict[str, str]
    kind: str = ""
    limit: int = 0
    used: int = 0
    requested: int = 0
    retry_after: float = 0.0
    too_large: bool = False


class _RateLimiter:
    """RPM/TPM admission, measured at arrival, in one of three ways (SimConfig.limit_window):

    - minute: at most rpm and tpm in any sliding 60 s window;
    - second: at most rpm/60 and tpm/60 in each calendar second (fixed 1 s buckets);
    - sliding: at most rpm/60 and tpm/60 in any sliding 1 s window (stricter than the buckets:
      a burst straddling a second's boundary is refused too).

    Per second, a limit below 60 still admits one request a second, and a request larger than a
    second's tokens may go alone (into an empty bucket or window), or it could never run.
    """

    WINDOW = 60.0
    SLIDING = 1.0

    def __init__(self) -> None:
        self._req_times: deque[float] = deque()
        self._tok_events: deque[tuple[float, int]] = deque()
        self._tok_used = 0
        self._bucket = -1
        self._bucket_requests = 0
        self._bucket_tokens = 0

    def admit(self, cfg: SimConfig, now: float, cost: int) -> _Admission:
        if cfg.limit_window == "second":
            return self._admit_second(cfg, now, cost)
        return self._admit_window(cfg, now, cost)

    def _window(self, cfg: SimConfig) -> tuple[float, int | None, int | None]:
        """The sliding window's length and its request and token limits."""
        if cfg.limit_window == "sliding":
            return self.SLIDING, _per_second(cfg.rpm), _per_second(cfg.tpm)
        return self.WINDOW, cfg.rpm, cfg.tpm

    def _admit_window(self, cfg: SimConfig, now: float, cost: int) -> _Admission:
        window, rpm, tpm = self._window(cfg)
        horizon = now - window
        times, events = self._req_times, self._tok_events
        while times and times[0] <= horizon:
            times.popleft()
        while events and events[0][0] <= horizon:
            self._tok_used -= events.popleft()[1]
        if rpm is not None and len(times) >= rpm:
            # The window can hold more than rpm after a live config change: wait for the excess.
            wait = times[len(times) - rpm] + window - now
            return self._reject(cfg, now, "requests", rpm, len(times), 1, wait)
        if tpm is not None and self._tok_used + cost > tpm:
            if cost > tpm and window == self.WINDOW:
                # Can never fit; like OpenAI's "Request too large" it is still a 429.
                return self._reject(cfg, now, "tokens", tpm, self._tok_used, cost, window, True)
            # Per second, a request larger than the window's tokens may go alone.
            if self._tok_used:
                need, freed = self._tok_used + cost - tpm, 0
                wait = events[-1][0] + window - now  # the window is empty by then
                for stamp, tokens in events:
                    freed += tokens
                    if freed >= need:
                        wait = stamp + window - now
                        break
                return self._reject(cfg, now, "tokens", tpm, self._tok_used, cost, wait)
        if rpm is not None:
            times.append(now)
        if tpm is not None:
            events.append((now, cost))
            self._tok_used += cost
        return _Admission(True, self._window_headers(cfg, now))

    def _window_headers(self, cfg: SimConfig, now: float) -> dict[str, str]:
        window, rpm, tpm = self._window(cfg)
        headers: dict[str, str] = {}
        if rpm is not None:
            times = self._req_times
            # Reset = when the remaining count next goes up (the oldest counted request expires).
            idx = max(0, len(times) - rpm)
            reset = times[idx] + window - now if times else 0.0
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - len(times)))
            headers["x-ratelimit-reset-requests"] = _fmt_duration(reset)
        if tpm is not None:
            events = self._tok_events
            reset = events[0][0] + window - now if events else 0.0
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - self._tok_used))
            headers["x-ratelimit-reset-tokens"] = _fmt_duration(reset)
        return headers

    def _admit_second(self, cfg: SimConfig, now: float, cost: int) -> _Admission:
        bucket = math.floor(now)
        if bucket != self._bucket:
            self._bucket, self._bucket_requests, self._bucket_tokens = bucket, 0, 0
        wait = bucket + 1 - now
        rpm, tpm = _per_second(cfg.rpm), _per_second(cfg.tpm)
        if rpm is not None and self._bucket_requests >= rpm:
            return self._reject(cfg, now, "requests", rpm, self._bucket_requests, 1, wait)
        # A request bigger than a whole second's budget may take an empty bucket; otherwise
        # it could never run at all under per-second enforcement.
        if tpm is not None and self._bucket_tokens and self._bucket_tokens + cost > tpm:
            return self._reject(cfg, now, "tokens", tpm, self._bucket_tokens, cost, wait)
        self._bucket_requests += 1
        self._bucket_tokens += cost
        return _Admission(True, self._second_headers(cfg, now))

    def _second_headers(self, cfg: SimConfig, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        reset = _fmt_duration(self._bucket + 1 - now)
        rpm, tpm = _per_second(cfg.rpm), _per_second(cfg.tpm)
        if rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - self._bucket_requests))
            headers["x-ratelimit-reset-requests"] = reset
        if tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - self._bucket_tokens))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers

    def _reject(
        self,
        cfg: SimConfig,
        now: float,
        kind: str,
        limit: int,
        used: int,
        requested: int,
        wait: float,
        too_large: bool = False,
    ) -> _Admission:
        if cfg.limit_window == "second":
            headers = self._second_headers(cfg, now)
        else:
            headers = self._window_headers(cfg, now)
        return _Admission(False, headers, kind, limit, used, requested, max(wait, 0.001), too_large)


def _per_second(limit: int | None) -> int | None:
    """A per-minute limit enforced per second: limit/60, at least 1."""
    return None if limit is None else max(1, limit // 60)


# --------------------------------------------------------------------------------------------
# Requests


@dataclass
class _ChatRequest:
    model: str
    messages: list[dict[str, Any]]
    n: int
    stream: bool
    include_usage: bool
    max_out: int | None
    tool: dict[str, Any] | None
    json_mode: bool
    xsim: dict[str, Any]


def _optional_int(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _BadRequest(
            f"Invalid '{key}': expected an integer between {low} and {high}, got {value!r}.",
            key,
            "invalid_value",
        )
    return value


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


_XSIM_NUMBERS = ("latency", "retry_after", "retry_after_ms")


def _parse_xsim(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _BadRequest("Invalid 'x_sim': expected an object.", "x_sim")
    for key in _XSIM_NUMBERS:
        number = value.get(key)
        if number is not None and (
            isinstance(number, bool) or not isinstance(number, int | float) or number < 0
        ):
            raise _BadRequest(f"Invalid 'x_sim.{key}': expected a number >= 0.", "x_sim")
    status = value.get("status")
    if status is not None and (
        isinstance(status, bool)
        or not isinstance(status, int)
        or not (status == 200 or 400 <= status <= 599)
    ):
        raise _BadRequest("Invalid 'x_sim.status': expected an HTTP status.", "x_sim")
    for key in ("fail_times", "slow_times"):
        times = value.get(key)
        if times is not None and (
            isinstance(times, bool) or not isinstance(times, int) or times < 0
        ):
            raise _BadRequest(f"Invalid 'x_sim.{key}': expected an integer >= 0.", "x_sim")
    hang = value.get("hang")
    if hang is not None and not isinstance(hang, bool | int | float):
        raise _BadRequest("Invalid 'x_sim.hang': expected a boolean or seconds.", "x_sim")
    cf_code = value.get("cf_code")
    if cf_code is not None and (isinstance(cf_code, bool) or not isinstance(cf_code, int)):
        raise _BadRequest("Invalid 'x_sim.cf_code': expected an integer.", "x_sim")
    for key in ("content_filter", "omit_usage"):
        if value.get(key) is not None and not isinstance(value.get(key), bool):
            raise _BadRequest(f"Invalid 'x_sim.{key}': expected a boolean.", "x_sim")
    return value


def _find_tool(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """The function to call when tool_choice forces one, else None (plain content)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none", "auto"):
            raise _BadRequest(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
                "are specified.",
                "tool_choice",
            )
        return None
    if not isinstance(tools, list) or not tools:
        raise _BadRequest("Invalid 'tools': expected a non-empty array.", "tools", "invalid_value")
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _BadRequest(
                f"Missing required parameter: 'tools[{i}].function.name'.",
                f"tools[{i}].function.name",
                "missing_required_parameter",
            )
        functions.append(fn)
    if choice == "required":
        return functions[0]
    if isinstance(choice, dict) and choice.get("type") == "function":
        wanted = choice.get("function")
        name = wanted.get("name") if isinstance(wanted, dict) else None
        for fn in functions:
            if fn["name"] == name:
                return fn
        raise _BadRequest(
            f"Invalid value for 'tool_choice': function {name!r} is not among 'tools'.",
            "tool_choice",
            "invalid_value",
        )
    return None


def _parse_request(body: object) -> _ChatRequest:
    if not isinstance(body, dict):
        raise _BadRequest("Invalid request body: expected a JSON object.")
    messages = body.get("messages")
    if messages is None:
        raise _BadRequest(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    if not isinstance(messages, list):
        raise _BadRequest("Invalid 'messages': expected an array.", "messages", "invalid_type")
    if not messages:
        raise _BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got "
            "an empty array instead.",
            "messages",
            "empty_array",
        )
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRequest(
                f"Invalid type for 'messages[{i}]': expected an object.",
                f"messages[{i}]",
                "invalid_type",
            )
        role = message.get("role")
        if role not in _ROLES:
            raise _BadRequest(
                f"Invalid value for 'messages[{i}].role': {role!r}. Supported values are: "
                + ", ".join(f"'{r}'" for r in sorted(_ROLES))
                + ".",
                f"messages[{i}].role",
                "invalid_value",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _BadRequest(
                f"Invalid type for 'messages[{i}].content': expected a string or an array.",
                f"messages[{i}].content",
                "invalid_type",
            )
    model = body.get("model", DEFAULT_MODEL)
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, str) or not model:
        raise _BadRequest("Invalid 'model': expected a non-empty string.", "model", "invalid_type")
    n = _optional_int(body, "n", 1, 128) or 1
    max_out = _optional_int(body, "max_completion_tokens", 1, 10**9) or _optional_int(
        body, "max_tokens", 1, 10**9
    )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _BadRequest("Invalid 'stream': expected a boolean.", "stream", "invalid_type")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    response_format = body.get("response_format")
    json_mode = isinstance(response_format, dict) and response_format.get("type") in (
        "json_object",
        "json_schema",
    )
    return _ChatRequest(
        model=model,
        messages=messages,
        n=n,
        stream=bool(stream),
        include_usage=include_usage,
        max_out=max_out,
        tool=_find_tool(body),
        json_mode=json_mode,
        xsim=_parse_xsim(body.get("x_sim")),
    )


def _body_field(call: dict[str, Any], name: str) -> Any:
    body = call.get("body")
    return body.get(name, "") if isinstance(body, dict) else ""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _sleep_unless_disconnected(receive: Receive, seconds: float) -> bool:
    """Sleep for `seconds`; return True early if the client disconnects meanwhile."""
    # A hung request must not outlive its client: in_flight and memory would stay inflated.
    watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        done, _ = await asyncio.wait((watcher,), timeout=seconds)
    finally:
        if not watcher.done():
            watcher.cancel()
    if not done:
        return False
    if not watcher.cancelled() and watcher.exception() is not None:
        logger.debug("receive failed while sleeping; treating as disconnect", exc_info=True)
    return True


class _PacedStream(StreamingResponse):
    """StreamingResponse that paces pre-built SSE chunks."""

    def __init__(self, chunks: list[bytes], delay: float, headers: Mapping[str, str]) -> None:
        super().__init__(self._pace(chunks, delay), headers=headers, media_type="text/event-stream")

    @staticmethod
    async def _pace(chunks: list[bytes], delay: float) -> AsyncIterator[bytes]:
        for i, chunk in enumerate(chunks):
            if i and delay > 0:
                await asyncio.sleep(delay)
            yield chunk


@dataclass
class _Stats:
    requests: int = 0
    succeeded: int = 0
    rate_limited: int = 0
    errors: int = 0
    client_errors: int = 0
    malformed: int = 0
    hung: int = 0
    disconnected: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Call:
    """What the handler learns about one request, for the stats and the call log."""

    __slots__ = (
        "body",
        "completion_tokens",
        "malformed",
        "prompt_tokens",
        "request_id",
        "seen",
        "shape",
        "xsim",
    )

    def __init__(self, request_id: str, shape: str = prov.SHAPE_OPENAI) -> None:
        self.request_id = request_id
        self.shape = shape
        # What a provider path received (path, headers, cache status...), for the call log.
        self.seen: dict[str, Any] = {}
        # A dict even for a request whose client left before its body was read, so call-log
        # consumers can always do `body.get(...)`.
        self.body: dict[str, Any] = {}
        self.xsim: dict[str, Any] = {}
        self.malformed = False
        self.prompt_tokens = 0
        self.completion_tokens = 0


class _CompletionsEndpoint:
    # A class instance, not a function, so Starlette's Route treats it as a raw ASGI app and
    # the in-flight accounting can span the whole response, streaming included.
    def __init__(self, sim: Simulator, shape: str = prov.SHAPE_OPENAI) -> None:
        self.sim = sim
        self.shape = shape

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        allowed = self.sim.config.provider
        if allowed not in (prov.ALL, prov.SHAPE_PROVIDER[self.shape]):
            path = scope.get("path", "")
            message = f"Invalid URL (POST {path}): this simulator serves only {allowed!r}."
            response = _error_response(404, message, "invalid_request_error")
            await response(scope, receive, send)
            return
        await self.sim.handle_completion(scope, receive, send, self.shape)


class Simulator:
    """Live state of one simulator app: config, rate limiter, fault RNGs, counters, call log."""

    def __init__(self, config: SimConfig, clock: Callable[[], float] | None = None) -> None:
        self.initial_config = dataclasses.replace(config)
        self.config = dataclasses.replace(config)
        self.clock = clock or time.monotonic
        self.stats = _Stats()
        self.calls: deque[dict[str, Any]] = deque(maxlen=CALLS_MAXLEN)
        self.limiter = _RateLimiter()
        self.fail_counts: dict[str, int] = {}
        # The simulated AI Gateway's cache: key -> stored answer.
        self.gateway_cache: dict[str, prov.CachedAnswer] = {}
        self._reseed()

    def _reseed(self) -> None:
        seed = self.config.seed
        self._fault_rng = random.Random(seed)
        # Separate stream so turning jitter on does not change which requests fail.
        self._jitter_rng = random.Random(f"{seed}:jitter")

    def reset(self, restore_config: bool = False) -> None:
        """Forget stats, calls, limiter state and x_sim counters (and optionally the config)."""
        if restore_config:
            self.config = dataclasses.replace(self.initial_config)
        in_flight = self.stats.in_flight
        self.stats = _Stats(in_flight=in_flight, max_in_flight=in_flight)
        self.calls.clear()
        self.limiter = _RateLimiter()
        self.fail_counts.clear()
        self.gateway_cache.clear()
        self._reseed()

    def update_config(self, changes: Mapping[str, Any]) -> SimConfig:
        """Apply a partial config; ValueError on unknown fields or bad values."""
        unknown = sorted(set(changes) - set(_FIELD_NAMES))
        if unknown:
            raise ValueError(f"unknown simulator setting(s): {', '.join(unknown)}")
        self.config = dataclasses.replace(self.config, **changes)
        if "seed" in changes:
            self._reseed()
        return self.config

    def stats_dict(self) -> dict[str, int]:
        """Counters as served by GET /_sim/stats."""
        return dataclasses.asdict(self.stats)

    def recent_calls(
        self, limit: int = DEFAULT_CALLS_LIMIT, x_test: str | None = None
    ) -> list[dict[str, Any]]:
        """The last `limit` logged calls, ordered by arrival time; with `x_test`, only those
        whose body's `x_test` starts with it (a test's own calls, without the session's)."""
        calls: Any = self.calls
        if x_test is not None:
            calls = [c for c in calls if str(_body_field(c, "x_test")).startswith(x_test)]
        start = max(0, len(calls) - limit)
        recent = list(itertools.islice(calls, start, None)) if limit > 0 else []
        recent.sort(key=lambda call: call["t"])
        return recent

    async def handle_completion(
        self, scope: Scope, receive: Receive, send: Send, shape: str = prov.SHAPE_OPENAI
    ) -> None:
        """ASGI handler of POST /v1/chat/completions and the provider paths (`shape`)."""
        arrival = time.time()
        call = _Call(_request_id(), shape)
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        status = 500
        try:
            try:
                response = await self._complete(scope, receive, call)
            except Exception:
                logger.exception("simulator failed to handle a request")
                response = _json_response(
                    _error_body(SERVER_ERROR_MESSAGE, "server_error"),
                    500,
                )
            if response is None:
                status = CLIENT_CLOSED
                return
            # One id per call, shared by the header and the call log.
            response.headers["x-request-id"] = call.request_id
            if response.status_code >= 400 and call.xsim:
                self._xsim_retry_headers(response, call.xsim)
            status = response.status_code
            await response(scope, receive, send)
        finally:
            # reset() carries in_flight over to the new stats, so the live object is decremented;
            # the outcome belongs to the pre-reset era, though, and is dropped with it.
            self.stats.in_flight = max(0, self.stats.in_flight - 1)
            if self.stats is stats:
                self._account(status, call)
                entry = {
                    "t": arrival,
                    "status": status,
                    "body": call.body,
                    "request_id": call.request_id,
                }
                entry.update(call.seen)
                self.calls.append(entry)

    @staticmethod
    def _xsim_retry_headers(response: Response, xsim: Mapping[str, Any]) -> None:
        if xsim.get("retry_after") is not None:
            response.headers["retry-after"] = _header_number(xsim["retry_after"])
        if xsim.get("retry_after_ms") is not None:
            response.headers["retry-after-ms"] = _header_number(xsim["retry_after_ms"])

    def _account(self, status: int, call: _Call) -> None:
        stats = self.stats
        if call.malformed:
            stats.malformed += 1
        elif status == 200:
            stats.succeeded += 1
            stats.prompt_tokens += call.prompt_tokens
            stats.completion_tokens += call.completion_tokens
        elif status == 429:
            stats.rate_limited += 1
        elif status == CLIENT_CLOSED:
            stats.disconnected += 1
        elif status >= 500:
            stats.errors += 1
        else:
            stats.client_errors += 1

    async def _complete(self, scope: Scope, receive: Receive, call: _Call) -> Response | None:
        request = Request(scope, receive)
        try:
            raw = await request.body()
        except ClientDisconnect:
            return None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
            parse_failed = True
        else:
            parse_failed = False
        # Always a dict, so call-log consumers can do `body.get(...)` without type checks.
        call.body = body if isinstance(body, dict) else {"_raw": raw.decode("utf-8", "replace")}
        if call.shape == prov.SHAPE_OPENAI:
            return await self._attempt(request, receive, raw, body, parse_failed, call)
        return await self._provider_complete(request, receive, raw, body, parse_failed, call)

    async def _provider_complete(
        self,
        request: Request,
        receive: Receive,
        raw: bytes,
        body: object,
        parse_failed: bool,
        call: _Call,
    ) -> Response | None:
        """A provider path: its auth and query checks, the gateway, Cloudflare's error shape."""
        call.seen = prov.describe_request(
            call.shape, request.url.path, request.headers, request.query_params
        )
        denied = self._provider_denied(request, call.shape)
        if denied is not None:
            return denied
        if call.shape in prov.GATEWAY_SHAPES:
            response = await self._gateway(request, receive, raw, body, parse_failed, call)
        else:
            response = await self._attempt(request, receive, raw, body, parse_failed, call)
        if response is None or response.status_code < 400:
            return response
        if call.shape in prov.CF_ERROR_SHAPES and not isinstance(response, StreamingResponse):
            headers = {
                k: v
                for k, v in response.headers.items()
                if k not in ("content-length", "content-type")
            }
            cf_body = prov.to_cf_error(
                response.status_code, bytes(response.body), call.xsim.get("cf_code")
            )
            return _json_response(cf_body, response.status_code, headers)
        return response

    def _provider_denied(self, request: Request, shape: str) -> Response | None:
        """401/404 for a provider request missing its key, token or api-version."""
        cfg = self.config
        headers = request.headers
        token_given = headers.get("cf-aig-authorization", "").strip()
        if (
            shape in prov.GATEWAY_SHAPES
            and cfg.gateway_token is not None
            and token_given != f"Bearer {cfg.gateway_token}"
        ):
            body = prov.cf_error_body(prov.GATEWAY_AUTH_CODE, "Unauthorized")
            return _json_response(body, 401)
        if shape in prov.CF_ERROR_SHAPES:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            token = token.strip()
            if (
                scheme.lower() != "bearer"
                or not token
                or (cfg.api_key is not None and token != cfg.api_key)
            ):
                body = prov.cf_error_body(prov.CF_AUTH_CODE, "Authentication error")
                return _json_response(body, 401)
        if shape == prov.SHAPE_AZURE:
            if not request.query_params.get("api-version"):
                return _json_response(prov.azure_error("404", "Resource not found"), 404)
            key = headers.get("api-key")
            if not key or (cfg.api_key is not None and key != cfg.api_key):
                return _json_response(prov.azure_error("401", prov.AZURE_ACCESS_DENIED), 401)
        return None

    async def _gateway(
        self,
        request: Request,
        receive: Receive,
        raw: bytes,
        body: object,
        parse_failed: bool,
        call: _Call,
    ) -> Response | None:
        """AI Gateway in front of an attempt: its cache, and its own retries of a failed one."""
        cfg = self.config
        opts = prov.gateway_options(request.headers)
        use_cache = not opts.skip_cache and (
            opts.cache_ttl is not None or bool(opts.cache_key) or cfg.gateway_cache
        )
        key = prov.cache_key(request.url.path, opts.cache_key, raw) if use_cache else None
        call.seen["cache_status"] = "MISS" if use_cache else "SKIP"
        stored = self.gateway_cache.get(key) if key else None
        if stored is not None and stored.expires > self.clock():
            # Answered from the cache: the upstream sees nothing, so no limits and no tokens.
            call.seen.update(cache_status="HIT", gateway_attempts=0, cached=True)
            headers = {"cf-aig-cache-status": "HIT", "x-sim-gateway-attempts": "0"}
            return Response(stored.body, 200, headers, media_type=stored.media_type)
        allowed = opts.max_attempts or cfg.gateway_default_attempts
        attempts = 0
        while True:
            attempts += 1
            response = await self._attempt(request, receive, raw, body, parse_failed, call)
            if (
                response is None
                or attempts >= allowed
                or not prov.gateway_retryable(response.status_code)
            ):
                break
        call.seen["gateway_attempts"] = attempts
        if response is None:
            return None
        response.headers["x-sim-gateway-attempts"] = str(attempts)
        response.headers["cf-aig-cache-status"] = "MISS"
        cacheable = response.status_code == 200 and not call.malformed
        if key and cacheable and not isinstance(response, StreamingResponse):
            ttl = opts.cache_ttl if opts.cache_ttl is not None else prov.GATEWAY_DEFAULT_TTL
            self.gateway_cache[key] = prov.CachedAnswer(
                expires=self.clock() + ttl,
                body=bytes(response.body),
                media_type=response.media_type or "application/json",
                prompt_tokens=call.prompt_tokens,
                completion_tokens=call.completion_tokens,
            )
        return response

    async def _attempt(
        self,
        request: Request,
        receive: Receive,
        raw: bytes,
        body: object,
        parse_failed: bool,
        call: _Call,
    ) -> Response | None:
        """One upstream attempt at an already-read request body."""
        cfg = self.config
        if cfg.api_key is not None and call.shape in (prov.SHAPE_OPENAI, prov.SHAPE_GW_OPENAI):
            denied = self._check_auth(request.headers.get("authorization"), cfg.api_key)
            if denied is not None:
                return denied
        if isinstance(body, dict):
            # The path names the model on the native and Azure paths; the body's is ignored.
            path_model = request.path_params.get("model") or request.path_params.get("deployment")
            if path_model:
                body = {**body, "model": path_model}
        if parse_failed:
            return _invalid(
                "We could not parse the JSON body of your request. (HINT: This likely means you "
                "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)"
            )
        try:
            req = _parse_request(body)
        except _BadRequest as exc:
            return _invalid(exc.message, exc.param, exc.code)
        call.xsim = req.xsim

        if len(raw) > _INLINE_COUNT_BYTES:
            # Counting megabytes of text takes long enough to stall every other request on
            # this event loop; tiktoken releases the GIL, so a thread keeps them moving.
            prompt_tokens = await asyncio.to_thread(count_prompt_tokens, req.messages)
        else:
            prompt_tokens = count_prompt_tokens(req.messages)
        requested_out = req.max_out or 0
        window = cfg.context_window
        if window is not None and prompt_tokens + requested_out > window:
            return _invalid(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_tokens + requested_out} tokens ({prompt_tokens} in the messages, "
                f"{requested_out} in the completion). Please reduce the length of the messages "
                "or completion.",
                "messages",
                "context_length_exceeded",
            )

        limit_headers: dict[str, str] = {}
        if cfg.rpm is not None or cfg.tpm is not None:
            admission = self.limiter.admit(cfg, self.clock(), prompt_tokens + requested_out)
            limit_headers = admission.headers
            if not admission.allowed:
                return self._rate_limited(admission, req.model)

        digest = _content_digest(req.messages, req.model, cfg.seed)
        xsim = req.xsim
        roll = self._fault_rng.random()
        forced = self._forced_status(xsim, digest)
        hang: float = 0.0
        malformed = bool(xsim.get("malformed"))
        if forced is None:
            if roll < cfg.error_rate:
                forced = self._fault_rng.choice(cfg.error_statuses)
            elif roll < cfg.error_rate + cfg.timeout_rate:
                hang = cfg.hang_seconds
            elif roll < cfg.error_rate + cfg.timeout_rate + cfg.malformed_rate:
                malformed = True
        xsim_hang = xsim.get("hang")
        if xsim_hang is True:
            hang = cfg.hang_seconds
        elif xsim_hang and not isinstance(xsim_hang, bool):
            hang = float(xsim_hang)

        if xsim.get("latency") is not None and self._still_slow(xsim, digest):
            delay = float(xsim["latency"])
        else:
            delay = cfg.latency
            if cfg.jitter > 0:
                delay += self._jitter_rng.uniform(0.0, cfg.jitter)
        if hang:
            self.stats.hung += 1
            delay += hang
        if delay > 0 and await _sleep_unless_disconnected(receive, delay):
            return None

        if forced is not None:
            return _json_response(_status_error(forced, xsim), forced, limit_headers)
        if xsim.get("content_filter") and call.shape == prov.SHAPE_AZURE:
            return _json_response(prov.azure_content_filter(), 400, limit_headers)
        if malformed:
            call.malformed = True
            return Response(MALFORMED_BODY, 200, limit_headers, media_type="application/json")
        return self._answer(req, digest, prompt_tokens, call, limit_headers)

    @staticmethod
    def _check_auth(header: str | None, api_key: str) -> Response | None:
        if not header:
            return _error_response(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
            )
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token.strip() == api_key:
            return None
        shown = token.strip()
        masked = f"{shown[:3]}***{shown[-4:]}" if len(shown) > 8 else "***"
        return _error_response(
            401,
            f"Incorrect API key provided: {masked}.",
            "invalid_request_error",
            None,
            "invalid_api_key",
        )

    def _still_slow(self, xsim: Mapping[str, Any], digest: bytes) -> bool:
        """x_sim.latency applies to every call, or with slow_times only to the first k."""
        limit = xsim.get("slow_times")
        if limit is None:
            return True
        key = "slow:" + str(xsim.get("key") or digest.hex())
        seen = self.fail_counts.get(key, 0)
        self.fail_counts[key] = seen + 1
        return bool(seen < int(limit))

    def _forced_status(self, xsim: Mapping[str, Any], digest: bytes) -> int | None:
        status = xsim.get("status")
        if xsim.get("cf_code") is not None:
            status = prov.cf_status(int(xsim["cf_code"]))
        if "fail_times" in xsim and xsim["fail_times"] is not None:
            key = str(xsim.get("key") or digest.hex())
            seen = self.fail_counts.get(key, 0)
            if seen >= xsim["fail_times"]:
                return None
            self.fail_counts[key] = seen + 1
            return int(status) if status is not None and status != 200 else 503
        if status is None or status == 200:
            return None
        return int(status)

    def _rate_limited(self, admission: _Admission, model: str) -> Response:
        cfg = self.config
        per = "min" if cfg.limit_window == "minute" else "sec"
        unit = f"{admission.kind} per {per} ({'R' if admission.kind == 'requests' else 'T'}"
        unit += "PS)" if per == "sec" else "PM)"
        if admission.too_large:
            message = (
                f"Request too large for {model} in organization org-sim on {unit}: "
                f"Limit {admission.limit}, Requested {admission.requested}. The input or output "
                "tokens must be reduced in order to run successfully."
            )
        else:
            message = (
                f"Rate limit reached for {unit} on {model} in organization org-sim: "
                f"Limit {admission.limit}, Used {admission.used}, Requested "
                f"{admission.requested}. Please try again in "
                f"{_seconds_text(math.ceil(admission.retry_after * 1000) / 1000)}s."
            )
        headers = dict(admission.headers)
        headers["retry-after"] = str(max(1, math.ceil(admission.retry_after)))
        headers["retry-after-ms"] = str(max(1, math.ceil(admission.retry_after * 1000)))
        body = _error_body(message, admission.kind, None, "rate_limit_exceeded")
        return _json_response(body, 429, headers)

    def _answer(
        self,
        req: _ChatRequest,
        digest: bytes,
        prompt_tokens: int,
        call: _Call,
        limit_headers: Mapping[str, str],
    ) -> Response:
        finish_reason = "stop"
        tool_call: dict[str, Any] | None = None
        content: str | None = None
        if req.tool is not None:
            name = req.tool["name"]
            arguments = json.dumps(
                _sample_value(req.tool.get("parameters") or {"type": "object"}) or {},
                separators=(",", ":"),
            )
            tool_call = {
                "id": "call_" + digest.hex()[8:32],
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            completion_tokens = count_text_tokens(name) + count_text_tokens(arguments)
            finish_reason = "tool_calls"
        else:
            target = 16 + int.from_bytes(digest[8:12], "big") % 49
            content = _reply_content(digest, target, req.json_mode)
            if req.max_out is not None and count_text_tokens(content) > req.max_out:
                content = _truncate_to_tokens(content, req.max_out)
                finish_reason = "length"
            completion_tokens = count_text_tokens(content)

        total_completion = completion_tokens * req.n
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": total_completion,
            "total_tokens": prompt_tokens + total_completion,
        }
        call.prompt_tokens, call.completion_tokens = prompt_tokens, total_completion
        if call.shape == prov.SHAPE_CF_NATIVE:
            return self._native_answer(req, content, tool_call, usage, limit_headers)
        completion_id = "chatcmpl-" + uuid.uuid4().hex[:24]
        created = int(time.time())
        headers = dict(limit_headers)
        if req.stream:
            chunks = _stream_chunks(
                completion_id, created, req, content, tool_call, finish_reason, usage
            )
            headers["cache-control"] = "no-cache"
            delay = self.config.stream_chunk_delay
            if delay <= 0:
                # Nothing to pace: one body write is much cheaper than a streaming response.
                return Response(b"".join(chunks), 200, headers, media_type="text/event-stream")
            return _PacedStream(chunks, delay, headers)

        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if tool_call is not None:
            message["tool_calls"] = [tool_call]
        choices = [
            {"index": i, "message": message, "logprobs": None, "finish_reason": finish_reason}
            for i in range(req.n)
        ]
        data = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": req.model,
            "system_fingerprint": "fp_sim",
            "choices": choices,
            "usage": usage,
        }
        return Response(_dumps(data), 200, headers, media_type="application/json")

    def _native_answer(
        self,
        req: _ChatRequest,
        content: str | None,
        tool_call: dict[str, Any] | None,
        usage: dict[str, int],
        limit_headers: Mapping[str, str],
    ) -> Response:
        """Workers AI's native envelope or stream (one choice; usage unless turned off)."""
        shown = None if not self.config.native_usage or req.xsim.get("omit_usage") else usage
        headers = dict(limit_headers)
        if not req.stream:
            body = prov.native_body(content, tool_call, shown)
            return Response(_dumps(body), 200, headers, media_type="application/json")
        chunks = prov.native_stream(_split_pieces(content or ""), tool_call, shown)
        headers["cache-control"] = "no-cache"
        delay = self.config.stream_chunk_delay
        if delay <= 0:
            return Response(b"".join(chunks), 200, headers, media_type="text/event-stream")
        return _PacedStream(chunks, delay, headers)


def _split_pieces(text: str, per_piece: int = 3) -> list[str]:
    """Split text into a few-words pieces whose concatenation is exactly text."""
    tokens = _PIECE_RE.findall(text)
    return ["".join(tokens[i : i + per_piece]) for i in range(0, len(tokens), per_piece)]


def _stream_chunks(
    completion_id: str,
    created: int,
    req: _ChatRequest,
    content: str | None,
    tool_call: dict[str, Any] | None,
    finish_reason: str,
    usage: dict[str, int],
) -> list[bytes]:
    def chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": "fp_sim",
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
        if req.include_usage:
            data["usage"] = None
        return b"data: " + _dumps(data) + b"\n\n"

    out: list[bytes] = []
    for index in range(req.n):
        if tool_call is not None:
            fn = tool_call["function"]
            head = {
                "index": 0,
                "id": tool_call["id"],
                "type": "function",
                "function": {"name": fn["name"], "arguments": ""},
            }
            out.append(chunk(index, {"role": "assistant", "content": None, "tool_calls": [head]}))
            arguments = fn["arguments"]
            for start in range(0, len(arguments), 8):
                fragment = {"index": 0, "function": {"arguments": arguments[start : start + 8]}}
                out.append(chunk(index, {"tool_calls": [fragment]}))
        else:
            out.append(chunk(index, {"role": "assistant", "content": ""}))
            out.extend(chunk(index, {"content": piece}) for piece in _split_pieces(content or ""))
        out.append(chunk(index, {}, finish_reason))
    if req.include_usage:
        final = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": req.model,
            "system_fingerprint": "fp_sim",
            "choices": [],
            "usage": usage,
        }
        out.append(b"data: " + _dumps(final) + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


# --------------------------------------------------------------------------------------------
# App


_INLINE_COUNT_BYTES = 64 * 1024


def create_app(
    config: SimConfig | None = None, *, clock: Callable[[], float] | None = None
) -> Starlette:
    """The simulator ASGI app; `clock` (monotonic seconds) lets tests drive the rate limiter."""
    # Load the encoding now, not on the first request (a third of a second).
    count_prompt_tokens([{"role": "user", "content": "warm"}])
    from chatjobs.simulator_anthropic import batch_routes  # it imports this module

    sim = Simulator(config or SimConfig(), clock)
    completions = _CompletionsEndpoint(sim)

    async def models(request: Request) -> Response:
        if sim.config.api_key is not None:
            denied = sim._check_auth(request.headers.get("authorization"), sim.config.api_key)
            if denied is not None:
                return denied
        data = [
            {"id": model, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
            for model in MODELS
        ]
        return _json_response({"object": "list", "data": data})

    async def healthz(request: Request) -> Response:
        return _json_response({"ok": True})

    async def stats(request: Request) -> Response:
        return _json_response(sim.stats_dict())

    async def calls(request: Request) -> Response:
        raw = request.query_params.get("limit", str(DEFAULT_CALLS_LIMIT))
        try:
            limit = int(raw)
        except ValueError:
            return _invalid(f"Invalid 'limit': {raw!r} is not an integer.", "limit")
        return _json_response(sim.recent_calls(limit, request.query_params.get("x_test")))

    async def reset(request: Request) -> Response:
        restore = request.query_params.get("config", "").lower() in ("1", "true", "yes")
        sim.reset(restore_config=restore)
        return _json_response({"ok": True, "config": sim.config.to_dict()})

    async def config_endpoint(request: Request) -> Response:
        if request.method == "POST":
            try:
                changes = json.loads(await request.body() or b"{}")
            except ValueError:
                return _invalid("Invalid JSON body.")
            if not isinstance(changes, dict):
                return _invalid("Expected a JSON object of simulator settings.")
            try:
                sim.update_config(changes)
            except (TypeError, ValueError) as exc:
                return _invalid(str(exc))
        return _json_response(sim.config.to_dict())

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        if status == 405:
            message = f"Method {request.method} not allowed on {request.url.path}."
        else:
            message = f"Invalid URL ({request.method} {request.url.path})"
        return _error_response(status, message, "invalid_request_error")

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", completions, methods=["POST"]),
            Route("/chat/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/models", models, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/_sim/stats", stats, methods=["GET"]),
            Route("/_sim/calls", calls, methods=["GET"]),
            Route("/_sim/reset", reset, methods=["POST"]),
            Route("/_sim/config", config_endpoint, methods=["GET", "POST"]),
            *(
                Route(path, _CompletionsEndpoint(sim, shape), methods=["POST"])
                for path, shape in prov.ROUTES
            ),
            *batch_routes(sim),
        ],
        exception_handlers={404: not_found, 405: not_found},
    )
    app.state.simulator = sim
    return app


def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8100) -> None:
    """Run the simulator with uvicorn until interrupted (blocking)."""
    uvicorn.run(
        create_app(config),
        host=host,
        port=port,
        log_level="warning",
        log_config=logs.config(logging.WARNING),
        access_log=False,
        # Benchmarks open thousands of connections at once and keep pools idle between phases.
        backlog=4096,
        timeout_keep_alive=65,
        lifespan="off",
        ws="none",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m chatjobs.simulator [--host H] [--port P] [--latency S] ...`."""
    parser = argparse.ArgumentParser(prog="python -m chatjobs.simulator", description=__doc__)
    add_arguments(parser, server_options=True)
    ns = parser.parse_args(argv)
    try:
        config = config_from_args(ns)
    except ValueError as exc:
        parser.error(str(exc))
    serve(config, ns.host, ns.port)


if __name__ == "__main__":
    main()
