"""Live job events over Redis pub/sub: status changes and streamed content deltas.

Advisory only: Postgres holds the truth. The events endpoint sends the job's current state
first and re-reads its status whenever a message arrives or a second passes, so a lost
message costs a second of latency (or a gap in the streamed deltas), never a wrong answer.

Publishing never waits on Redis. ``publish`` appends to a bounded in-process queue that one
daemon thread per process drains with the synchronous client; callers include the worker's
shared asyncio loop (one call per streamed chunk), where a 2-second stall on a slow Redis
would freeze every upstream call in flight in that process. When the queue is full the
*oldest* event is dropped and counted: a backlog only builds while Redis is slow or down, and
by then its oldest events describe moments that have passed (deltas of calls that may have
finished, statuses since superseded), while the newest are closest to the truth a listener
will re-read anyway.

Listening shares one pub/sub connection per API process (``hub()``): each stream registers an
asyncio queue for its job's channel, and one reader task fans messages out to the queues, so
open streams cost no Redis connections of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.retry import Retry

from chatjobs.settings import get_settings

log = logging.getLogger(__name__)

# ~10,000 events of a few hundred bytes: a few MB at most, and about a minute of deltas of a
# busy worker process, which is longer than any Redis blip worth riding out.
CAPACITY = 10_000
BATCH = 500  # events per pipeline round trip
_RETRY_PAUSE = 1.0  # seconds the drainer waits after a failed send
_WARN_EVERY = 60.0  # seconds between warnings about dropped events


def channel(job_id: uuid.UUID | str) -> str:
    return f"chatjobs:job:{job_id}"


class Publisher:
    """A bounded queue of events and the one thread that sends them, in order, to Redis."""

    def __init__(self, client: redis.Redis, *, capacity: int = CAPACITY) -> None:
        self._client = client
        self._capacity = capacity
        self._pending: deque[tuple[str, str]] = deque()
        self._busy = False
        self._changed = threading.Condition()
        self.sent = 0
        self.dropped = 0
        self._warned_dropped = 0
        self._warned_at = 0.0
        self._thread = threading.Thread(target=self._run, name="chatjobs-events", daemon=True)
        self._thread.start()

    def put(self, channel: str, message: str) -> None:
        """Queue one message; returns at once, dropping the oldest queued one when full."""
        with self._changed:
            if len(self._pending) >= self._capacity:
                self._pending.popleft()
                self.dropped += 1
            self._pending.append((channel, message))
            self._changed.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued event was sent (or given up on); False on timeout."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._pending and not self._busy, timeout)

    def _run(self) -> None:
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending))
                batch = [self._pending.popleft() for _ in range(min(BATCH, len(self._pending)))]
                self._busy = True
            failed = not self._send(batch)
            with self._changed:
                self._busy = False
                if failed:
                    self.dropped += len(batch)
                else:
                    self.sent += len(batch)
                self._changed.notify_all()
            if failed:
                # Redis is down or slow: pause rather than spin; the queue bounds what waits.
                time.sleep(_RETRY_PAUSE)

    def _send(self, batch: list[tuple[str, str]]) -> bool:
        try:
            # One round trip for the batch; a pipeline keeps the order of its commands.
            pipe = self._client.pipeline(transaction=False)
            for name, message in batch:
                pipe.publish(name, message)
            pipe.execute()
        except Exception as exc:
            # Anything at all (not only RedisError: a confused server can make redis-py
            # raise others), since this thread must outlive it. Not re-sent: after a
            # timeout some may have gone out, and duplicated deltas would garble a stream
            # worse than missing ones.
            self._warn(exc)
            return False
        return True

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at < _WARN_EVERY:
            return
        with self._changed:
            dropped, self._warned_dropped = self.dropped - self._warned_dropped, self.dropped
        self._warned_at = now
        log.warning(
            "could not publish job events (%s); %d dropped since the last warning", exc, dropped
        )


_publisher: Publisher | None = None
_publisher_pid = 0
_publisher_lock = threading.Lock()


def _reset_after_fork() -> None:
    # A forked child (a Celery prefork worker) inherits the parent's Publisher without its
    # thread, and possibly a lock some other parent thread held: start afresh.
    global _publisher, _publisher_lock
    _publisher = None
    _publisher_lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)


def publisher() -> Publisher:
    """This process's publisher, started on first use (so each forked child has its own)."""
    global _publisher, _publisher_pid
    current = _publisher
    if current is not None and _publisher_pid == os.getpid():
        return current
    with _publisher_lock:
        if _publisher is None or _publisher_pid != os.getpid():
            client = redis.Redis.from_url(
                get_settings().redis_url, socket_timeout=2, socket_connect_timeout=2
            )
            _publisher = Publisher(client)
            _publisher_pid = os.getpid()
        return _publisher


def publish(job_id: uuid.UUID, kind: str, data: dict[str, Any]) -> None:
    """Tell any listener about a job; returns at once and never fails the caller."""
    try:
        publisher().put(channel(job_id), json.dumps({"kind": kind, **data}))
    except Exception:
        # Events are advisory: a bad payload or a failed thread start must not fail a job.
        log.debug("could not queue a %s event for job %s", kind, job_id, exc_info=True)


# --- listening (the API) ---------------------------------------------------------------

