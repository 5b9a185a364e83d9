"""The shared rate limiter on a real Redis, across real processes.

Every test works under a prefix of its own in the shared test database and deletes its keys
afterwards; nothing here flushes the database, which other test processes use at the same time.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence

import pytest
import redis

from chatjobs.limiter import Limits, RateLimiter, parse_duration
from chatjobs.testing import ROOT
from tests.conftest import REDIS

pytestmark = pytest.mark.integration

Send = tuple[float, int]  # (time.time() of the send, tokens)

# One sender process: acquire -> sleep until the slot (waking late by up to `late` seconds, one
# call in five) -> pass the start pace if `start` -> "send", or back off; print the sends.
_SENDER = """
import json, random, sys, time, uuid
import redis
from chatjobs.limiter import Limits, RateLimiter

cfg = json.loads(sys.argv[1])
client = redis.Redis.from_url(cfg["url"])
limiter = RateLimiter(client, prefix=cfg["prefix"])
limits = Limits(**cfg["limits"])
sizes, i, sent = cfg["tokens"], cfg["offset"], []
rng = random.Random(cfg["offset"])
time.sleep(max(0.0, cfg["start_at"] - time.time()))
while time.time() < cfg["end_at"]:
    tokens = sizes[i % len(sizes)]
    call_id = uuid.uuid4().hex
    decision = limiter.acquire("shared", limits, tokens=tokens, call_id=call_id)
    if decision.granted:
        late = rng.uniform(0, cfg["late"]) if rng.random() < 0.2 else 0.0
        time.sleep(decision.wait + late)
        if cfg["start"]:
            assert limiter.start("shared", limits, tokens=tokens).granted
        sent.append((time.time(), tokens))
        i += 1
    else:
        time.sleep(min(decision.wait, 1.0))
client.close()
print(json.dumps(sent))
"""


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS)
    yield client
    client.close()


@pytest.fixture
def prefix(redis_client: redis.Redis) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = f"test-limiter-{uuid.uuid4().hex}"
    yield prefix
    keys = list(redis_client.scan_iter(match=f"{prefix}:*"))
    if keys:
        redis_client.delete(*keys)


@pytest.fixture
def limiter(redis_client: redis.Redis, prefix: str) -> RateLimiter:
    return RateLimiter(redis_client, prefix=prefix)


def run_senders(
    client: redis.Redis,
    prefix: str,
    limits: dict[str, float],
    *,
    seconds: float,
    tokens: Sequence[int] = (1,),
    late: float = 0.0,
    start: bool = False,
) -> tuple[float, list[Send]]:
    """Two sender processes sharing one key for `seconds`; returns the start and all sends."""
    # Other suites flush the shared test database (tests/conftest.py does at session start); a
    # flush mid-run wipes the shared schedule and voids the measurement, so detect it.
    sentinel = f"{prefix}:sentinel"
    client.set(sentinel, 1)
    # Both interpreters are up and imported by then, even on a busy host (1 s was not enough
    # at a load average of 15 on 2 cores).
    start_at = time.time() + 3.0
    procs = []
    for offset in range(2):
        cfg = {
            "url": REDIS,
            "prefix": prefix,
            "limits": limits,
            "tokens": list(tokens),
            "offset": offset * (len(tokens) // 2),
            "start_at": start_at,
            "end_at": start_at + seconds,
            "late": late,
            "start": start,
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SENDER, json.dumps(cfg)],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    sends: list[Send] = []
    for proc in procs:
        out, err = proc.communicate(timeout=seconds + 30)
        assert proc.returncode == 0, err
        sends += [(float(t), int(n)) for t, n in json.loads(out)]
    if not client.exists(sentinel):
        pytest.skip("another process flushed the test database while the senders ran")
    return start_at, sorted(sends)


def busiest(sends: Sequence[Send], window: float, *, tokens: bool = False) -> int:
    """Most requests (or tokens) sent within any closed window of `window` seconds."""
    times = [t for t, _ in sends]
    totals = [0, *itertools.accumulate(n if tokens else 1 for _, n in sends)]
    return max(
        (totals[bisect.bisect_right(times, t + window)] - totals[i] for i, t in enumerate(times)),
        default=0,
    )


def slots(limiter: RateLimiter, limits: Limits, sizes: Sequence[int]) -> list[Send]:
    """Reserve calls back to back without sleeping; returns each call's slot in Redis time."""
    assert limits.tpm is not None
    out = []
    for tokens in sizes:
        assert limiter.acquire("k", limits, tokens=tokens, call_id="c", max_wait=1e9).granted
        state = limiter.state("k")
        per_token = limits.window_seconds / (limits.headroom * (limits.tpm - state["tokens_room"]))
        out.append((state["tokens_tat"] - tokens * per_token, tokens))
    return out


