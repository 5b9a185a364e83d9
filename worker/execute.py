"""One attempt of a job: claim, call the upstream, record the call, write the outcome."""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from chatjobs import deliveries, files, jobs, longcontext, metrics, ui_sessions
from chatjobs.batches import service as batches
from chatjobs.db import session_scope
from chatjobs.errors import ContextTooLong, LeaseLost, UpstreamError, is_retryable
from chatjobs.longcontext import Plan
from chatjobs.queue import enqueue_deliveries
from chatjobs.routing import Route, model_spec, output_budget, route_for
from chatjobs.schemas import LongContext
from chatjobs.settings import get_settings
from chatjobs.tokens import count_messages
from chatjobs.upstream import Completion
from worker.runtime import Runtime, get_runtime

log = logging.getLogger("chatjobs.worker")
T = TypeVar("T")


def run_job(job_id: uuid.UUID) -> str:
    """Run the job if it is due and unclaimed; returns what happened, for logs and tests.

    Whatever happened, a slot is free again: the dispatcher is woken to fill it.
    """
    try:
        return _run_job(job_id)
    finally:
        jobs.finished(job_id)


def _run_job(job_id: uuid.UUID) -> str:
    jobs.consumed(job_id)
    runtime = get_runtime()
    claim = _with_db_retry(
        lambda session: jobs.claim_job(session=session, job_id=job_id, worker=runtime.worker_id)
    )
    if claim is None:
        log.info("job %s: nothing to claim (finished, cancelled or held by another)", job_id)
        return "skipped"
    try:
        if claim.needs_plan:
            planned = _plan(claim)
            if planned.claim is None:
                return planned.outcome
            claim = planned.claim
        return _run_claimed(runtime, claim)
    except Exception as exc:
        # A bug or an outage inside chatjobs (not at the upstream): the attempt is recorded
        # as failed, instead of waiting out its lease and looking like a dead worker.
        log.exception("job %s attempt %d: unexpected error", claim.job_id, claim.attempt)
        message = f"chatjobs could not run this attempt: {type(exc).__name__}"
        outcome = _with_db_retry(
            lambda session: jobs.fail_attempt(
                session=session,
                claim=claim,
                message=message,
                retry_in=retry_delay(claim.attempt, None),
            )
        )
        if outcome.status == "retrying":
            metrics.inc("chatjobs_retries", "internal")
        return outcome.status


def _plan(claim: jobs.Claim) -> jobs.Planned:
    """Plan a job too large to plan in the API: count, then fit, truncate, chunk or fail."""
    request, options, max_calls = _with_db_retry(
        lambda session: jobs.load_for_plan(session=session, claim=claim)
    )
    try:
        made: Plan | ContextTooLong = longcontext.plan(
            request,
            claim.model,
            LongContext.model_validate(_strategy_options(options)),
            max_calls=max_calls,
        )
    except ContextTooLong as exc:
        made = exc
    planned = _with_db_retry(
        lambda session: jobs.apply_plan(session=session, claim=claim, plan=made, options=options)
    )
    return planned


def _strategy_options(options: dict[str, Any]) -> dict[str, Any]:
    return {k: options[k] for k in ("strategy", "map_prompt", "reduce_prompt") if k in options}


def _run_claimed(runtime: Runtime, claim: jobs.Claim) -> str:
    route = route_for(claim.model)
    limited = bool(route.limits.rpm or route.limits.tpm or route.limits.max_concurrency)
    if not limited:
        return _call(runtime, claim, route)
    settings = get_settings()
    call_id = _call_id(claim)
    ticket = _take_ticket(runtime, claim)
    if ticket is not None:
        # Capacity was reserved when this job was deferred: no second acquire.
        reserved, wait = ticket
        if wait > settings.limiter_max_wait_seconds:  # woken early: keep the slot, wait more
            return _defer(runtime, claim, True, reserved, wait, "reserved slot")
    else:
        reserved = reservation(claim)
        # Without a concurrency cap a far slot is reserved now and the job deferred to it
        # (a "ticket"), so a deep backlog is not claimed and deferred over and over; a cap
        # cannot be held across a deferral, so capped routes ask again instead.
        horizon = settings.limiter_max_wait_seconds
        if not route.limits.max_concurrency:
            horizon = max(horizon, route.limits.window_seconds * _TICKET_WINDOWS)
        decision = runtime.limiter.acquire(
            route.limit_key,
            route.limits,
            tokens=reserved,
            call_id=call_id,
            max_wait=horizon,
            lease_seconds=settings.lease_seconds,
        )
        wait = decision.wait
        if not decision.granted or wait > settings.limiter_max_wait_seconds:
            return _defer(runtime, claim, decision.granted, reserved, wait, decision.reason)
    waiting = time.monotonic()
    try:
        if wait > 0:
            time.sleep(wait)
        go = runtime.limiter.start(
            route.limit_key,
            route.limits,
            tokens=reserved,
            max_wait=settings.limiter_max_wait_seconds,
        )
        if not go.granted:  # a long cool-down began meanwhile: the slot is lost, ask again
            return _defer(runtime, claim, False, reserved, go.wait, go.reason)
        waited = time.monotonic() - waiting
        metrics.observe("chatjobs_limiter_wait_seconds", waited, metrics.model(claim.model))
        return _call(runtime, claim, route, reserved=reserved, limiter_wait=waited)
    finally:
        _advisory("release", lambda: runtime.limiter.release(route.limit_key, call_id))


