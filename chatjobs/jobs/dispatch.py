"""From "stored" to "running": which waiting jobs get a broker message next, and noticing
lost ones.

Postgres decides, the broker transports. A pending job waits in Postgres (``next_attempt_at``
set; eligible once it has passed) until a dispatcher admits it: ``admit`` picks the next jobs
by priority, then weighted fair share between tenants in estimated tokens, then each tenant's
own order (chatjobs.jobs.fairness), as many as the broker has room for (``window``: about the
live worker slots), and clears ``next_attempt_at``; the caller publishes them once committed.
So the broker holds a few hundred messages, never a tenant's whole backlog, and a job
submitted after 50,000 others waits behind a window of them, not all of them; and one that
outranks a job already in the broker rides the express queue, behind none of them.

Dispatchers run in every worker process and in beat; an advisory lock lets one pass at a
time, so any may die. A submission or a finished job pokes them (``poke``) so no pass waits
for a tick; the tick only catches retries and deferrals falling due.

Every publish is recorded in a Redis sorted set (job id -> publish time) on the broker's own
Redis, and a worker removes the id when it takes the message. So "the broker no longer holds
it" is one ZMSCORE away: an admitted job missing from the set was taken, or lost with the
broker's data (a flush, a restart without persistence, a dispatcher killed between commit
and publish), and is admitted again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import Any

import redis
from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from chatjobs.jobs import fairness
from chatjobs.jobs._state import PENDING
from chatjobs.models import Job
from chatjobs.queue import enqueue_jobs, express_queue
from chatjobs.routing import offload_routes, route_for
from chatjobs.settings import Settings, get_settings

log = logging.getLogger("chatjobs.jobs")

# A message handed to a worker that died unacknowledged is given back by the broker after
# its visibility timeout (chatjobs.queue); past that, an id still in the set is presumed lost.
_PRESUMED_LOST_AFTER = 3600.0


def _published_key() -> str:
    return f"chatjobs:published:{get_settings().queue_name}"


@lru_cache
def _redis() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=2)


def publish(job_ids: Sequence[uuid.UUID], *, express: Collection[uuid.UUID] = ()) -> None:
    """Publish one wake-up per job and record it. Call only after the rows have committed.
    The ``express`` ones go on the express queue, ahead of the broker's window.

    Recorded first, published second: a worker may take the message (and remove the record)
    the moment it is published, and a record written after that would say the broker holds
    a message it does not. Raises on a broker failure (the records are taken back): the
    caller logs it, and the reconciler finds the job unpublished.
    """
    if not job_ids:
        return
    recorded = True
    try:
        now = time.time()
        _redis().zadd(_published_key(), {str(job_id): now for job_id in job_ids})
    except redis.RedisError:
        # Unrecorded, the job looks lost and may get one more message: the claim is
        # conditional, so a duplicate costs a no-op task.
        recorded = False
        log.warning("publishing %d jobs without recording it", len(job_ids), exc_info=True)
    try:
        enqueue_jobs(job_ids, express=express)
    except Exception:
        if recorded:
            with contextlib.suppress(redis.RedisError):
                _redis().zrem(_published_key(), *(str(job_id) for job_id in job_ids))
        raise


def consumed(job_id: uuid.UUID) -> None:
    """A worker took this job's message: the broker no longer holds one for it. The record
    stays, marked taken (a negative score: minus the time), until the attempt is over, so
    a dispatcher can tell a job being claimed from one whose taker died before claiming."""
    try:
        _redis().zadd(_published_key(), {str(job_id): -time.time()})
    except redis.RedisError:
        log.debug("could not mark job %s consumed", job_id, exc_info=True)


def finished(job_id: uuid.UUID) -> None:
    """A worker is done with this job's message: drop its record and wake a dispatcher (a
    slot is free), in one round trip. Never raises."""
    try:
        pipe = _redis().pipeline(transaction=False)
        pipe.zrem(_published_key(), str(job_id))
        pipe.lpush(_poke_key(), 1)
        pipe.ltrim(_poke_key(), 0, 0)
        pipe.execute()
    except redis.RedisError:
        log.debug("could not close job %s's record; its tick will", job_id, exc_info=True)


def in_broker(job_ids: Sequence[uuid.UUID]) -> list[bool]:
    """For each job, whether the broker still holds an unconsumed message for it."""
    if not job_ids:
        return []
    scores = _redis().zmscore(_published_key(), [str(j) for j in job_ids])
    horizon = time.time() - _PRESUMED_LOST_AFTER
    return [score is not None and score > horizon for score in scores]


def waiting_in_broker() -> int:
    """How many published messages of this queue no worker has said it took (a gauge for
    operators and benchmarks; a record can outlive its message by a killed worker)."""
    horizon = time.time() - _PRESUMED_LOST_AFTER
    return int(_redis().zcount(_published_key(), horizon, "+inf"))


# --- waking the dispatcher ---------------------------------------------------------------


def _poke_key() -> str:
    return f"chatjobs:dispatch:{get_settings().queue_name}"


def poke() -> None:
    """Wake a dispatcher now: a job became runnable or a worker slot came free. A list of at
    most one element, so pokes while it works collapse into one more pass. Never raises:
    without it the dispatcher's tick still comes."""
    try:
        pipe = _redis().pipeline(transaction=False)
        pipe.lpush(_poke_key(), 1)
        pipe.ltrim(_poke_key(), 0, 0)
        pipe.execute()
    except redis.RedisError:
        log.debug("could not wake the dispatcher; its tick will", exc_info=True)