def comparable(state: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in state.items() if k not in ("now", "ttl")}


# --- pacing -----------------------------------------------------------------------------------


def test_two_processes_keep_120_rpm_busy_and_no_minute_holds_more(
    redis_client: redis.Redis, prefix: str
) -> None:
    start, sends = run_senders(redis_client, prefix, {"rpm": 120}, seconds=62)

    assert busiest(sends, 60) <= 120
    # Paced at 0.98 * 120 per minute: 118 fit in the first minute (floor(117.6) + 1).
    assert sum(start <= t <= start + 60 for t, _ in sends) >= 115


def test_two_processes_on_a_2s_window_never_exceed_40_requests(
    redis_client: redis.Redis, prefix: str
) -> None:
    start, sends = run_senders(redis_client, prefix, {"rpm": 40, "window_seconds": 2}, seconds=5)

    assert busiest(sends, 2) <= 40
    assert sum(start <= t <= start + 2 for t, _ in sends) >= 36
    # Paced, not bursted: no second ever holds much more than its share of 19.6.
    assert busiest(sends, 1) <= 21


def test_two_processes_never_exceed_tpm_with_mixed_call_sizes(
    redis_client: redis.Redis, prefix: str
) -> None:
    sizes = [30, 150, 10, 80, 200, 60, 120, 5, 180, 40]
    start, sends = run_senders(
        redis_client, prefix, {"tpm": 1000, "window_seconds": 2}, seconds=4, tokens=sizes
    )

    assert busiest(sends, 2, tokens=True) <= 1000
    # Busy: paced to leave room for the largest call, 0.98 * (1000 - 199) / 2 s = 392 tokens/s.
    assert sum(n for t, n in sends if start <= t <= start + 4) >= 1400


def test_token_windows_hold_no_more_than_tpm_even_for_calls_beyond_the_headroom(
    limiter: RateLimiter,
) -> None:
    # Plain zero-tolerance GCRA at 0.98 would space 150-token calls 0.306 s apart and so fit
    # seven (1,050 tokens) into some 2-second window.
    limits = Limits(tpm=1000, window_seconds=2)
    uniform = slots(limiter, limits, [150] * 20)
    assert busiest(uniform, 2, tokens=True) <= 1000
    assert busiest(uniform, 2, tokens=True) == 900  # six calls: as many as can ever fit


def test_random_token_sizes_never_overfill_a_minute(limiter: RateLimiter) -> None:
    rng = random.Random(7)
    limits = Limits(tpm=10_000)
    sizes = [rng.choice([rng.randint(1, 300), rng.randint(300, 3000), 8000]) for _ in range(300)]
    reserved = slots(limiter, limits, sizes)
    assert busiest(reserved, 60, tokens=True) <= 10_000


def test_a_call_larger_than_the_window_allowance_goes_once_the_key_is_idle(
    limiter: RateLimiter,
) -> None:
    limits = Limits(tpm=1000, window_seconds=2)
    assert limiter.acquire("k", limits, tokens=1500, call_id="a").granted
    after = limiter.acquire("k", limits, tokens=10, call_id="b", max_wait=10)
    # It reserved its whole cost: nothing else starts for 1500 tokens at 0.98 * 1000 per 2 s.
    assert after.granted
    assert after.wait == pytest.approx(1500 * 2 / 980, abs=0.05)