INBOX_SIZE = 1000  # messages one stream may lag behind before its newest are dropped
_CONFIRM_SECONDS = 2.0  # how long a new stream waits for Redis to confirm its subscription


class Hub:
    """One pub/sub connection for a process's event streams, and a task that fans out.

    Each stream gets an asyncio queue of parsed messages for its channel. The channel is
    subscribed while at least one stream listens to it. If Redis is unreachable the streams
    get nothing and fall back on re-reading the job every second; the connection and its
    subscriptions are restored when Redis comes back.
    """

    def __init__(self, url: str) -> None:
        self.loop = asyncio.get_running_loop()
        self._client = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=2,
            socket_timeout=5,
            socket_keepalive=True,
            # A PING now and then on an idle connection, so a dead one is noticed.
            health_check_interval=30,
            # No retries inside redis-py: the reader retries every second on its own, and a
            # new stream should not wait out backoffs before it falls back on polling.
            retry=Retry(NoBackoff(), 0),
        )
        self._pubsub = self._client.pubsub()
        self._listeners: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
        # Channels subscribed (or being subscribed) on Redis, each set once Redis confirms.
        self._subscribed: dict[str, asyncio.Event] = {}
        self._lock = asyncio.Lock()  # orders SUBSCRIBE and UNSUBSCRIBE commands
        self._unsubscribing: set[str] = set()
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # After a failed SUBSCRIBE, new streams skip Redis for a second instead of each
        # waiting out a connect timeout in turn.
        self._down_until = 0.0
        self.dropped = 0

    @contextlib.asynccontextmanager
    async def listen(self, name: str) -> AsyncIterator[asyncio.Queue[dict[str, Any]]]:
        """Messages published on a channel from now on (once Redis confirms, or 2 s passed)."""
        inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=INBOX_SIZE)
        self._listeners.setdefault(name, set()).add(inbox)
        try:
            await self._subscribe(name)
            yield inbox
        finally:
            # Synchronous on purpose: a cancelled stream may not await in its cleanup.
            self._release(name, inbox)

    async def aclose(self) -> None:
        for task in [self._reader, *self._tasks]:
            if task is not None:
                task.cancel()
        await self._pubsub.aclose()
        await self._client.aclose()

    async def _subscribe(self, name: str) -> None:
        async with self._lock:
            confirmed = self._subscribed.get(name)
            if confirmed is None:
                if self.loop.time() < self._down_until:
                    return
                confirmed = self._subscribed[name] = asyncio.Event()
                try:
                    await self._pubsub.subscribe(name)
                except (redis.RedisError, OSError) as exc:
                    del self._subscribed[name]
                    self._down_until = self.loop.time() + 1.0
                    log.warning("could not subscribe to %s (%s); the stream polls", name, exc)
                    return
                if self._reader is None or self._reader.done():
                    self._reader = self.loop.create_task(self._read(), name="chatjobs-events")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(confirmed.wait(), _CONFIRM_SECONDS)

    def _release(self, name: str, inbox: asyncio.Queue[dict[str, Any]]) -> None:
        listeners = self._listeners.get(name)
        if listeners is None:
            return
        listeners.discard(inbox)
        if not listeners:
            del self._listeners[name]
            self._schedule_unsubscribe(name)

    def _schedule_unsubscribe(self, name: str) -> None:
        if name in self._unsubscribing:
            return  # the pending one decides on the state it finds when it runs
        self._unsubscribing.add(name)
        self._spawn(self._unsubscribe(name))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unsubscribe(self, name: str) -> None:
        try:
            async with self._lock:
                if name in self._listeners:
                    return  # a new stream came for it meanwhile
                self._subscribed.pop(name, None)
                await self._pubsub.unsubscribe(name)
        except (redis.RedisError, OSError):
            # It is resubscribed on reconnection; its messages then find no listener and
            # unsubscribe it again (see _fan_out).
            log.debug("could not unsubscribe from %s", name, exc_info=True)
        finally:
            self._unsubscribing.discard(name)

    async def _read(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Redis went away: redis-py reconnects and resubscribes on the next read.
                log.warning("event stream connection lost; retrying", exc_info=True)
                await asyncio.sleep(1.0)
                continue
            if message is None:
                continue
            kind, name = message.get("type"), message.get("channel")
            if kind == "subscribe":
                confirmed = self._subscribed.get(name)
                if confirmed is not None:
                    confirmed.set()
            elif kind == "message":
                self._fan_out(name, message["data"])

    def _fan_out(self, name: str, data: str) -> None:
        listeners = self._listeners.get(name)
        if not listeners:
            if name not in self._subscribed:
                self._schedule_unsubscribe(name)
            return
        try:
            payload = json.loads(data)
        except ValueError:
            log.debug("ignoring a malformed event on %s", name)
            return
        for inbox in listeners:
            try:
                inbox.put_nowait(payload)
            except asyncio.QueueFull:
                # That client reads slower than the job streams; its status still comes
                # from the database.
                self.dropped += 1


_hub: Hub | None = None


def hub() -> Hub:
    """This process's hub, for the running event loop (built on first use)."""
    global _hub
    loop = asyncio.get_running_loop()
    if _hub is None or _hub.loop is not loop:
        _hub = Hub(get_settings().redis_url)
    return _hub
