"""What one request may cost: body size, large bodies at once, and the per-tenant limits.

Body limits are pure ASGI and run after authentication (api/auth.py), so a caller without a
valid key never has a /v1 body read; anywhere else (the console's sign-in form and its other
forms, whose session is checked by the page) a body is capped at SMALL_BODY_BYTES and never
takes a large-body slot. A body over CHATJOBS_LARGE_BODY_BYTES costs about eight
times its size while it is parsed, stored and answered (a 9.9 MiB body ~80 MB, measured with
bench/big_bodies.py), so at most CHATJOBS_MAX_LARGE_BODIES of them are read at once per
process. The others wait, unread: uvicorn stops reading a socket once 64 KiB are buffered, so
a waiting body costs that much, not its size. A body still waiting after
CHATJOBS_LARGE_BODY_WAIT_SECONDS gets a 503 with Retry-After: the service is busy, not the
client over a quota of its own (a 429 would say the client is), and clients retry a 503 the
same way.

File uploads (POST /v1/files) are neither buffered here nor gated: api/multipart.py streams
them to a temporary file at a constant cost in memory, under CHATJOBS_MAX_UPLOAD_BYTES. Only
a Content-Length already past that limit (and the form's own few bytes) is refused here.

The per-tenant limits live in Redis so that every API process shares them: submissions per
second (GCRA, one script call per submission), open event streams (leases that expire, so a
crashed process frees its streams' slots within a minute), and queued jobs (counted in
Postgres at most once a second per tenant and process). All fail open: Redis carries no truth
(DESIGN invariant 1), and an outage of it must not refuse every submission.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import math
import time
import uuid
from types import TracebackType
from typing import Any

import redis
import redis.asyncio as aioredis
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body, no_retry
from chatjobs.db import session_scope
from chatjobs.errors import QueueLimitExceeded, StreamLimitExceeded, SubmitRateExceeded
from chatjobs.settings import get_settings
from chatjobs.tenants import Caller, queued_jobs

log = logging.getLogger("chatjobs.api")


# --- bodies ----------------------------------------------------------------------------

UPLOAD_PATH = "/v1/files"
# A body sent anywhere but /v1: the console's forms are a few short fields.
SMALL_BODY_BYTES = 64 * 1024
# What a multipart upload may add to its file: boundaries, part headers and short fields.
FORM_OVERHEAD_BYTES = 256 * 1024


class BodySizeLimit:
    """Answer 413 once a body passes ``max_bytes``, whether or not Content-Length was sent,
    and read at most ``max_large`` bodies over ``large_bytes`` at once.

    The body is read up front and replayed to the app, so a chunked upload is cut off at the
    limit instead of being buffered whole. A large body keeps its slot until the app has
    answered: parsing and storing it is what costs, not the reading.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_bytes: int,
        large_bytes: int,
        max_large: int,
        wait_seconds: float,
        max_upload_bytes: int | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        if max_upload_bytes is None:
            max_upload_bytes = get_settings().max_upload_bytes
        self.max_upload_bytes = max_upload_bytes
        self.large_bytes = large_bytes
        self.max_large = max_large
        self.wait_seconds = wait_seconds
        self._slots: asyncio.Semaphore | None = None
        _return_large_blocks_to_the_os()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if scope["method"] == "POST" and scope["path"] == UPLOAD_PATH:
            limit = self.max_upload_bytes + FORM_OVERHEAD_BYTES
            if declared is not None and declared.isdigit() and int(declared) > limit:
                await self._reject(send, self.max_upload_bytes, "CHATJOBS_MAX_UPLOAD_BYTES")
                return
            await self.app(scope, receive, send)
            return
        # Outside /v1 (the console's forms, unknown paths) nobody has shown a key yet and no
        # body is more than a few fields: a small cap, and never one of the large-body slots.
        api = scope["path"] == "/v1" or scope["path"].startswith("/v1/")
        max_bytes = self.max_bytes if api else SMALL_BODY_BYTES
        setting = "CHATJOBS_MAX_BODY_BYTES" if api else "the limit of a form outside /v1"
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            await self._reject(send, max_bytes, setting)
            return
        holding = False
        try:
            if (
                api
                and declared is not None
                and declared.isdigit()
                and int(declared) > self.large_bytes
            ):
                if not await self._take_slot(send):
                    return
                holding = True
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body = message.get("body", b"")
                size += len(body)
                if size > max_bytes:
                    await self._reject(send, max_bytes, setting)
                    return
                if api and size > self.large_bytes and not holding:
                    if not await self._take_slot(send):  # no or a false Content-Length
                        return
                    holding = True
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            replay: list[Message] = [
                {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            ]
            del chunks

            async def replayed() -> Message:
                return replay.pop() if replay else await receive()

            await self.app(scope, replayed, send)
        finally:
            if holding:
                assert self._slots is not None
                self._slots.release()

    async def _take_slot(self, send: Send) -> bool:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_large)
        if not self._slots.locked():
            await self._slots.acquire()  # free: taken without yielding
            return True
        try:
            await asyncio.wait_for(self._slots.acquire(), self.wait_seconds)
        except TimeoutError:
            await _send_json(
                send,
                503,
                "service_unavailable",
                f"more than {self.max_large} large request bodies are being processed "
                "(CHATJOBS_MAX_LARGE_BODIES); retry shortly",
                [(b"retry-after", b"1")],
            )
            return False
        return True

    async def _reject(
        self, send: Send, limit: int | None = None, setting: str = "CHATJOBS_MAX_BODY_BYTES"
    ) -> None:
        await _send_json(
            send,
            413,
            "request_too_large",
            f"request body exceeds {limit or self.max_bytes} bytes ({setting})",
            [(b"connection", b"close")],
        )


