"""A provider's rate limits, shared by every worker process through Redis.

Each limited dimension (requests, tokens) of a key is paced by GCRA (virtual scheduling) with
zero burst tolerance: calls are spaced evenly instead of letting a minute's allowance out at
once, because providers may enforce a per-minute limit in per-second slices. Every decision is
one Lua script, so it is atomic across processes and costs one round trip, and all time is Redis
`TIME`, so every process reads the same clock.

Why no window holds more than the limit
---------------------------------------
For one dimension let L be the limit per window W, h the headroom, and c_k the cost of call k
(1 for requests, its tokens for tokens). Pacing runs as if the window were W/h long, which is
the headroom: 0.98 stretches a minute by 1.2 s. The dimension keeps TAT (the end of the latest
reservation) and a *room* R: the size of call the pacing leaves space for. A call paced with
room R takes T(R) = W / (h (L - R)) per unit; T(0) = W / (h L) is the plain GCRA interval. Call
k is paced with a room R_k of the limiter's choosing (below), after the previous call was paced
with R_{k-1}:

    pre-wait  p_k = max(0, max(c_k - 1, R_k) - R_{k-1}) * T(R_{k-1})
    start     s_k >= TAT + p_k
    reserve   TAT = s_k + c_k * T(R_k)

Claim: calls that start within less than W/h of each other cost at most L together; so any
closed window of W holds at most L, even if each send is moved by up to W (1/h - 1) / 2
either way.
Proof: let calls j..k+1 start within E = s_{k+1} - s_j < W/h, S = c_j + ... + c_k, and suppose
S + c_{k+1} >= L + 1. Each reservation ends before the next call starts, so E is at least
sum(c_i T(R_i), i = j..k) + sum(p_i, i = j+1..k+1). Let m be the least R_i for i in j..k. Every
T(R_i) >= T(m); each rise of R is paid for by the pre-wait of the call that made it
(p_i >= (R_i - R_{i-1}) T(R_{i-1}) >= (R_i - R_{i-1}) T(m)), and the rises after the minimum add
up to at least R_k - m. So E / T(m) >= S + (R_k - m) + (c_{k+1} - 1 - R_k) = S + c_{k+1} - 1 - m
>= L - m, that is E >= W/h: a contradiction.

For requests c - 1 = 0, so R stays 0 and there is never a pre-wait: this is exactly GCRA with
T = W / (h * rpm) and zero tolerance, and the claim is the textbook bound (at most floor(W/T) + 1
= floor(h * rpm) + 1 <= rpm starts in a closed window of W). For tokens, plain zero-tolerance
GCRA would only promise h * tpm plus the largest call (a 30k TPM account pacing 1,024-token
reservations at 0.98 would let ~30.4k into a minute); the room makes the bound exact. R_k is the
largest of the call's own c_k - 1 and the *target*: the room asked for by the largest call of
the last window. So a call larger than any recent one waits once for its space, and the calls
after it are paced to leave that space instead of each waiting for it. A refused large call
leaves its target behind (and nothing else), so the calls granted meanwhile pay for the space
and a steady stream of small calls cannot starve it. R is capped at half the limit (larger calls
pre-wait the rest), so one huge call cannot slow everything else to a crawl.

A call costing more than L can never fit a window. Rather than waiting forever it is let through
once TAT catches up (start = max(now, TAT)) and reserves its full cost, so nothing else starts
for longer than a window after it; the provider will likely refuse it as too large anyway.

The bound is on the starts the limiter hands out, in Redis time. That is enough for a minute,
but not for a provider that enforces its share of the limit over every second (Azure OpenAI
evaluates RPM over 1 s or 10 s increments; gateways keep sliding windows): at 1,200 RPM twenty
slots span 1.02 s, so one call sent 20 ms late shares a second with the twenty after it, and
sends were measured late by 23 ms at the median and 255 ms at p99 (a deferred job back after
its slot, a sleep woken late on a busy host; docs/benchmarks.md). So a granted call passes a
second check just before it is sent, `start` (one Lua script): the actual starts of every
process are paced an interval's share apart (Limits.interval_share: 20 calls in 1.0102 s at
1,200 RPM), and a late call waits there instead of crowding the calls after it. That pace is
slightly faster than GCRA's, so it only ever holds back calls that came late, and GCRA alone
still decides the pace. It spaces starts rather than counting them in a sliding log: a log
lets late calls go in a burst as soon as the last second has room, and bursts then recur a
second apart with half the margin (measured: 98 429s in 600 calls instead of 36).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

__all__ = ["Decision", "Limits", "RateLimiter", "parse_duration"]


# The share of the headroom's stretch the start pace keeps as margin (Limits.interval_share).
_LOG_MARGIN = 0.5


@dataclass(frozen=True)
class Limits:
    """A provider's limits for one key; None means that dimension is not limited."""

    rpm: int | None = None  # requests per window
    tpm: int | None = None  # tokens per window
    max_concurrency: int | None = None  # calls in flight at once, across all processes
    window_seconds: float = 60.0  # providers state limits per minute
    headroom: float = 0.98  # pace at this fraction of the limit
    # The shortest interval over which the provider may enforce its share of the limit (Azure
    # OpenAI evaluates RPM over 1 s or 10 s; gateways keep sliding windows of a second).
    interval_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrency"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"Limits.{name} must be at least 1 or None, got {value!r}")
        if not self.window_seconds > 0:
            raise ValueError(f"Limits.window_seconds must be positive, got {self.window_seconds!r}")
        if not 0 < self.headroom <= 1:
            raise ValueError(f"Limits.headroom must be in (0, 1], got {self.headroom!r}")
        if not 0 < self.interval_seconds <= self.window_seconds:
            raise ValueError(
                "Limits.interval_seconds must be positive and at most window_seconds, "
                f"got {self.interval_seconds!r}"
            )

    def interval_share(self, limit: int | None) -> tuple[int, float]:
        """(allowance, span) of the start pace for one dimension; (0, 0.0) if not limited.

        Starts are paced `allowance` calls (or tokens) per `span`: the interval's share of the
        limit (at least one), over the time that share takes at the limit's pace, stretched by
        half the headroom's stretch. That half is the margin for the delay between the start
        and the provider's door (measured in the docs: a few milliseconds, tens under load);
        the other half keeps the start pace a little faster than GCRA hands out slots, so a
        queue of late calls drains instead of growing.
        """
        if limit is None:
            return 0, 0.0
        allowance = max(1, math.floor(limit * self.interval_seconds / self.window_seconds))
        stretch = 1 + (1 / self.headroom - 1) * _LOG_MARGIN
        return allowance, allowance * self.window_seconds / limit * stretch

    def start_slack(self, limit: int | None) -> float:
        """How much of a late start's lateness the start pace keeps on its schedule.

        Each start sets the next no earlier than one share after (its time - slack), so m + 1
        starts span at least m shares - slack: the interval's allowance + 1 starts span at
        least its whole stretched span - slack. Half the stretch (5 ms of the 10 at 1,200
        RPM) keeps every interval at its share at the sender, and leaves the other half as the
        margin for arrival jitter. Without it each late wake-up's lateness was lost for good
        (measured: 19.3 starts/s where GCRA handed out 19.6; request-bound +8.7 %).
        """
        allowance, span = self.interval_share(limit)
        if not allowance or limit is None:
            return 0.0
        exact = allowance * self.window_seconds / limit  # the allowance at exactly the limit
        return max(0.0, (span - exact) / 2)

    def pause_after_429(self, tokens: int) -> float:
        """How long every process pauses after a 429 that named no Retry-After.

        The time for one call's share of the interval to leave it (50 ms at 1,200 RPM), never
        more than the interval: under per-second enforcement a 429 says this call did not fit
        the last interval, not that the provider wants silence for a second.
        """
        requests, _ = self.interval_share(self.rpm)
        allowance, _ = self.interval_share(self.tpm)
        shares = ([1 / requests] if requests else []) + ([tokens / allowance] if allowance else [])
        return self.interval_seconds * min(1.0, max(shares, default=1.0))