def test_a_refused_large_call_is_not_starved_by_small_ones(limiter: RateLimiter) -> None:
    limits = Limits(tpm=1000, window_seconds=2)
    while limiter.acquire("k", limits, tokens=10, call_id="s", max_wait=0.5).granted:
        pass
    large = limiter.acquire("k", limits, tokens=300, call_id="l", max_wait=0.5)
    assert not large.granted
    assert large.reason == "tokens"

    # Small calls may not take the space the large call is waiting for.
    assert not limiter.acquire("k", limits, tokens=10, call_id="s", max_wait=0.5).granted
    time.sleep(large.wait - 0.4)
    assert limiter.acquire("k", limits, tokens=300, call_id="l", max_wait=0.5).granted


def test_calls_waking_late_in_two_processes_never_crowd_a_second_past_its_share(
    redis_client: redis.Redis, prefix: str
) -> None:
    # 1,200 RPM is 20 calls in any second; one call in five wakes up to 0.3 s after its slot,
    # into the second of the calls after it. The start pace holds it until its turn.
    _, sends = run_senders(redis_client, prefix, {"rpm": 1200}, seconds=5, late=0.3, start=True)

    # Starts at least 1.0102 / 20 s apart in Redis time; 0.99 s here leaves 20 ms for the
    # reply to reach the sender.
    assert busiest(sends, 0.99) <= 20
    assert len(sends) > 40  # the pace had calls to hold back


def test_two_processes_with_mixed_call_sizes_keep_each_second_near_its_tokens(
    redis_client: redis.Redis, prefix: str
) -> None:
    sizes = [48, 30, 60, 10, 45]
    _, sends = run_senders(
        redis_client, prefix, {"tpm": 6000}, seconds=5, tokens=sizes, late=0.2, start=True
    )

    # Paced per token at zero tolerance, like acquire: a second holds its share (100 tokens)
    # and at most the call that starts at its end.
    assert busiest(sends, 0.99, tokens=True) <= 100 + max(sizes)
    assert len(sends) > 10


# --- start (the pace of actual starts) --------------------------------------------------------


def test_start_refuses_a_call_sooner_than_its_share_and_says_when_it_may_go(
    limiter: RateLimiter,
) -> None:
    limits = Limits(rpm=600)  # 10 calls in 1.0102 s: one per 0.101 s
    assert limiter.start("k", limits, tokens=1).granted
    before = limiter.state("k")

    refused = limiter.start("k", limits, tokens=1, max_wait=0)

    assert (refused.granted, refused.reason) == (False, "requests")
    assert refused.wait == pytest.approx(0.101, abs=0.02)
    assert comparable(limiter.state("k")) == comparable(before)  # a refusal records nothing


def test_start_waits_for_its_turn_then_records_the_call(limiter: RateLimiter) -> None:
    limits = Limits(rpm=600)
    assert limiter.start("k", limits, tokens=1).granted

    assert limiter.start("k", limits, tokens=1, max_wait=2).granted

    state = limiter.state("k")
    assert state["requests_next_start"] == pytest.approx(state["now"] + 0.101, abs=0.02)


def test_a_late_start_keeps_its_slack_on_the_schedule_so_the_next_catches_up(
    limiter: RateLimiter,
) -> None:
    # 10 calls per 1.5 s (headroom 0.5 stretches the pace by half): a share is 0.15 s, the
    # slack half the stretch, 0.25 s.
    limits = Limits(rpm=600, headroom=0.5)
    assert limits.start_slack(600) == pytest.approx(0.25)
    assert limiter.start("k", limits, tokens=1).granted
    time.sleep(0.5)  # this start is 0.35 s late on its schedule
    assert limiter.start("k", limits, tokens=1, max_wait=0).granted

    # Its next start is at its own time - 0.25 + 0.15: already due, one share of the lateness
    # is caught up at once; the one after that waits for the rest of its share.
    assert limiter.start("k", limits, tokens=1, max_wait=0).granted
    after = limiter.start("k", limits, tokens=1, max_wait=0)
    assert (after.granted, after.reason) == (False, "requests")
    assert after.wait == pytest.approx(0.05, abs=0.03)