@lru_cache
def _waiting_redis() -> redis.Redis:
    # Its own client: a blocking pop must not share the short socket timeout of the others.
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=None)


def wait_for_poke(timeout: float) -> None:
    """Block until something pokes, or ``timeout`` seconds."""
    try:
        _waiting_redis().blpop([_poke_key()], timeout=timeout)
    except redis.RedisError:
        log.debug("dispatcher wait failed; sleeping instead", exc_info=True)
        time.sleep(timeout)


# --- worker slots ------------------------------------------------------------------------


def _slots_key() -> str:
    return f"chatjobs:slots:{get_settings().queue_name}"


def register_slots(worker: str, slots: int, ttl: float) -> None:
    """Say that this worker runs ``slots`` jobs at once, for the next ``ttl`` seconds."""
    _redis().hset(_slots_key(), worker, f"{slots}:{time.time() + ttl}")


def live_slots() -> int:
    """The job slots of the workers that registered and have not gone quiet."""
    now, total, gone = time.time(), 0, []
    for worker, value in _redis().hgetall(_slots_key()).items():
        slots, _, until = (value.decode() if isinstance(value, bytes) else value).partition(":")
        if float(until or 0) < now:
            gone.append(worker)
        else:
            total += int(slots)
    if gone:
        _redis().hdel(_slots_key(), *gone)
    return total


# --- admission ---------------------------------------------------------------------------

# The default priority of each class of job; a job's own ``priority`` replaces it.
PRIORITY_SINGLE = 0
PRIORITY_BATCH = -10
PRIORITY_BACKFILL = -20

# An admitted job missing from the broker's records this long after its admission was lost
# (a flush, a failed publish, a dispatcher killed between commit and publish): admitted again.
_LOST_AFTER = timedelta(seconds=10)
# Admitted jobs read per pass to count the broker's contents (more than any window).
_ADMITTED_READ = 5000
_MIN_WINDOW = 16