@dataclass(frozen=True)
class Decision:
    """The limiter's answer to one acquire."""

    granted: bool  # True: capacity reserved; sleep `wait` seconds, then send
    wait: float  # granted: until the reserved slot; refused: until it is worth asking again
    reason: str  # "ok", "requests", "tokens", "concurrency", "cooldown"


_COMMON = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x)
  return string.format('%.17g', x)
end

-- Keep the hash until a stretched window (W/h) after its latest time: by then every stored time
-- acts exactly as if it were absent (no pre-wait reaches back further), so an idle key simply
-- vanishes. Never shorten the expiry: cool_down, which knows no window, must not cut one off.
local function keep(key, now, span)
  local v = redis.call('HMGET', key, 'req_tat', 'tok_tat', 'cool')
  local latest = now
  for i = 1, 3 do
    local x = tonumber(v[i])
    if x and x > latest then latest = x end
  end
  local ttl = math.ceil((latest - now + span) * 1000) + 1000
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
"""

_ACQUIRE = (
    _COMMON
    + """
-- KEYS: state hash, in-flight zset. ARGV: tokens, max_wait, lease, window, headroom,
-- max_concurrency, call_id, rpm, tpm; a limit of 0 means unlimited.
local now = clock()
local max_wait, lease = tonumber(ARGV[2]), tonumber(ARGV[3])
local window, headroom = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_conc, call_id = tonumber(ARGV[6]), ARGV[7]
local dims = {
  {name = 'requests', f = 'req', cost = 1, limit = tonumber(ARGV[8])},
  {name = 'tokens', f = 'tok', cost = tonumber(ARGV[1]), limit = tonumber(ARGV[9])},
}

