"""Per-process machinery for running upstream calls: an asyncio loop on its own thread that
owns the shared httpx client, and a heartbeat that renews leases and abandons lost calls.

Celery task threads block on a future from this loop, so a call can be cancelled from outside
(the heartbeat found the job cancelled, expired or re-run) and the connection is closed at
once, which a blocking sync httpx call would not allow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import math
import os
import socket
import threading
import uuid
from collections.abc import Coroutine
from typing import Any, TypeVar

import redis

from chatjobs import events, jobs
from chatjobs.db import session_scope
from chatjobs.errors import LeaseLost
from chatjobs.limiter import RateLimiter
from chatjobs.providers import CallContext
from chatjobs.routing import Route
from chatjobs.settings import get_settings
from chatjobs.upstream import Completion, build_client, chat_completion

log = logging.getLogger("chatjobs.worker")
T = TypeVar("T")
Held = tuple[uuid.UUID, int]


class Runtime:
    """The loop, the client and the leases of one worker process."""

    def __init__(self) -> None:
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.loop = asyncio.new_event_loop()
        # (job, claim_seq) -> (the call's future, the attempt number, for logs)
        self._held: dict[Held, tuple[concurrent.futures.Future[Any], int]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        ready = threading.Event()
        threading.Thread(
            target=self._run_loop, args=(ready,), name="chatjobs-io", daemon=True
        ).start()
        ready.wait()
        self.clients = self.submit(self._build_clients()).result()
        self._next_client = itertools.count()
        self.redis = redis.Redis.from_url(get_settings().redis_url)
        self.limiter = RateLimiter(self.redis)
        threading.Thread(target=self._heartbeat, name="chatjobs-heartbeat", daemon=True).start()

    def _run_loop(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        self.loop.run_forever()

    async def _build_clients(self) -> list[Any]:
        # One connection per slot this process can run at once (a prefork child runs one
        # task at a time, a threads-pool process as many as it has threads), spread over
        # several clients: httpcore's pool does work proportional to its size for every
        # request, so one pool of 256 stalled the loop (measured: 256 in flight, then
        # seconds with 3) where 16 pools of 16 keep it flowing.
        slots = _pool_slots or get_settings().worker_concurrency
        shards = max(1, math.ceil(slots / _SLOTS_PER_CLIENT))
        return [build_client(slots=math.ceil(slots / shards)) for _ in range(shards)]

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, claim: jobs.Claim, route: Route) -> Completion:
        """Run one upstream call for a claimed job; LeaseLost if the job was taken away."""
        key = (claim.job_id, claim.claim_seq)
        on_delta = None
        if claim.request.get("stream"):

            def on_delta(delta: dict[str, Any]) -> None:
                # Runs on the shared loop, once per chunk: publish only queues the event
                # (a thread sends it), so a slow Redis cannot stall the other calls.
                events.publish(claim.job_id, "delta", {"delta": delta})

        future = self.submit(
            chat_completion(
                claim.request,
                model=claim.model,
                client=self.clients[next(self._next_client) % len(self.clients)],
                base_url=route.base_url,
                api_key=route.api_key(),
                on_delta=on_delta,
                route=route,
                context=call_context(claim),
            )
        )
        with self._lock:
            self._held[key] = (future, claim.attempt)
        try:
            return future.result()
        except concurrent.futures.CancelledError as exc:
            raise LeaseLost(f"job {claim.job_id} attempt {claim.attempt} lost its lease") from exc
        finally:
            with self._lock:
                self._held.pop(key, None)

    def _heartbeat(self) -> None:
        interval = get_settings().heartbeat_interval
        while not self._stop.wait(interval):
            with self._lock:
                held = set(self._held)
            if not held:
                continue
            try:
                with session_scope() as session:
                    kept = jobs.renew_leases(session=session, held=held)
            except Exception:
                # Postgres unreachable: keep calling. If the lease runs out meanwhile the job
                # is re-run and this attempt's write is refused by the claim fence.
                log.warning("could not renew %d leases", len(held), exc_info=True)
                continue
            for key in held - kept:
                with self._lock:
                    entry = self._held.get(key)
                if entry is not None and entry[0].cancel():
                    log.info("job %s attempt %d: lease lost, abandoning its call", key[0], entry[1])

    def close(self) -> None:
        self._stop.set()
        for client in self.clients:
            self.submit(client.aclose()).result(timeout=5)
        self.loop.call_soon_threadsafe(self.loop.stop)


def call_context(claim: jobs.Claim) -> CallContext:
    """What a provider may be told about the call: ids for its logs, the job's cache options,
    and the time to first byte it may take.

    That time is the client's read timeout, the bound chatjobs already puts on waiting for
    the first byte: a gateway told the same gives up when chatjobs would, and answers with an
    error the retry rule can classify instead of a cut connection. The job's deadline is
    enforced by its lease and the reconciler, not per call."""
    return CallContext(
        job_id=str(claim.job_id),
        batch_id=claim.batch_id,
        schedule_id=claim.schedule_id,
        tenant=str(claim.tenant_id) if claim.tenant_id else None,
        attempt=claim.attempt,
        gateway=claim.gateway or {},
        timeout_seconds=get_settings().upstream_read_timeout,
    )


_pool_slots: int | None = None
_SLOTS_PER_CLIENT = 16


def set_pool_slots(slots: int) -> None:
    """Record how many tasks this process runs at once (from the worker's real pool)."""
    global _pool_slots
    _pool_slots = max(1, slots)


_runtime: Runtime | None = None
_runtime_pid: int | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """This process's runtime, started on first use (so each forked pool child has its own)."""
    global _runtime, _runtime_pid
    with _runtime_lock:
        if _runtime is None or _runtime_pid != os.getpid():
            _runtime = Runtime()
            _runtime_pid = os.getpid()
        return _runtime