def _call_id(claim: jobs.Claim) -> str:
    return f"{claim.job_id}:{claim.claim_seq}"


# How far ahead (in limit windows) a deferred job may hold a reserved slot.
_TICKET_WINDOWS = 30


def _ticket_key(job_id: uuid.UUID) -> str:
    return f"chatjobs:ticket:{job_id}"


def _take_ticket(runtime: Runtime, claim: jobs.Claim) -> tuple[int, float] | None:
    """The reservation a deferred job holds: (tokens, seconds until its slot)."""
    raw = runtime.redis.getdel(_ticket_key(claim.job_id))
    if raw is None:
        return None
    tokens, slot = json.loads(raw)
    return int(tokens), max(0.0, float(slot) - time.time())


def _defer(
    runtime: Runtime,
    claim: jobs.Claim,
    reserved_slot: bool,
    tokens: int,
    wait: float,
    reason: str,
) -> str:
    """Hand the job back until its slot (or until capacity is worth asking for again)."""
    settings = get_settings()
    route = route_for(claim.model)
    runtime.limiter.release(route.limit_key, _call_id(claim))
    delay = wait
    if reserved_slot:
        runtime.redis.set(
            _ticket_key(claim.job_id),
            json.dumps([tokens, time.time() + wait]),
            ex=int(wait) + 3600,
        )
        # Come back a little before the slot; the remaining wait is slept in the slot.
        delay = max(0.0, wait - settings.limiter_max_wait_seconds / 2)
    deferred = _with_db_retry(
        lambda session: jobs.defer_job(session=session, claim=claim, delay=delay)
    )
    log.info("job %s: no %s capacity for %.1fs, deferred", claim.job_id, reason, wait)
    if deferred:
        reason = reason.replace(" ", "_") if reason in _DEFERRAL_REASONS else "other"
        metrics.inc("chatjobs_limiter_deferrals", metrics.model(claim.model), reason)
    return "deferred" if deferred else "stale"


# The limiter's reasons (chatjobs.limiter.Decision) and a reserved slot still far off.
_DEFERRAL_REASONS = frozenset({"requests", "tokens", "concurrency", "cooldown", "reserved slot"})


def reservation(claim: jobs.Claim) -> int:
    """Tokens a call may use: its prompt and the output it may ask for.

    The actual usage corrects the reservation once the call returns.
    """
    spec = model_spec(claim.model)
    prompt = claim.prompt_tokens
    if prompt is None:
        prompt = count_messages(claim.request.get("messages") or [], spec).tokens
    return prompt + output_budget(claim.request, spec)


def _advisory(what: str, work: Callable[[], object]) -> None:
    """Limiter bookkeeping and events: useful, never worth losing or repeating a call for."""
    try:
        work()
    except Exception:
        log.warning("%s failed (advisory; the outcome is already recorded)", what, exc_info=True)