-- Seconds per unit for a call paced with room r (T(R) of the module docstring).
local function interval(d, r)
  return window / (headroom * (d.limit - r))
end

-- Plan one dimension: its earliest start, and the room and duration it will be paced with.
-- _room is the room the latest reserved call was paced with (R_{k-1}); _target is the room
-- later calls should leave, raised by large calls (granted or refused) for one window.
local function plan(d)
  local v = redis.call('HMGET', KEYS[1], d.f .. '_tat', d.f .. '_room', d.f .. '_target',
    d.f .. '_target_at')
  local tat, room, target, target_at = tonumber(v[1]), tonumber(v[2]), tonumber(v[3]),
    tonumber(v[4])
  local cap = d.limit / 2
  local last = math.min(room or 0, cap)
  local want = 0
  if target and target_at and now - target_at <= window then want = math.min(target, cap) end
  local need = d.cost - 1
  d.raise = false
  if d.cost > d.limit then
    -- Can never fit a window: go once TAT catches up instead of deadlocking.
    d.start, d.room = math.max(now, tat or now), last
    d.dur = d.cost * interval(d, 0)
    return
  end
  d.room = math.min(cap, math.max(want, need))
  d.raise = need > 0 and need >= want
  -- The pre-wait pays for the call's own excess and for any rise of the room (the proof).
  -- No TAT: the key was idle for longer than any pre-wait, which is then already served.
  local short = math.max(0, math.max(need, d.room) - last)
  d.start = now
  if tat then d.start = math.max(now, tat + short * interval(d, last)) end
  d.dur = d.cost * interval(d, d.room)
end

local start, reason = now, 'ok'
for _, d in ipairs(dims) do
  if d.limit > 0 then
    plan(d)
    if d.start > start then start, reason = d.start, d.name end
  end
end

-- A refusal reserves nothing. A large call leaves only its room request, so the calls granted
-- meanwhile pace to make space for it instead of starving it under a steady load.
local function refuse(wait, why)
  local wrote = false
  for _, d in ipairs(dims) do
    if d.limit > 0 and d.raise then
      redis.call('HSET', KEYS[1], d.f .. '_target', fmt(d.room), d.f .. '_target_at', fmt(now))
      wrote = true
    end
  end
  if wrote then keep(KEYS[1], now, window / headroom) end
  return {0, fmt(wait), why}
end

local cool = tonumber(redis.call('HGET', KEYS[1], 'cool'))
if cool and cool > now then
  return refuse(math.max(cool, start) - now, 'cooldown')
end
if start - now > max_wait then
  return refuse(start - now, reason)