def test_start_paces_tokens_by_the_size_of_the_last_call(limiter: RateLimiter) -> None:
    limits = Limits(tpm=6000)  # 100 tokens per 1.0102 s
    assert limiter.start("k", limits, tokens=60).granted

    after_large = limiter.start("k", limits, tokens=10, max_wait=0)

    assert (after_large.granted, after_large.reason) == (False, "tokens")
    assert after_large.wait == pytest.approx(0.606, abs=0.02)


def test_start_holds_a_granted_call_through_a_cool_down(limiter: RateLimiter) -> None:
    limits = Limits(rpm=1000)
    assert limiter.acquire("k", limits, tokens=1, call_id="c").granted
    limiter.cool_down("k", 3)

    decision = limiter.start("k", limits, tokens=1, max_wait=1)

    assert (decision.granted, decision.reason) == (False, "cooldown")
    assert decision.wait == pytest.approx(3, abs=0.1)


def test_start_of_an_unlimited_route_records_nothing(limiter: RateLimiter) -> None:
    decision = limiter.start("k", Limits(max_concurrency=2), tokens=1, max_wait=0)
    assert decision.granted
    assert limiter.state("k")["requests_next_start"] is None


# --- acquire ----------------------------------------------------------------------------------


def test_refused_acquire_reserves_nothing_and_says_how_long_to_wait(
    limiter: RateLimiter,
) -> None:
    limits = Limits(rpm=60)  # one request per 60 / 58.8 = 1.02 s
    granted = [limiter.acquire("k", limits, tokens=1, call_id=f"c{i}") for i in range(2)]
    assert [d.granted for d in granted] == [True, True]
    assert all(d.wait <= 2.0 for d in granted)
    assert granted[1].wait == pytest.approx(60 / 58.8, abs=0.05)

    before = limiter.state("k")
    refused = limiter.acquire("k", limits, tokens=1, call_id="c2")
    assert (refused.granted, refused.reason) == (False, "requests")
    assert refused.wait == pytest.approx(2 * 60 / 58.8, abs=0.05)
    assert comparable(limiter.state("k")) == comparable(before)


def test_state_expires_a_little_over_a_window_after_the_last_reservation(
    limiter: RateLimiter,
) -> None:
    limiter.acquire("k", Limits(rpm=600, window_seconds=3), tokens=1, call_id="c")
    ttl = limiter.state("k")["ttl"]
    assert ttl is not None
    assert 3 < ttl <= 3 / 0.98 + 0.01 + 1.0  # the stretched window, the slot, a second spare


# --- correct ----------------------------------------------------------------------------------


def test_correct_refunds_unused_tokens_so_the_next_call_goes_sooner(limiter: RateLimiter) -> None:
    limits = Limits(tpm=1000)  # 60 / 980 s per token at the base pace
    assert limiter.acquire("k", limits, tokens=100, call_id="a").granted
    before = limiter.acquire("k", limits, tokens=10, call_id="b", max_wait=0).wait

    limiter.correct("k", limits, reserved_tokens=100, actual_tokens=20)

    after = limiter.acquire("k", limits, tokens=10, call_id="b", max_wait=0).wait
    assert after == pytest.approx(before - 80 * 60 / 980, abs=0.05)


def test_correct_charges_tokens_used_beyond_the_reservation(limiter: RateLimiter) -> None:
    limits = Limits(tpm=1000)
    assert limiter.acquire("k", limits, tokens=100, call_id="a").granted
    before = limiter.acquire("k", limits, tokens=10, call_id="b", max_wait=0).wait

    limiter.correct("k", limits, reserved_tokens=100, actual_tokens=150)

    after = limiter.acquire("k", limits, tokens=10, call_id="b", max_wait=0).wait
    assert after > before + 50 * 60 / 1000


def test_a_refund_cannot_move_the_schedule_before_now(limiter: RateLimiter) -> None:
    limits = Limits(tpm=1000)
    assert limiter.acquire("k", limits, tokens=100, call_id="a").granted

    limiter.correct("k", limits, reserved_tokens=100, actual_tokens=0)

    state = limiter.state("k")
    assert state["tokens_tat"] >= state["now"] - 0.01


# --- cool-down --------------------------------------------------------------------------------