def _call(
    runtime: Runtime,
    claim: jobs.Claim,
    route: Route,
    *,
    reserved: int | None = None,
    limiter_wait: float | None = None,
) -> str:
    started = time.monotonic()
    if claim.attempt == 1:
        metrics.observe(
            "chatjobs_queue_wait_seconds",
            claim.age_seconds + started - claim.claimed_at,
            _kind(claim),
            metrics.model(claim.model),
        )
    completion: Completion | None = None
    err: UpstreamError | None = None
    try:
        completion = runtime.call(claim, route)
    except LeaseLost:
        pass
    except UpstreamError as exc:
        err = exc
    # The outcome of a paid call is written first; limiter bookkeeping after, and its
    # failures (Redis down, an odd usage) cannot lose or repeat the call.
    outcome = _record_outcome(claim, completion, err, time.monotonic() - started, limiter_wait)
    if reserved is not None:
        limits, key = route.limits, route.limit_key
        if err is not None and err.status_code == 429:
            # Every worker backs off at once, for as long as the upstream asked; without a
            # Retry-After, only until one call's share of the interval has passed.
            pause = err.retry_after
            if pause is None:
                pause = limits.pause_after_429(reserved)
            _advisory("cool-down", lambda: runtime.limiter.cool_down(key, pause))
        if completion is not None:
            usage = jobs.clean_usage(completion.usage) or {}
            actual = usage.get("total_tokens", reserved)
            if completion.cached:
                # A gateway cache answered: the provider counted no tokens against the limit.
                actual = 0
            _advisory(
                "limiter correction",
                lambda: runtime.limiter.correct(
                    key, limits, reserved_tokens=reserved, actual_tokens=actual
                ),
            )
            _advisory(
                "limiter headers",
                lambda: runtime.limiter.observe(key, limits, completion.ratelimit),
            )
    return outcome


def _log_call(claim: jobs.Claim, call: jobs.Call, limiter_wait: float | None) -> None:
    """The one line per upstream attempt: ids, status, latency, tokens; never the prompt."""
    log.info(
        "upstream call %s attempt %d: %s",
        claim.model,
        claim.attempt,
        call.status_code if call.status_code is not None else "no answer",
        extra={
            "job_id": str(claim.job_id),
            "batch_id": claim.batch_id,
            "schedule_id": claim.schedule_id,
            "tenant": str(claim.tenant_id) if claim.tenant_id else None,
            "attempt": claim.attempt,
            "model": claim.model,
            "upstream_request_id": call.request_id,
            "status": call.status_code,
            "latency_ms": call.latency_ms,
            "tokens": (jobs.clean_usage(call.usage) or {}).get("total_tokens"),
            "limiter_wait_ms": None if limiter_wait is None else int(limiter_wait * 1000),
            "error": call.error,
        },
    )


def _kind(claim: jobs.Claim) -> str:
    return metrics.job_kind(claim.parent_id, claim.batch_id, claim.schedule_id)


def _count_call(
    claim: jobs.Claim, call: jobs.Call, completion: Completion | None, err: UpstreamError | None
) -> None:
    """The call's metrics: how it ended, how long it took, the tokens it used."""
    model = metrics.model(claim.model)
    status = metrics.status_class(call.status_code, err.type if err else None)
    metrics.inc("chatjobs_upstream_requests", model, status)
    metrics.observe("chatjobs_upstream_latency_seconds", call.latency_ms / 1000, model)
    if completion is None:
        return
    if completion.ttft_ms is not None:
        metrics.observe("chatjobs_upstream_ttft_seconds", completion.ttft_ms / 1000, model)
    tenant = metrics.tenant(claim.tenant_id)
    for kind, tokens in token_counts(completion).items():
        metrics.inc("chatjobs_tokens", model, kind, tenant, amount=tokens)


def token_counts(completion: Completion) -> dict[str, int]:
    """Prompt and completion tokens, and the cached and reasoning tokens among them where the
    upstream reports them (OpenAI's usage details); an odd shape counts as none.

    A call a gateway answered from its cache cost the provider nothing: its tokens count as
    ``gateway_cached`` only, never as prompt or completion tokens."""
    if completion.cached:
        return {"gateway_cached": completion.usage.get("total_tokens", 0)}
    return metrics.usage_tokens(completion.usage, completion.body.get("usage"))


