"""The order of admission as a pure function (chatjobs.jobs.fairness): priority, weighted fair
share in estimated tokens, each tenant's own order, and the caps that hold a tenant back.

Long runs go through ``Dispatcher``, which carries state between passes as
chatjobs.jobs.dispatch does: the queue's virtual time, and ``served`` saved only for the
tenants a pass admitted something for.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import count

import pytest

from chatjobs.jobs import fairness
from chatjobs.jobs.fairness import Candidate, RouteRoom, TenantState

A, B, C = (uuid.UUID(int=n) for n in (1, 2, 3))
_ids = count(1)


def jobs(
    tenant: uuid.UUID, n: int, *, cost: int = 100, priority: int = 0, model: str = "m"
) -> list[Candidate]:
    """``n`` waiting jobs of one tenant, in the order it submitted them."""
    return [Candidate(uuid.UUID(int=next(_ids)), tenant, priority, cost, model) for _ in range(n)]


def choose(
    heads: Mapping[uuid.UUID, list[Candidate]],
    tenants: dict[uuid.UUID, TenantState] | None = None,
    *,
    room: int = 100,
    vtime: float = 0.0,
    routes: dict[str, RouteRoom] | None = None,
) -> fairness.Choice:
    tenants = tenants if tenants is not None else {t: TenantState(1, 0.0) for t in heads}
    return fairness.choose(
        heads, tenants, room=room, vtime=vtime, routes=routes or {}, route_of=lambda m: m
    )


def tenants_of(choice: fairness.Choice) -> list[uuid.UUID]:
    return [job.tenant_id for job in choice.jobs]


@dataclass
class Dispatcher:
    """Passes of ``choose`` over endless backlogs, with the state kept between passes."""

    weights: dict[uuid.UUID, int]
    cost: dict[uuid.UUID, int]
    vtime: float = 0.0
    served: dict[uuid.UUID, float] = field(default_factory=dict)
    jobs: Counter[uuid.UUID] = field(default_factory=Counter)
    tokens: Counter[uuid.UUID] = field(default_factory=Counter)

    def run(self, passes: int, room: int) -> None:
        for _ in range(passes):
            heads = {t: jobs(t, room, cost=self.cost[t]) for t in self.weights}
            tenants = {t: TenantState(w, self.served.get(t, 0.0)) for t, w in self.weights.items()}
            choice = choose(heads, tenants, room=room, vtime=self.vtime)
            self.vtime = choice.vtime
            for job in choice.jobs:
                self.jobs[job.tenant_id] += 1
                self.tokens[job.tenant_id] += job.cost
                self.served[job.tenant_id] = tenants[job.tenant_id].served


# --- priority ------------------------------------------------------------------------------


def test_a_higher_priority_job_goes_first_however_much_its_tenant_was_served() -> None:
    low, high = jobs(A, 5), jobs(B, 1, priority=10)
    tenants = {A: TenantState(1, 0.0), B: TenantState(1, 1e9)}
    choice = choose({A: low, B: high}, tenants, room=3)
    assert choice.jobs == [high[0], low[0], low[1]]


def test_priorities_order_classes_single_then_batch_then_backfill() -> None:
    backfill, batch, single = jobs(A, 2, priority=-20), jobs(B, 2, priority=-10), jobs(C, 2)
    choice = choose({A: backfill, B: batch, C: single}, room=6)
    assert choice.jobs == [*single, *batch, *backfill]


def test_a_tenants_own_higher_priority_job_goes_before_its_older_ones() -> None:
    # The dispatcher reads each tenant's jobs by priority, then id: its head is the urgent one.
    urgent, *older = jobs(A, 1, priority=5) + jobs(A, 3)
    choice = choose({A: [urgent, *older], B: jobs(B, 3)}, room=1)
    assert choice.jobs == [urgent]


# --- weighted fair share in tokens ---------------------------------------------------------


def test_weights_two_to_one_give_two_to_one_tokens_over_a_long_run() -> None:
    run = Dispatcher(weights={A: 2, B: 1}, cost={A: 100, B: 100})
    run.run(passes=300, room=16)
    assert run.tokens[A] / run.tokens[B] == pytest.approx(2.0, rel=0.02)


def test_equal_weights_share_equally_between_three_tenants() -> None:
    run = Dispatcher(weights={A: 1, B: 1, C: 1}, cost={A: 100, B: 100, C: 100})
    run.run(passes=100, room=16)
    assert max(run.jobs.values()) - min(run.jobs.values()) <= 1


def test_a_tenant_with_big_jobs_gets_fewer_jobs_and_the_same_tokens() -> None:
    # B's jobs are 10 times A's: it gets a tenth of the jobs and half the tokens.
    run = Dispatcher(weights={A: 1, B: 1}, cost={A: 100, B: 1000})
    run.run(passes=200, room=50)
    assert run.tokens[A] / run.tokens[B] == pytest.approx(1.0, rel=0.05)
    assert run.jobs[A] / run.jobs[B] == pytest.approx(10.0, rel=0.05)


def test_a_tenant_whose_jobs_are_bigger_than_a_whole_pass_of_the_others_is_not_starved() -> None:
    # One of B's jobs costs as much as 80 of A's, and a pass admits 10: B must still get its
    # share over the passes, not wait for A's backlog to end.
    run = Dispatcher(weights={A: 1, B: 1}, cost={A: 100, B: 8000})
    run.run(passes=400, room=10)
    assert run.jobs[B] > 0, "B's big jobs never went while A had a backlog"
    assert run.tokens[A] / run.tokens[B] == pytest.approx(1.0, rel=0.05)


def test_each_tenants_jobs_go_in_its_own_order() -> None:
    mine, theirs = jobs(A, 10), jobs(B, 10)
    choice = choose({A: mine, B: theirs}, room=20)
    assert [j for j in choice.jobs if j.tenant_id == A] == mine
    assert [j for j in choice.jobs if j.tenant_id == B] == theirs
    assert tenants_of(choice)[:4] == [A, B, A, B]  # interleaved, not one backlog first


def test_an_idle_tenant_rejoins_at_the_virtual_time_and_banks_no_credit() -> None:
    # A ran alone for a long while; B was idle (its served figure is old and low).
    tenants = {A: TenantState(1, 50_000.0), B: TenantState(1, 0.0)}
    choice = choose({A: jobs(A, 20), B: jobs(B, 20)}, tenants, room=20, vtime=50_000.0)
    # B gets its fair half from now on, not the next 500 jobs to "catch up".
    assert Counter(tenants_of(choice)) == {A: 10, B: 10}
    assert tenants[B].served >= 50_000.0


def test_the_virtual_time_never_moves_backwards() -> None:
    choice = choose({A: jobs(A, 3)}, {A: TenantState(1, 0.0)}, room=3, vtime=7_000.0)
    assert choice.vtime >= 7_000.0


def test_room_bounds_a_pass() -> None:
    assert len(choose({A: jobs(A, 10), B: jobs(B, 10)}, room=7).jobs) == 7
    assert choose({A: jobs(A, 10)}, room=0).jobs == []


# --- caps ----------------------------------------------------------------------------------


def test_a_tenant_at_its_inflight_cap_waits_and_the_others_take_the_room() -> None:
    tenants = {A: TenantState(1, 0.0, inflight_room=2), B: TenantState(1, 0.0)}
    choice = choose({A: jobs(A, 10), B: jobs(B, 10)}, tenants, room=8)
    assert Counter(tenants_of(choice)) == {A: 2, B: 6}
    assert tenants[A].inflight_room == 0


def test_a_tenant_with_no_inflight_room_gets_nothing() -> None:
    tenants = {A: TenantState(1, 0.0, inflight_room=0)}
    assert choose({A: jobs(A, 5)}, tenants, room=5).jobs == []


def test_a_route_takes_as_many_requests_as_its_room() -> None:
    routes = {"limited": RouteRoom(requests=3)}
    heads = {A: jobs(A, 5, model="limited"), B: jobs(B, 5, model="free")}
    choice = choose(heads, room=10, routes=routes)
    assert Counter(j.model for j in choice.jobs) == {"limited": 3, "free": 5}
    assert routes["limited"].requests == 0


def test_a_route_takes_as_many_tokens_as_its_room() -> None:
    routes = {"m": RouteRoom(tokens=250.0)}
    choice = choose({A: jobs(A, 5, cost=100)}, room=10, routes=routes)
    assert len(choice.jobs) == 2


def test_one_job_always_fits_an_empty_route_however_big() -> None:
    routes = {"m": RouteRoom(tokens=100.0)}
    choice = choose({A: jobs(A, 2, cost=5_000)}, room=10, routes=routes)
    assert len(choice.jobs) == 1  # the first, on the empty route; the second waits
    busy = {"m": RouteRoom(tokens=100.0, empty=False)}
    assert choose({A: jobs(A, 1, cost=5_000)}, room=10, routes=busy).jobs == []


def test_a_tenant_over_its_tpm_share_waits_and_the_bucket_is_spent() -> None:
    tenants = {A: TenantState(1, 0.0, tokens={"m": 250.0}, capacity={"m": 1000.0}, share=0.1)}
    choice = choose({A: jobs(A, 5, cost=100)}, tenants, room=10)
    assert len(choice.jobs) == 2
    assert tenants[A].tokens["m"] == pytest.approx(50.0)


def test_a_job_bigger_than_the_whole_bucket_goes_when_the_bucket_is_full() -> None:
    full = {A: TenantState(1, 0.0, tokens={"m": 1000.0}, capacity={"m": 1000.0}, share=0.1)}
    assert len(choose({A: jobs(A, 1, cost=5_000)}, full).jobs) == 1
    assert full[A].tokens["m"] < 0  # in debt: nothing more until it has refilled
    part = {A: TenantState(1, 0.0, tokens={"m": 999.0}, capacity={"m": 1000.0}, share=0.1)}
    assert choose({A: jobs(A, 1, cost=5_000)}, part).jobs == []


def test_a_share_of_one_model_does_not_hold_back_another() -> None:
    tenants = {A: TenantState(1, 0.0, tokens={"m": 0.0}, capacity={"m": 1000.0}, share=0.1)}
    heads = {A: jobs(A, 2, model="m") + jobs(A, 2, model="other")}
    assert [j.model for j in choose(heads, tenants).jobs] == ["other", "other"]


def test_a_tenant_held_back_by_its_share_does_not_hold_back_others() -> None:
    tenants = {
        A: TenantState(1, 0.0, tokens={"m": 0.0}, capacity={"m": 1000.0}, share=0.1),
        B: TenantState(1, 0.0),
    }
    choice = choose({A: jobs(A, 5), B: jobs(B, 5)}, tenants, room=5)
    assert tenants_of(choice) == [B] * 5


# --- how much to read, and the buckets ----------------------------------------------------


def test_head_sizes_read_about_twice_a_fair_part_at_least_four_at_most_the_room_or_cap() -> None:
    sizes = fairness.head_sizes({A: 3, B: 1, C: 1}, room=100, caps={C: 5})
    assert sizes == {A: 100, B: 40, C: 5}
    assert fairness.head_sizes({A: 1, B: 1}, room=2, caps={}) == {A: 2, B: 2}
    many = {uuid.UUID(int=n): 1 for n in range(1000)}
    assert set(fairness.head_sizes(many, room=64, caps={}).values()) == {4}


def test_a_cap_of_zero_reads_nothing() -> None:
    assert fairness.head_sizes({A: 1}, room=50, caps={A: 0}) == {A: 0}


@pytest.mark.parametrize(
    ("tokens", "elapsed", "expected"),
    [
        (0.0, 30.0, 500.0),  # half a minute refills half the bucket
        (900.0, 60.0, 1000.0),  # never more than the bucket holds
        (-2000.0, 60.0, -1000.0),  # a debt is paid off at the same rate
        (300.0, -5.0, 300.0),  # a clock step backwards takes nothing away
    ],
)
def test_a_bucket_refills_at_its_capacity_a_minute(
    tokens: float, elapsed: float, expected: float
) -> None:
    assert fairness.refill(tokens, elapsed, capacity=1000.0) == pytest.approx(expected)