_ADMITTED = text(
    """
    SELECT id, tenant_id, model, cost, priority, updated_at < now() - :lost_after AS old
    FROM jobs
    WHERE queue = :queue AND status IN ('queued', 'retrying') AND next_attempt_at IS NULL
    LIMIT :limit
    """
)
# Tenants with waiting jobs: a skip scan of ix_jobs_ready, one probe per tenant.
_WAITING_TENANTS = text(
    """
    WITH RECURSIVE t AS (
      (SELECT tenant_id FROM jobs
       WHERE queue = :queue AND status IN ('queued', 'retrying') AND next_attempt_at IS NOT NULL
       ORDER BY tenant_id LIMIT 1)
      UNION ALL
      SELECT (SELECT j.tenant_id FROM jobs j
              WHERE j.queue = :queue AND j.status IN ('queued', 'retrying')
                AND j.next_attempt_at IS NOT NULL AND j.tenant_id > t.tenant_id
              ORDER BY j.tenant_id LIMIT 1)
      FROM t WHERE t.tenant_id IS NOT NULL
    )
    SELECT t.tenant_id, tn.weight, tn.max_inflight, tn.tpm_share, fs.served, fs.buckets
    FROM t
    JOIN tenants tn ON tn.id = t.tenant_id
    LEFT JOIN fair_shares fs ON fs.queue = :queue AND fs.tenant_id = t.tenant_id
    """
)
_HEADS = text(
    """
    SELECT h.id, h.tenant_id, h.priority, h.cost, h.model
    FROM unnest(CAST(:tenants AS uuid[]), CAST(:sizes AS int[])) AS t(tenant_id, size)
    CROSS JOIN LATERAL (
      SELECT j.id, j.tenant_id, j.priority, j.cost, j.model FROM jobs j
      WHERE j.queue = :queue AND j.tenant_id = t.tenant_id
        AND j.status IN ('queued', 'retrying')
        AND j.next_attempt_at IS NOT NULL AND j.next_attempt_at <= now()
        AND (j.deadline IS NULL OR j.deadline > now())
        -- Offload-eligible jobs are the offload gather's (chatjobs.offload.service).
        AND NOT EXISTS (
          SELECT 1 FROM unnest(CAST(:off_models AS text[]), CAST(:off_mins AS float8[]))
            AS o(model, secs)
          WHERE o.model = j.model AND NOT j.needs_plan AND j.offload_refused IS NOT TRUE
            AND j.deadline >= now() + make_interval(secs => o.secs))
      ORDER BY j.priority DESC, j.id
      LIMIT t.size
    ) h
    """
)
_RUNNING = text(
    """
    SELECT tenant_id, count(*) AS n FROM jobs
    WHERE queue = :queue AND status = 'running' AND lease_expires_at IS NOT NULL
      AND tenant_id = ANY(CAST(:tenants AS uuid[]))
      -- Offloaded jobs wait on a provider's batch, not on this system's slots.
      AND (claimed_by IS NULL OR claimed_by NOT LIKE 'offload:%')
    GROUP BY tenant_id
    """
)
_ADMIT = text(
    """
    UPDATE jobs SET next_attempt_at = NULL, updated_at = now()
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('queued', 'retrying')
      AND next_attempt_at IS NOT NULL
    RETURNING id
    """
)
_READMIT = text(
    """
    UPDATE jobs SET next_attempt_at = now(), updated_at = now()
    WHERE id = ANY(CAST(:ids AS uuid[])) AND status IN ('queued', 'retrying')
      AND next_attempt_at IS NULL AND updated_at < now() - :lost_after
    RETURNING id
    """
)
_SAVE_SHARES = text(
    """
    INSERT INTO fair_shares (queue, tenant_id, served, buckets)
    SELECT :queue, s.tenant_id, s.served, s.buckets
    FROM unnest(CAST(:tenants AS uuid[]), CAST(:served AS float8[]), CAST(:buckets AS jsonb[]))
      AS s(tenant_id, served, buckets)
    ON CONFLICT (queue, tenant_id)
    DO UPDATE SET served = excluded.served, buckets = excluded.buckets
    """
)
_SAVE_CLOCK = text(
    """
    INSERT INTO fair_clocks (queue, vtime) VALUES (:queue, :vtime)
    ON CONFLICT (queue) DO UPDATE SET vtime = excluded.vtime
    """
)