def test_cool_down_refuses_every_client_until_it_ends(limiter: RateLimiter, prefix: str) -> None:
    limiter.cool_down("k", 2)

    with redis.Redis.from_url(REDIS) as other_client:
        other = RateLimiter(other_client, prefix=prefix)
        decision = other.acquire("k", Limits(rpm=1000), tokens=1, call_id="c")

    assert not decision.granted
    assert decision.reason == "cooldown"
    assert decision.wait == pytest.approx(2, abs=0.1)


def test_a_shorter_cool_down_does_not_cut_a_longer_one(limiter: RateLimiter) -> None:
    limiter.cool_down("k", 5)
    limiter.cool_down("k", 1)

    decision = limiter.acquire("k", Limits(rpm=1000), tokens=1, call_id="c")
    assert (decision.granted, decision.reason) == (False, "cooldown")
    assert decision.wait == pytest.approx(5, abs=0.1)


# --- observe ----------------------------------------------------------------------------------


def test_observe_no_requests_remaining_holds_the_next_call_until_the_reset(
    limiter: RateLimiter,
) -> None:
    limits = Limits(rpm=600)
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}

    limiter.observe("k", limits, headers)

    decision = limiter.acquire("k", limits, tokens=1, call_id="c")
    assert decision.granted
    assert decision.wait == pytest.approx(1.5, abs=0.05)


def test_observe_never_loosens_the_schedule(limiter: RateLimiter) -> None:
    limits = Limits(rpm=60, tpm=1000)
    limiter.acquire("k", limits, tokens=100, call_id="c")
    before = limiter.state("k")

    limiter.observe(
        "k",
        limits,
        {
            "X-RateLimit-Remaining-Requests": "59",
            "x-ratelimit-remaining-tokens": "990",
            "x-ratelimit-reset-tokens": "0s",
        },
    )
    limiter.observe(
        "k",
        limits,
        {"x-ratelimit-remaining-tokens": "lots", "x-ratelimit-reset-requests": "soon"},
    )

    assert comparable(limiter.state("k")) == comparable(before)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1s", 1), ("6m0s", 360), ("20ms", 0.02), ("1.5s", 1.5), ("1h2m3s", 3723), ("0.25", 0.25)],
)
def test_parse_duration_reads_openai_reset_headers(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "-1s", "1.2.3s", "5x", "inf", "nan"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    assert parse_duration(text) is None


# --- concurrency ------------------------------------------------------------------------------


def test_max_concurrency_holds_the_fourth_call_until_a_slot_is_released(
    limiter: RateLimiter,
) -> None:
    limits = Limits(max_concurrency=3)
    assert all(limiter.acquire("k", limits, tokens=1, call_id=f"c{i}").granted for i in range(3))

    fourth = limiter.acquire("k", limits, tokens=1, call_id="c3")
    assert (fourth.granted, fourth.reason) == (False, "concurrency")
    assert 0 < fourth.wait <= 0.5

    limiter.release("k", "c0")
    limiter.release("k", "c0")  # releasing twice frees one slot, not two
    assert limiter.acquire("k", limits, tokens=1, call_id="c3").granted
    assert not limiter.acquire("k", limits, tokens=1, call_id="c4").granted


def test_a_call_asking_again_keeps_its_one_slot(limiter: RateLimiter) -> None:
    limits = Limits(max_concurrency=1)
    assert limiter.acquire("k", limits, tokens=1, call_id="c").granted
    assert limiter.acquire("k", limits, tokens=1, call_id="c").granted
    assert list(limiter.state("k")["in_flight"]) == ["c"]


def test_an_expired_lease_frees_its_slot_by_itself(limiter: RateLimiter) -> None:
    limits = Limits(max_concurrency=3)
    for i in range(3):
        assert limiter.acquire("k", limits, tokens=1, call_id=f"c{i}", lease_seconds=0.5).granted
    assert not limiter.acquire("k", limits, tokens=1, call_id="c3").granted

    time.sleep(0.6)

    assert limiter.acquire("k", limits, tokens=1, call_id="c3").granted
    assert list(limiter.state("k")["in_flight"]) == ["c3"]