end
if max_conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  local held = redis.call('ZSCORE', KEYS[2], call_id)
  if not held and redis.call('ZCARD', KEYS[2]) >= max_conc then
    local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return refuse(math.min(0.5, tonumber(first[2]) - now), 'concurrency')
  end
  -- The lease runs from the reserved slot, so a caller's sleep does not eat into it.
  redis.call('ZADD', KEYS[2], start + lease, call_id)
  local latest = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  redis.call('PEXPIRE', KEYS[2], math.ceil((tonumber(latest[2]) - now) * 1000) + 1000)
end
for _, d in ipairs(dims) do
  if d.limit > 0 then
    redis.call('HSET', KEYS[1], d.f .. '_tat', fmt(start + d.dur), d.f .. '_room', fmt(d.room))
    if d.raise then
      redis.call('HSET', KEYS[1], d.f .. '_target', fmt(d.room), d.f .. '_target_at', fmt(start))
    end
  end
end
keep(KEYS[1], now, window / headroom)
return {1, fmt(start - now), 'ok'}
"""
)

_CORRECT = (
    _COMMON
    + """
-- ARGV: actual - reserved tokens, tpm, window, headroom.
local now = clock()
local delta, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local window, headroom = tonumber(ARGV[3]), tonumber(ARGV[4])
local v = redis.call('HMGET', KEYS[1], 'tok_tat', 'tok_room')
local tat = tonumber(v[1])
-- No state: the reservation is more than a window old, so its tokens no longer count.
if not tat then return 0 end
if delta < 0 then
  -- Refund at the plain interval, the shortest any call is paced at, so it never over-refunds;
  -- never below now, so a refund cannot buy a burst.
  if tat > now then tat = math.max(now, tat + delta * window / (headroom * limit)) end
else
  local room = math.min(tonumber(v[2]) or 0, limit / 2)
  tat = tat + delta * window / (headroom * (limit - room))
end
redis.call('HSET', KEYS[1], 'tok_tat', fmt(tat))
keep(KEYS[1], now, window / headroom)
return 1
"""
)

_COOL_DOWN = (
    _COMMON
    + """
-- ARGV: seconds, how long to keep the hash beyond its latest time.
local now = clock()
local until_ = now + tonumber(ARGV[1])
local cool = tonumber(redis.call('HGET', KEYS[1], 'cool'))
if not cool or cool < until_ then
  redis.call('HSET', KEYS[1], 'cool', fmt(until_))
end
keep(KEYS[1], now, tonumber(ARGV[2]))
return 1
"""
)

_OBSERVE = (
    _COMMON
    + """
-- ARGV: how long to keep the hash beyond its latest time, then an offset from now for the
-- requests and the tokens TAT ('' = leave it).
local now = clock()
local fields = {'req_tat', 'tok_tat'}
for i = 1, 2 do
  local offset = tonumber(ARGV[i + 1])
  if offset then
    local floor = now + offset
    local tat = tonumber(redis.call('HGET', KEYS[1], fields[i]))
    -- Only ever later: headers are a snapshot, and other processes may have reserved since.
    if not tat or tat < floor then
      redis.call('HSET', KEYS[1], fields[i], fmt(floor))
    end
  end
end
keep(KEYS[1], now, tonumber(ARGV[1]))
return 1
"""
)

_START = (
    _COMMON
    + """
-- KEYS: state hash. ARGV: tokens, then seconds per unit at the start pace for requests and for
-- tokens (0: not limited), how long to keep the hash beyond its latest time, then the slack of
-- each dimension. A start is never early on its schedule; a late one keeps up to its slack of
-- the lateness on the schedule (the next may follow it by one share less the slack), so small
-- delays are caught up instead of lost.
local now = clock()
local cost, keep_for = tonumber(ARGV[1]), tonumber(ARGV[4])
local dims = {
  {name = 'requests', f = 'req_next', cost = 1, per = tonumber(ARGV[2]),
   slack = tonumber(ARGV[5])},
  {name = 'tokens', f = 'tok_next', cost = cost, per = tonumber(ARGV[3]),
   slack = tonumber(ARGV[6])},
}
local cool = tonumber(redis.call('HGET', KEYS[1], 'cool'))
if cool and cool > now then return {0, fmt(cool - now), 'cooldown'} end
local wait, why = 0, 'ok'
for _, d in ipairs(dims) do
  if d.per > 0 then
    d.next = tonumber(redis.call('HGET', KEYS[1], d.f)) or now
    if d.next - now > wait then wait, why = d.next - now, d.name end
  end
