"""The order of admission, as a pure function: priority first, then weighted fair share
between tenants in estimated tokens, then each tenant's own order (oldest first).

Fair share is start-time fair queueing over virtual time: each tenant carries ``served``,
the estimated tokens admitted for it divided by its weight, and the next job to go is the
one whose tenant is least served before it (its start tag, ``served``; the job's own cost
counts once it has gone). A tenant that was idle, or held back by a cap, rejoins at the
queue's virtual time (the start of the last job admitted) rather than at its old, lower
figure: waiting never banks credit, so a tenant back from a quiet hour cannot take the whole
upstream until it has "caught up".

Ordering by start tag is what makes that rejoining rule safe across passes: the virtual time
never passes the start tag of a tenant still waiting in line, so a tenant whose next job is
large is not pushed back each pass. (Ordered by finish tag, ``served + cost / weight``, a job
costing more than a whole pass of the others' never went while they had a backlog.)

Caps hold a tenant back without failing anything: ``max_inflight`` (jobs admitted or
running), its share of a model's TPM (a token bucket refilled at share x TPM per minute),
and the route's own room (about a second of a rate-limited model's rate ahead of its calls).
"""

from __future__ import annotations

import heapq
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    """A job waiting for admission, as the dispatcher reads it."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    priority: int
    cost: int
    model: str


@dataclass
class TenantState:
    """A tenant's standing in one pass (changed as its jobs are admitted)."""

    weight: int
    served: float
    # Jobs it may still have admitted in this pass (None: no cap).
    inflight_room: int | None = None
    # model -> tokens left in its TPM-share bucket (a model missing: no share applies).
    tokens: dict[str, float] = field(default_factory=dict)
    # model -> the bucket's size (a job larger than a whole bucket goes when it is full).
    capacity: dict[str, float] = field(default_factory=dict)
    # The fraction of each model's TPM the tenant may use (None: no share of its own).
    share: float | None = None


@dataclass
class RouteRoom:
    """What one rate-limited route may still take in this pass (None: not limited)."""

    requests: int | None = None
    tokens: float | None = None
    # Whether the route has nothing admitted yet (one job always fits an empty route).
    empty: bool = True


@dataclass(frozen=True)
class Choice:
    """The jobs to admit, in order, and the queue's virtual time after them."""

    jobs: list[Candidate]
    vtime: float


def choose(
    heads: Mapping[uuid.UUID, Sequence[Candidate]],
    tenants: dict[uuid.UUID, TenantState],
    *,
    room: int,
    vtime: float,
    routes: dict[str, RouteRoom],
    route_of: Callable[[str], str],
) -> Choice:
    """Pick up to ``room`` jobs from each tenant's waiting jobs (``heads``, in the tenant's
    own order), updating ``tenants`` and ``routes`` in place."""
    heap: list[tuple[int, float, int, uuid.UUID]] = []
    position: dict[uuid.UUID, int] = {}
    order = 0

    def push(tenant_id: uuid.UUID) -> None:
        nonlocal order
        jobs, state = heads[tenant_id], tenants[tenant_id]
        i = position[tenant_id]
        if i >= len(jobs) or state.inflight_room == 0:
            return
        job = jobs[i]
        order += 1
        heapq.heappush(heap, (-job.priority, state.served, order, tenant_id))

    for tenant_id in heads:
        state = tenants[tenant_id]
        state.served = max(state.served, vtime)  # rejoining never banks credit
        position[tenant_id] = 0
        push(tenant_id)

    chosen: list[Candidate] = []
    while heap and len(chosen) < room:
        _, _, _, tenant_id = heapq.heappop(heap)
        state = tenants[tenant_id]
        job = heads[tenant_id][position[tenant_id]]
        position[tenant_id] += 1
        if _fits(job, state, routes.get(route_of(job.model))):
            vtime = max(vtime, state.served)
            state.served += job.cost / state.weight
            if state.inflight_room is not None:
                state.inflight_room -= 1
            chosen.append(job)
        push(tenant_id)
    return Choice(chosen, vtime)


def _fits(job: Candidate, tenant: TenantState, route: RouteRoom | None) -> bool:
    """Whether the job fits its route's room and its tenant's share; takes the room if so."""
    if route is not None:
        if route.requests is not None and route.requests < 1:
            return False
        if route.tokens is not None and route.tokens < job.cost and not route.empty:
            return False
    left = tenant.tokens.get(job.model)
    if left is not None and left < job.cost and left < tenant.capacity[job.model]:
        return False
    if route is not None:
        if route.requests is not None:
            route.requests -= 1
        if route.tokens is not None:
            route.tokens -= job.cost
        route.empty = False
    if left is not None:
        tenant.tokens[job.model] = left - job.cost
    return True


def head_sizes(
    weights: Mapping[uuid.UUID, int], room: int, caps: Mapping[uuid.UUID, int]
) -> dict[uuid.UUID, int]:
    """How many waiting jobs to read per tenant for a pass of ``room``: about twice its fair
    part, at least a few, never more than the room or its cap (so a pass reads O(room) rows
    however many tenants wait); a tenant that uses them all is read again next pass."""
    total = sum(weights.values()) or 1
    sizes = {}
    for tenant_id, weight in weights.items():
        size = min(room, max(4, math.ceil(2 * room * weight / total)))
        cap = caps.get(tenant_id)
        sizes[tenant_id] = size if cap is None else min(size, cap)
    return sizes


def refill(tokens: float, elapsed: float, capacity: float) -> float:
    """A TPM-share bucket after ``elapsed`` seconds: refilled at ``capacity`` a minute."""
    return min(capacity, tokens + max(0.0, elapsed) * capacity / 60.0)