def _record_outcome(
    claim: jobs.Claim,
    completion: Completion | None,
    err: UpstreamError | None,
    elapsed: float,
    limiter_wait: float | None = None,
) -> str:
    """Log the call and write what came of it, fenced on the claim, in one transaction."""
    if completion is not None:
        call = jobs.Call(
            stream=bool(claim.request.get("stream")),
            latency_ms=completion.latency_ms,
            status_code=completion.status_code,
            usage=completion.usage,
            request_id=completion.request_id,
            error=None,
            cached=completion.cached,
            usage_estimated=completion.usage_estimated,
        )
    else:
        call = jobs.Call(
            stream=bool(claim.request.get("stream")),
            latency_ms=int(elapsed * 1000),
            status_code=err.status_code if err else None,
            usage=None,
            request_id=err.request_id if err else None,
            error=err.message
            if err
            else "abandoned: the job was cancelled, expired or re-run while the call ran",
        )
    _log_call(claim, call, limiter_wait)
    _advisory("metrics", lambda: _count_call(claim, call, completion, err))
    retry_in = None
    if err is not None and is_retryable(err) and claim.attempt < claim.max_attempts:
        retry_in = retry_delay(claim.attempt, err.retry_after)
    outcome = _with_db_retry(
        lambda session: jobs.record_outcome(
            session=session,
            claim=claim,
            call=call,
            result=completion.body if completion else None,
            error=err,
            retry_in=retry_in,
        )
    )
    if outcome.status == "retrying" and err is not None:
        reason = metrics.status_class(err.status_code, err.type)
        if err.type == "upstream_malformed_response":
            reason = "malformed"
        metrics.inc("chatjobs_retries", reason)
    if outcome.status == "stale":
        log.warning(
            "job %s attempt %d: result refused, the job moved on without it",
            claim.job_id,
            claim.attempt,
        )
    return outcome.status


def _with_db_retry(work: Callable[[Session], T]) -> T:
    """Run one transaction, retrying while Postgres is unreachable, for up to one lease.

    The upstream call has been paid for: losing its outcome to a database restart would
    cost a second call. Past one lease the job is someone else's anyway.
    """
    deadline = time.monotonic() + get_settings().lease_seconds
    delay = 0.5
    while True:
        try:
            with session_scope() as session:
                return work(session)
        except DBAPIError as exc:
            if not (exc.connection_invalidated or isinstance(exc, OperationalError)):
                raise
            if time.monotonic() + delay > deadline:
                raise
            log.warning("database unreachable, retrying the write in %.1fs", delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def retry_delay(attempt: int, retry_after: float | None) -> float:
    """Exponential backoff with full jitter, never sooner than the upstream's Retry-After."""
    settings = get_settings()
    backoff = random.uniform(
        0, min(settings.retry_cap_seconds, settings.retry_base_seconds * 2 ** (attempt - 1))
    )
    if retry_after is None:
        return backoff
    return max(backoff, min(retry_after, settings.retry_after_cap_seconds))


def dispatch_due(*, with_deliveries: bool = True) -> jobs.Admitted:
    """One dispatcher pass: admit the next jobs in fair order and, ``with_deliveries``,
    publish the webhook deliveries whose delay is over; rows first, then messages."""
    with session_scope() as session:
        admitted = jobs.admit(session=session)
        due_deliveries = deliveries.take_due(session) if with_deliveries else []
    if admitted.ids:
        try:
            jobs.publish(admitted.ids, express=admitted.express)
        except Exception:
            # Admitted and unpublished: the next pass finds them missing from the broker.
            log.exception("%d jobs admitted but not published", len(admitted.ids))
    if due_deliveries:
        enqueue_deliveries(due_deliveries)
    return admitted


def reconcile() -> jobs.Reconciled:
    """One reconciler pass (see chatjobs.jobs.reconcile)."""
    with session_scope() as session:
        done = jobs.reconcile(session=session)
        deliveries.reconcile(session)
    batches.sweep()
    lost_leases = done.requeued_lost_lease + done.failed_lost_lease
    metrics.inc("chatjobs_recovered", "lost_lease", amount=lost_leases)
    metrics.inc("chatjobs_recovered", "lost_message", amount=done.republished)
    if any(vars(done).values()):
        log.info("reconciled: %s", done)
        jobs.poke()
    return done


def prune() -> int:
    """Retention: finished jobs older than CHATJOBS_RETENTION_DAYS go, with all they own;
    so do expired batches' outputs, expired files and expired console sessions."""
    deleted = jobs.prune(older_than=timedelta(days=get_settings().retention_days))
    gone = batches.prune()
    if gone:
        log.info("pruned %d batches past their output expiry", gone)
    expired = files.prune()
    if expired:
        log.info("pruned %d expired files", expired)
    with session_scope() as session:
        ended = ui_sessions.prune_expired(session=session)
    if ended:
        log.info("pruned %d expired console sessions", ended)
    if deleted:
        log.info("pruned %d finished jobs", deleted)
    return deleted