def _return_large_blocks_to_the_os() -> None:
    """Serve every allocation over 128 KiB by mmap, so freeing it gives the memory back.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), so after
    the first large body the next ones' 10 MB strings come from the per-thread heaps, which
    keep them: the process grew with every thread that ever parsed a large body. Measured
    with bench/big_bodies.py, peak RSS from a 175 MB baseline, 9.9 MiB bodies: 8 at once,
    648-735 MB -> 494 MB; 16 at once, 833 MB -> 633 MB.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


async def _send_json(
    send: Send, status: int, type_: str, message: str, headers: list[tuple[bytes, bytes]]
) -> None:
    body = json.dumps(error_body(type_, message)).encode()
    if no_retry(status):
        headers = [*headers, (b"x-should-retry", b"false")]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --- per-tenant limits -------------------------------------------------------------------

# GCRA with a burst of `burst` calls, on Redis time. KEYS: the tenant's key. ARGV: rate per
# second, burst. Returns allowed, remaining, retry after (s), until the burst is whole (s).
_SUBMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval = 1 / tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local allow_at = tat + interval - burst * interval
if allow_at > now then
  return {0, 0, string.format('%.6f', allow_at - now), string.format('%.6f', tat - now)}
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.17g', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
local remaining = math.floor((now + burst * interval - tat) / interval + 1e-9)
return {1, remaining, '0', string.format('%.6f', tat - now)}
"""

# A stream holds a lease in the tenant's sorted set (member: stream id, score: expiry).
# KEYS: the set. ARGV: limit, stream id, lease seconds. Returns allowed, streams open.
_OPEN_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local open = redis.call('ZCARD', KEYS[1])
if open >= tonumber(ARGV[1]) then return {0, open} end
redis.call('ZADD', KEYS[1], string.format('%.17g', now + lease), ARGV[2])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000) + 1000)
return {1, open + 1}
"""

# KEYS: the set. ARGV: stream id, lease seconds. Every member expires within a lease of
# now, so the set's own expiry can be reset to one lease.
_RENEW_STREAM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], string.format('%.17g', now + lease), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(lease * 1000) + 1000)
return 1
"""

STREAM_LEASE = 30.0  # seconds a stream's slot outlives the process that stopped renewing it
_RENEW_EVERY = STREAM_LEASE / 3
_QUEUE_RECHECK = 1.0  # seconds between counts of a tenant's queued jobs, per process
_QUEUE_RETRY_AFTER = 2.0
_STREAM_RETRY_AFTER = 5.0
_REDIS_CONNECTIONS = 8  # per API process, whatever the number of requests or streams
_WARN_EVERY = 60.0
_FAILURES = (redis.RedisError, OSError, TimeoutError)