@dataclass(frozen=True)
class Admitted:
    """What one dispatcher pass did: the jobs admitted (to publish once committed, in this
    order; the ``express`` ones outrank a job the broker already holds, so they go on the
    express queue), the room it had, and whether a tenant may have more waiting than it read."""

    ids: list[uuid.UUID]
    room: int
    more: bool
    readmitted: int = 0
    express: frozenset[uuid.UUID] = frozenset()


def _lock_key(queue: str) -> int:
    # One dispatcher at a time per queue: the fair-share state is read and written whole.
    digest = hashlib.sha256(f"chatjobs-dispatch:{queue}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def window() -> int:
    """Messages the broker should hold: the live worker slots (or the setting)."""
    configured = get_settings().dispatch_window
    return configured or max(_MIN_WINDOW, live_slots())


def admit(*, session: Session, now: float | None = None) -> Admitted:
    """Admit the next waiting jobs in fair order, as many as the broker has room for.

    Holds a transaction-scoped advisory lock: with several dispatchers running, one passes
    at a time and the others skip (they are there for when this one's process dies). The
    caller publishes ``ids`` after the commit.
    """
    settings = get_settings()
    queue = settings.queue_name
    if not session.scalar(select(func.pg_try_advisory_xact_lock(_lock_key(queue)))):
        return Admitted([], 0, False)
    now = time.time() if now is None else now

    admitted = session.execute(
        _ADMITTED, {"queue": queue, "limit": _ADMITTED_READ, "lost_after": _LOST_AFTER}
    ).all()
    lost = set(_lost([row.id for row in admitted if row.old], now))
    readmitted = 0
    if lost:
        readmitted = len(
            session.execute(_READMIT, {"ids": list(lost), "lost_after": _LOST_AFTER}).all()
        )
        log.warning("%d admitted jobs had no broker message; admitting them again", readmitted)
    waiting = [row for row in admitted if row.id not in lost]
    room = window() - len(waiting)
    if room <= 0:
        return Admitted([], room, False, readmitted)

    tenant_rows = session.execute(_WAITING_TENANTS, {"queue": queue}).all()
    if not tenant_rows:
        return Admitted([], room, False, readmitted)
    tenants = {row.tenant_id: _state(row, settings, now) for row in tenant_rows}
    caps = _inflight_room(session, queue, tenant_rows, waiting, settings)
    for tenant_id, cap in caps.items():
        tenants[tenant_id].inflight_room = cap
    sizes = fairness.head_sizes({t: s.weight for t, s in tenants.items()}, room, caps)
    sizes = {t: n for t, n in sizes.items() if n > 0}
    heads: dict[uuid.UUID, list[fairness.Candidate]] = {t: [] for t in sizes}
    if sizes:
        offload = offload_routes()
        rows = session.execute(
            _HEADS,
            {
                "queue": queue,
                "tenants": list(sizes),
                "sizes": list(sizes.values()),
                "off_models": [route.model for route in offload],
                "off_mins": [float(route.offload_min_deadline) for route in offload],
            },
        ).all()
        for row in rows:
            heads[row.tenant_id].append(fairness.Candidate(*row))
    for tenant_id, jobs in heads.items():
        _open_buckets(tenants[tenant_id], {job.model for job in jobs})
    vtime = session.scalar(
        text("SELECT vtime FROM fair_clocks WHERE queue = :queue"), {"queue": queue}
    )
    choice = fairness.choose(
        heads,
        tenants,
        room=room,
        vtime=vtime or 0.0,
        routes=_route_rooms(waiting, heads, settings),
        route_of=lambda model: route_for(model).limit_key,
    )
    more = any(len(heads[t]) == sizes[t] for t in heads)
    if not choice.jobs:
        return Admitted([], room, more, readmitted)
    ids = list(session.scalars(_ADMIT, {"ids": [job.id for job in choice.jobs]}))
    kept = set(ids)
    order = [job.id for job in choice.jobs if job.id in kept]
    # The broker's list is FIFO: a job above the lowest priority it holds would wait behind
    # a window of lesser work (a second or more), so it takes the express queue instead.
    floor = min((row.priority for row in waiting), default=None)
    express = frozenset(
        job.id
        for job in choice.jobs
        if job.id in kept and floor is not None and job.priority > floor
    )
    served = sorted({job.tenant_id for job in choice.jobs})
    session.execute(
        _SAVE_SHARES,
        {
            "queue": queue,
            "tenants": served,
            "served": [tenants[t].served for t in served],
            "buckets": [_buckets_json(tenants[t], now) for t in served],
        },
    )
    session.execute(_SAVE_CLOCK, {"queue": queue, "vtime": choice.vtime})
    return Admitted(order, room, more, readmitted, express)


# Job ids whose record says "published" but whose message was not in the broker's list,
# with when that was first seen: lost only if still so at a later read (a worker between
# taking a message and marking it taken is not mistaken for a dead one).
_suspects: dict[uuid.UUID, float] = {}
_SUSPECT_FOR = 2.0
_LIST_READ = 10_000


def _lost(job_ids: list[uuid.UUID], now: float) -> list[uuid.UUID]:
    """Of admitted jobs untouched for a while, those whose message is gone.

    Its record tells: none (a flush, or a publish that failed), or taken by a worker that
    never claimed the job (it died between the two), or published and no longer in the
    broker's list (taken by a worker that died before marking it). The list is short, as the
    dispatcher keeps it to a window, so it is read whole, and only when a record says
    published for longer than ``_LOST_AFTER``.
    """
    if not job_ids:
        _suspects.clear()
        return []
    scores = _redis().zmscore(_published_key(), [str(j) for j in job_ids])
    lost, published = [], []
    for job_id, score in zip(job_ids, scores, strict=True):
        if score is None or (score < 0 and now + score > _LOST_AFTER.total_seconds()):
            lost.append(job_id)
        elif score > 0:
            published.append(job_id)
    if published:
        settings = get_settings()
        pipe = _redis().pipeline(transaction=False)
        for name in (settings.queue_name, express_queue(settings)):
            pipe.lrange(name, 0, _LIST_READ - 1)
        messages = [m for listed in pipe.execute() for m in listed]
        queued = b"\0".join(m if isinstance(m, bytes) else m.encode() for m in messages)
        gone = {job_id for job_id in published if str(job_id).encode() not in queued}
        for job_id in list(_suspects):
            if job_id not in gone:
                del _suspects[job_id]
        for job_id in gone:
            if now - _suspects.setdefault(job_id, now) >= _SUSPECT_FOR:
                lost.append(job_id)
    return lost


def _state(row: Any, settings: Settings, now: float) -> fairness.TenantState:
    """A waiting tenant's standing: its weight, served figure and TPM-share buckets."""
    state = fairness.TenantState(
        weight=row.weight or settings.tenant_weight, served=row.served or 0.0
    )
    if row.tpm_share:
        for model, (tokens, at) in (row.buckets or {}).items():
            capacity = _share_capacity(model, row.tpm_share)
            if capacity is not None:
                state.capacity[model] = capacity
                state.tokens[model] = fairness.refill(tokens, now - at, capacity)
        state.share = row.tpm_share
    return state


def _open_buckets(state: fairness.TenantState, models: set[str]) -> None:
    """A full bucket for each model the tenant has a share of and no bucket for yet."""
    if state.share is None:
        return
    for model in models - set(state.tokens):
        capacity = _share_capacity(model, state.share)
        if capacity is not None:
            state.capacity[model] = state.tokens[model] = capacity


def _share_capacity(model: str, share: float) -> float | None:
    tpm = route_for(model).limits.tpm
    return None if tpm is None else share * tpm


def _buckets_json(state: fairness.TenantState, now: float) -> str | None:
    if not state.tokens:
        return None
    return json.dumps({model: [tokens, now] for model, tokens in state.tokens.items()})


def _inflight_room(
    session: Session,
    queue: str,
    tenant_rows: Sequence[Any],
    waiting: Sequence[Any],
    settings: Settings,
) -> dict[uuid.UUID, int]:
    """For each waiting tenant with a cap on jobs in flight, how many more it may have."""
    caps = {}
    for row in tenant_rows:
        cap = row.max_inflight if row.max_inflight is not None else settings.tenant_max_inflight
        if cap:
            caps[row.tenant_id] = cap
    if not caps:
        return {}
    inflight: dict[uuid.UUID, int] = dict.fromkeys(caps, 0)
    for row in waiting:
        if row.tenant_id in inflight:
            inflight[row.tenant_id] += 1
    for row in session.execute(_RUNNING, {"queue": queue, "tenants": list(caps)}):
        inflight[row.tenant_id] += row.n
    return {t: max(0, cap - inflight[t]) for t, cap in caps.items()}


def _route_rooms(
    waiting: Sequence[Any], heads: dict[uuid.UUID, list[fairness.Candidate]], settings: Settings
) -> dict[str, fairness.RouteRoom]:
    """The room of each rate-limited route among the candidates: about
    ``dispatch_lookahead_seconds`` of its rate, less what the broker already holds for it."""
    models = {job.model for jobs in heads.values() for job in jobs}
    rooms: dict[str, fairness.RouteRoom] = {}
    ahead = settings.dispatch_lookahead_seconds
    for model in models:
        route = route_for(model)
        limits = route.limits
        if route.limit_key in rooms or not (limits.rpm or limits.tpm):
            continue
        share = ahead / limits.window_seconds  # of a window's limit, admitted ahead
        rooms[route.limit_key] = fairness.RouteRoom(
            requests=None if limits.rpm is None else max(1, math.ceil(limits.rpm * share)),
            tokens=None if limits.tpm is None else limits.tpm * share,
        )
    for row in waiting:
        room = rooms.get(route_for(row.model).limit_key)
        if room is None:
            continue
        room.empty = False
        if room.requests is not None:
            room.requests -= 1
        if room.tokens is not None:
            room.tokens -= row.cost
    return rooms


def find_lost(
    *, session: Session, after: uuid.UUID | None, limit: int
) -> tuple[int, uuid.UUID | None]:
    """Make eligible again the admitted jobs whose message is gone, scanning ``limit`` of them
    after the id ``after``; returns (how many were lost, where the next scan starts: None to
    wrap). ``admit`` repairs the ones it reads each pass; this walks all of them.

    Only jobs untouched for ``stale_queued_seconds`` are looked at, so a job published a
    moment ago is never mistaken for lost. The scan walks the whole backlog a page per pass
    rather than re-reading its oldest page forever.
    """
    settings = get_settings()
    stmt = select(Job.id).where(
        Job.queue == settings.queue_name,
        Job.status.in_(PENDING),
        Job.next_attempt_at.is_(None),
        Job.updated_at < func.now() - timedelta(seconds=settings.stale_queued_seconds),
    )
    if after is not None:
        stmt = stmt.where(Job.id > after)
    ids = list(session.scalars(stmt.order_by(Job.id).limit(limit)))
    if not ids:
        return 0, None
    lost = [job_id for job_id, held in zip(ids, in_broker(ids), strict=True) if not held]
    if lost:
        # Eligible now: the dispatcher admits them again. Fenced on the same conditions, so a job
        # that a worker claimed meanwhile is left alone.
        session.execute(
            update(Job)
            .where(Job.id.in_(lost), Job.status.in_(PENDING), Job.next_attempt_at.is_(None))
            .values(next_attempt_at=func.now(), updated_at=func.now())
            .execution_options(synchronize_session=False)
        )
    return len(lost), (ids[-1] if len(ids) == limit else None)