end
if wait > 0 then return {0, fmt(wait), why} end
for _, d in ipairs(dims) do
  if d.per > 0 then
    redis.call('HSET', KEYS[1], d.f, fmt(math.max(d.next, now - d.slack) + d.cost * d.per))
  end
end
keep(KEYS[1], now, keep_for)
return {1, '0', 'ok'}
"""
)


# Go-style durations as OpenAI sends them in x-ratelimit-reset-*: "20ms", "1.5s", "6m0s".
_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_PART = r"(\d+(?:\.\d*)?|\.\d+)(h|ms|us|µs|ns|m|s)"
_DURATION = re.compile(rf"(?:{_PART})+")
_DURATION_PART = re.compile(_PART)


def parse_duration(text: str) -> float | None:
    """Seconds in an OpenAI reset header ("1s", "6m0s", "20ms", or a bare number); else None."""
    text = text.strip()
    try:
        seconds = float(text)
    except ValueError:
        if not _DURATION.fullmatch(text):
            return None
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION_PART.findall(text))
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _remaining(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


class RateLimiter:
    """Shared GCRA pacing, cool-downs and a concurrency cap per key, kept in Redis.

    Thread-safe: it holds only the client (itself thread-safe) and the registered scripts.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "chatjobs:limit") -> None:
        self._client = client
        self._prefix = prefix
        self._acquire = client.register_script(_ACQUIRE)
        self._correct = client.register_script(_CORRECT)
        self._cool_down = client.register_script(_COOL_DOWN)
        self._observe = client.register_script(_OBSERVE)
        self._start = client.register_script(_START)

    def _keys(self, key: str) -> list[str]:
        # The braces are a Redis Cluster hash tag: one key's state always lives on one node.
        base = f"{self._prefix}:{{{key}}}"
        return [f"{base}:rate", f"{base}:inflight"]

    def acquire(
        self,
        key: str,
        limits: Limits,
        *,
        tokens: int,
        call_id: str,
        max_wait: float = 2.0,
        lease_seconds: float = 600.0,
    ) -> Decision:
        """Reserve the earliest slot every limit allows, if it is within `max_wait` seconds.

        Granted: capacity is reserved (and `call_id` holds a concurrency slot until `release`
        or `lease_seconds` after the slot); sleep `wait`, then send. Refused: nothing is
        reserved; `wait` says when asking again is worthwhile, so the caller can defer the job
        instead of holding a worker. During a cool-down every acquire is refused.
        """
        if tokens < 0 or max_wait < 0 or lease_seconds <= 0:
            raise ValueError("tokens and max_wait must be >= 0 and lease_seconds > 0")
        raw = self._acquire(
            keys=self._keys(key),
            args=[
                tokens,
                repr(float(max_wait)),
                repr(float(lease_seconds)),
                repr(float(limits.window_seconds)),
                repr(float(limits.headroom)),
                limits.max_concurrency or 0,
                call_id,
                limits.rpm or 0,
                limits.tpm or 0,
            ],
        )
        granted, wait, reason = raw
        return Decision(
            granted=bool(int(granted)),
            wait=max(0.0, float(wait)),
            reason=reason.decode() if isinstance(reason, bytes) else str(reason),
        )

    def start(self, key: str, limits: Limits, *, tokens: int, max_wait: float = 2.0) -> Decision:
        """Wait, if need be, until the call may start at once, then record its start.

        Call it just before sending a call `acquire` granted (after sleeping until the slot).
        Actual starts, in every process, are paced one interval's share apart (about 50 ms at
        1,200 RPM, a little less than GCRA's spacing): a call that woke late (a slow sleep, a
        busy interpreter, a deferred job back after its slot) goes at once if the last start
        is that far back, else it waits, instead of landing on the calls after it. Also waits
        out a cool-down. Refused: it would take longer than `max_wait`; nothing is recorded.
        """
        n_req, span_req = limits.interval_share(limits.rpm)
        n_tok, span_tok = limits.interval_share(limits.tpm)
        if not (n_req or n_tok):
            return Decision(granted=True, wait=0.0, reason="ok")
        per_request = span_req / n_req if n_req else 0.0
        per_token = span_tok / n_tok if n_tok else 0.0
        args: list[str | int] = [
            tokens,
            repr(per_request),
            repr(per_token),
            repr(max(span_req, span_tok)),
            repr(limits.start_slack(limits.rpm)),
            repr(limits.start_slack(limits.tpm)),
        ]
        waited = 0.0
        while True:
            granted, wait, reason = self._start(keys=self._keys(key)[:1], args=args)
            wait = max(0.0, float(wait))
            if int(granted):
                return Decision(granted=True, wait=0.0, reason="ok")
            if waited + wait > max_wait:
                return Decision(granted=False, wait=wait, reason=_text(reason))
            time.sleep(wait)
            waited += wait

    def release(self, key: str, call_id: str) -> None:
        """Give back the call's concurrency slot; releasing twice is harmless."""
        self._client.zrem(self._keys(key)[1], call_id)

    def correct(
        self, key: str, limits: Limits, *, reserved_tokens: int, actual_tokens: int
    ) -> None:
        """Charge or refund the difference between a call's reserved and actual tokens."""
        if limits.tpm is None or actual_tokens == reserved_tokens:
            return
        self._correct(
            keys=self._keys(key)[:1],
            args=[
                actual_tokens - reserved_tokens,
                limits.tpm,
                repr(float(limits.window_seconds)),
                repr(float(limits.headroom)),
            ],
        )

    def cool_down(self, key: str, seconds: float) -> None:
        """Grant nothing for the key, in any process, for `seconds` (an upstream 429)."""
        if seconds <= 0:
            return
        # The hash must outlive the cool-down; a minute past it is plenty to be forgotten.
        self._cool_down(keys=self._keys(key)[:1], args=[repr(float(seconds)), 60])

    def observe(self, key: str, limits: Limits, headers: Mapping[str, str]) -> None:
        """Tighten the pacing from a response's x-ratelimit-* headers; never loosen it."""
        lower = {name.lower(): value for name, value in headers.items()}
        offsets: list[str] = []
        for name, limit in (("requests", limits.rpm), ("tokens", limits.tpm)):
            offset: float | None = None
            remaining = _remaining(lower.get(f"x-ratelimit-remaining-{name}"))
            if limit is not None and remaining is not None:
                if remaining == 0:
                    offset = parse_duration(lower.get(f"x-ratelimit-reset-{name}", ""))
                else:
                    offset = -remaining * limits.window_seconds / (limit * limits.headroom)
            offsets.append("" if offset is None else repr(offset))
        if any(offsets):
            self._observe(
                keys=self._keys(key)[:1],
                args=[repr(limits.window_seconds / limits.headroom), *offsets],
            )

    def state(self, key: str) -> dict[str, Any]:
        """The key's stored state and the Redis clock, for tests and debugging."""
        rate, inflight = self._keys(key)
        with self._client.pipeline(transaction=True) as pipe:
            pipe.time()
            pipe.hgetall(rate)
            pipe.zrange(inflight, 0, -1, withscores=True)
            pipe.pttl(rate)
            (seconds, micros), fields, members, ttl = pipe.execute()
        values = {_text(name): float(value) for name, value in fields.items()}
        return {
            "now": seconds + micros / 1e6,
            "requests_tat": values.get("req_tat"),
            "tokens_tat": values.get("tok_tat"),
            "tokens_room": values.get("tok_room"),
            "tokens_target": values.get("tok_target"),
            "cooldown_until": values.get("cool"),
            "in_flight": {_text(member): float(expiry) for member, expiry in members},
            "ttl": ttl / 1000 if ttl >= 0 else None,
            "requests_next_start": values.get("req_next"),
            "tokens_next_start": values.get("tok_next"),
        }


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