def _duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: '250ms', '1s', '1.5s'."""
    ms = math.ceil(max(0.0, seconds) * 1000)
    if ms < 1000:
        return f"{ms}ms"
    return f"{ms / 1000:.3f}".rstrip("0").rstrip(".") + "s"


def _count_waiting(tenant_id: uuid.UUID, cap: int) -> int:
    with session_scope() as session:
        return queued_jobs(session=session, tenant_id=tenant_id, cap=cap)


class TenantLimiter:
    """The per-tenant limits of one API process, on its event loop (see ``limiter()``)."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.get_running_loop()
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=_REDIS_CONNECTIONS,
            timeout=1.0,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
        )
        self._client = aioredis.Redis(connection_pool=pool)
        self._submit = self._client.register_script(_SUBMIT)
        self._open = self._client.register_script(_OPEN_STREAM)
        self._renew = self._client.register_script(_RENEW_STREAM)
        # tenant -> [queued jobs as last counted plus those accepted since, when counted]
        self._waiting: dict[uuid.UUID, list[float]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warned_at = 0.0

    async def check_submit(self, caller: Caller) -> list[tuple[bytes, bytes]]:
        """Admit one POST /v1/jobs or raise; returns the x-ratelimit-* headers for the answer."""
        headers: list[tuple[bytes, bytes]] = []
        rate = caller.limits.submit_rps
        if rate:
            try:
                allowed, remaining, retry, reset = await self._submit(
                    keys=[f"chatjobs:tenant:{caller.tenant_id}:submit"], args=[rate, rate]
                )
            except _FAILURES as exc:
                self._warn(exc)
            else:
                limit_headers = {
                    "x-ratelimit-limit-requests": str(rate),
                    "x-ratelimit-remaining-requests": str(remaining),
                    "x-ratelimit-reset-requests": _duration(float(reset)),
                }
                if not allowed:
                    raise SubmitRateExceeded(
                        f"rate limit reached: {rate} job submissions per second for this "
                        "tenant; retry after the time in Retry-After",
                        retry_after=float(retry),
                        headers=limit_headers,
                    )
                headers = [(k.encode(), v.encode()) for k, v in limit_headers.items()]
        await self._check_queue(caller)
        return headers

    async def _check_queue(self, caller: Caller) -> None:
        limit = caller.limits.max_queued
        if not limit:
            return
        tenant_id = caller.tenant_id
        entry = self._waiting.get(tenant_id)
        if entry is None or time.monotonic() - entry[1] >= _QUEUE_RECHECK:
            if entry is not None:
                entry[1] = time.monotonic()  # requests meanwhile go by the last count
            count = await run_in_threadpool(_count_waiting, tenant_id, limit)
            if len(self._waiting) >= 10_000:
                self._waiting.clear()
            entry = self._waiting[tenant_id] = [count, time.monotonic()]
        if entry[0] >= limit:
            raise QueueLimitExceeded(
                f"this tenant has {limit} or more jobs waiting (queued or retrying), its "
                "limit; submit more once some have started",
                retry_after=_QUEUE_RETRY_AFTER,
            )
        entry[0] += 1

    async def open_stream(self, caller: Caller) -> StreamSlot:
        """A slot for one more event stream of the tenant, or StreamLimitExceeded."""
        limit = caller.limits.max_streams
        if not limit:
            return StreamSlot(self, None, "")
        key = f"chatjobs:tenant:{caller.tenant_id}:streams"
        member = uuid.uuid4().hex
        try:
            allowed, _ = await self._open(keys=[key], args=[limit, member, STREAM_LEASE])
        except _FAILURES as exc:
            self._warn(exc)
            return StreamSlot(self, None, "")
        if not allowed:
            raise StreamLimitExceeded(
                f"this tenant has {limit} event streams open, its limit; close one first",
                retry_after=_STREAM_RETRY_AFTER,
            )
        return StreamSlot(self, key, member)

    async def _keep(self, key: str, member: str) -> None:
        while True:
            await asyncio.sleep(_RENEW_EVERY)
            try:
                await self._renew(keys=[key], args=[member, STREAM_LEASE])
            except _FAILURES as exc:
                self._warn(exc)

    async def _release(self, key: str, member: str) -> None:
        try:
            await self._client.zrem(key, member)
        except _FAILURES as exc:
            self._warn(exc)  # the lease runs out instead

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning("per-tenant limits not enforced: Redis failed (%r)", exc)


class StreamSlot:
    """An open stream's place in its tenant's count: renewed while held, freed on exit."""

    def __init__(self, owner: TenantLimiter, key: str | None, member: str) -> None:
        self._owner, self._key, self._member = owner, key, member
        self._keeper: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> StreamSlot:
        if self._key is not None:
            self._keeper = self._owner.spawn(self._owner._keep(self._key, self._member))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # No await here: on a client's disconnect the stream is cancelled, and an await in a
        # cancelled scope would raise before the slot is freed.
        if self._keeper is not None:
            self._keeper.cancel()
        if self._key is not None:
            self._owner.spawn(self._owner._release(self._key, self._member))


_limiter: TenantLimiter | None = None


def limiter() -> TenantLimiter:
    """This process's limiter, for the running event loop (built on first use)."""
    global _limiter
    loop = asyncio.get_running_loop()
    if _limiter is None or _limiter.loop is not loop:
        _limiter = TenantLimiter(get_settings().redis_url)
    return _limiter
