"""Fairness between tenants under a binding upstream limit (issue #12).

    .venv/bin/python bench/fairness.py small-tenants [--big 10000] [--rounds 3]
    .venv/bin/python bench/fairness.py weights [--heavy 4000 --light 4000]
    .venv/bin/python bench/fairness.py weights --light-prompt 800 --heavy 6000 --light 2000

The simulator allows 3,000 RPM enforced per calendar second (50 requests a second, like
bench/throughput.py) and answers in 0.5-1.0 s (``--latency 0.5 --jitter 0.5``); chatjobs is
told the limit (CHATJOBS_UPSTREAM_RPM). Every request has a ~200-token prompt (o200k) and
max_tokens 16, so a job's tokens are prompt + 16 and its estimated cost is the same.

Each scenario stores its backlog before any worker runs (beat's dispatcher admits one window
to the broker meanwhile), then starts the workers (1 x 64 threads): on this 2-core machine the
API stores ~50-200 jobs a second, too close to the limit's 50 for a backlog to build while it
submits. Times below are from the first claim.

small-tenants: tenant ``big`` stores 10,000 jobs; from 10 s after the first claim, in
``--rounds`` rounds ``--round-gap`` seconds apart, 9 new tenants each submit 10 jobs at once.
Per small tenant: its first created_at to its last completed_at (target <= 10 s). The limit's
use: successful calls the simulator saw per second and per 5 s against 50/s, from the second
after the first call to the second before big's last call (its backlog ran out then); target
>= 95 % throughout. And the simulator's 429 count. (The simulator's 1-second buckets follow
its monotonic clock, the call log the wall clock: a 1-s bin here straddles two of its
buckets, so the 5-s bins are the fairer reading.)

weights: tenants ``heavy`` (``chatjobs tenants set heavy --weight 2``) and ``light``
(weight 1) store their jobs; the token share is the jobs' total_tokens with completed_at in
the window from 5 s after the first claim to 2 s before the first of the two tenants had its
last job claimed (nothing of its own waiting after that); target 2:1 within +-10 %.
``--light-prompt 800`` gives the light tenant jobs 4x as large: fair share is in tokens, so
heavy should then run ~7x as many jobs as light, not 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.overhead import start_worker, submit_all
from bench.stack import Stack, cpu_delta, percentile, running_stack, wait_finished
from chatjobs.testing import python_cli

RPM = 3000
PER_SECOND = RPM / 60
# One token each (o200k, with the leading space): a prompt of n words is ~n tokens.
_WORDS = ("the", "job", "sim", "api", "run", "log", "key", "box", "fox", "red", "sky", "sun")


def request_maker(tenant: str, prompt_tokens: int) -> Callable[[int], dict[str, Any]]:
    """Bodies whose prompt starts with the tenant's name (so the simulator's call log says
    whose call it was) and has about ``prompt_tokens`` tokens."""

    def make(i: int) -> dict[str, Any]:
        words = " ".join(_WORDS[(i + k) % len(_WORDS)] for k in range(prompt_tokens))
        return {
            "model": "gpt-4.1",
            "messages": [{"role": "user", "content": f"[{tenant}] {i} {words}"}],
            "max_tokens": 16,
        }

    return make


def tenant_of(call: dict[str, Any]) -> str:
    try:
        content = call["body"]["messages"][0]["content"]
    except (KeyError, IndexError, TypeError):
        return "?"
    return str(content)[1:].partition("]")[0]


def new_key(tenant: str) -> str:
    from chatjobs.db import session_scope
    from chatjobs.tenants import create_key

    with session_scope() as session:
        return create_key(session=session, tenant_name=tenant)


def tenants_set(stack: Stack, name: str, *args: str) -> None:
    """``chatjobs tenants set NAME ...``, as an operator would run it."""
    subprocess.run(
        python_cli("tenants", "set", name, *args),
        env=stack.env,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def limited_sim_args(latency: float, jitter: float) -> list[str]:
    """The simulator at 3,000 RPM per calendar second, answering in latency..+jitter s."""
    limit = ["--rpm", str(RPM), "--limit-window", "second"]
    return [*limit, "--latency", str(latency), "--jitter", str(jitter)]


LIMITED_ENV = {"CHATJOBS_UPSTREAM_RPM": str(RPM)}


def limited_stack(ns: argparse.Namespace) -> Any:
    """The stack without workers: a backlog is stored first, then ``start_workers``."""
    return running_stack(
        sim_args=limited_sim_args(ns.latency, ns.jitter), workers=0, env=LIMITED_ENV
    )


def start_workers(stack: Stack, conn: Connection, ns: argparse.Namespace) -> float:
    """Start the workers; returns the first claim's time (waits for it)."""
    for i in range(ns.workers):
        start_worker(stack, i, ["--concurrency", str(ns.concurrency)])
    while True:
        first = conn.scalar(text("SELECT extract(epoch FROM min(started_at)) FROM jobs"))
        conn.commit()
        if first is not None:
            return float(first)
        time.sleep(0.05)


def sim_calls(stack: Stack) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = httpx.get(
        f"{stack.sim_url}/_sim/calls", params={"limit": 100_000}, timeout=60
    ).json()
    return calls


def utilisation(ok_times: list[float], start: int, end: int, width: int) -> list[float]:
    """Successful calls per ``width``-second bin over [start, end), as a share of the limit."""
    per_bin: Counter[int] = Counter((int(t) - start) // width for t in ok_times if start <= t < end)
    bins = (end - start) // width
    return [per_bin[b] / (PER_SECOND * width) for b in range(bins)]


def describe(shares: list[float]) -> str:
    if not shares:
        return "n=0"
    below = sum(1 for s in shares if s < 0.95)
    return (
        f"n={len(shares)} min={min(shares) * 100:.0f}% p5={percentile(shares, 5) * 100:.0f}% "
        f"median={percentile(shares, 50) * 100:.0f}% mean={sum(shares) / len(shares) * 100:.1f}% "
        f"below_95%={below}"
    )


# --- small tenants beside a big one -----------------------------------------------------


def small_tenants(ns: argparse.Namespace) -> None:
    with limited_stack(ns) as stack:
        big_key = new_key("big")
        rounds = [
            {f"small{r}-{k}": new_key(f"small{r}-{k}") for k in range(1, ns.small + 1)}
            for r in range(1, ns.rounds + 1)
        ]
        submit_s = asyncio.run(
            submit_all(stack.api_url, big_key, ns.big, 32, request_maker("big", ns.prompt))
        )
        print(
            f"  big: {ns.big} jobs stored in {submit_s:.1f}s ({ns.big / submit_s:.0f}/s), no "
            f"worker yet; load {_load()}",
            flush=True,
        )
        engine = create_engine(stack.database_url, poolclass=NullPool)
        with engine.connect() as conn:
            cpu_before = stack.cpu_seconds()
            first_claim = start_workers(stack, conn, ns)
            for r, keys in enumerate(rounds):
                time.sleep(max(0.0, first_claim + ns.first_round + r * ns.round_gap - time.time()))
                asyncio.run(_submit_round(stack, keys, ns.per_small, ns.prompt))
                print(
                    f"  round {r + 1}: {len(keys)} tenants x {ns.per_small} submitted; load "
                    f"{_load()}",
                    flush=True,
                )
            wait_finished(conn, ns.timeout)
            spans = _tenant_spans(conn)
        engine.dispose()
        cpu = cpu_delta(cpu_before, stack.cpu_seconds())
        stats = httpx.get(f"{stack.sim_url}/_sim/stats").json()
        calls = sim_calls(stack)
    ok_times = [c["t"] for c in calls if c["status"] == 200]
    big_calls = [c["t"] for c in calls if tenant_of(c) == "big"]
    start, end = int(min(ok_times)) + 1, int(max(big_calls))
    origin = int(first_claim)
    big = spans.pop("big")
    print(
        f"small-tenants big={ns.big} small={ns.rounds}x{ns.small}x{ns.per_small} "
        f"latency={ns.latency}-{ns.latency + ns.jitter}s workers={ns.workers}x{ns.concurrency} "
        f"big_first_to_last_call_s={max(big_calls) - min(ok_times):.1f} "
        f"upstream_calls={stats['requests']} 429s={stats['rate_limited']} "
        f"({stats['rate_limited'] / max(1, stats['requests']) * 100:.2f}%) "
        f"big_succeeded={big['succeeded']} {cpu}",
        flush=True,
    )
    for r in range(1, ns.rounds + 1):
        mine = {t: s for t, s in spans.items() if t.startswith(f"small{r}-")}
        times = [s["span"] for s in mine.values()]
        offset = min(s["first_created"] for s in mine.values()) - first_claim
        print(
            f"  round {r} (submitted {offset:.0f}s after the first claim): per tenant, first "
            "submission to last job done (s): "
            + " ".join(f"{s['span']:.2f}" for _, s in sorted(mine.items()))
            + f" | max={max(times):.2f} succeeded={sum(s['succeeded'] for s in mine.values())}"
            f"/{len(mine) * ns.per_small}",
            flush=True,
        )
    print(
        f"  limit use per 1 s (vs {PER_SECOND:.0f}/s), seconds [{start - origin}, {end - origin}) "
        f"after the first claim (big's backlog): {describe(utilisation(ok_times, start, end, 1))}",
        flush=True,
    )
    print(f"  limit use per 5 s, the same span: {describe(utilisation(ok_times, start, end, 5))}")
    low = [
        (i * 5 + start - origin, round(s * 100))
        for i, s in enumerate(utilisation(ok_times, start, end, 5))
        if s < 0.95
    ]
    if low:
        print(f"  5-s bins below 95% (second after the first claim, %): {low}")


async def _submit_round(stack: Stack, keys: dict[str, str], per: int, prompt: int) -> None:
    await asyncio.gather(
        *(
            submit_all(stack.api_url, key, per, per, request_maker(tenant, prompt))
            for tenant, key in keys.items()
        )
    )


def _tenant_spans(conn: Connection) -> dict[str, dict[str, float]]:
    rows = conn.execute(
        text(
            """
            SELECT t.name, extract(epoch FROM min(j.created_at)),
                   extract(epoch FROM max(j.completed_at) - min(j.created_at)),
                   count(*) FILTER (WHERE j.status = 'succeeded')
            FROM jobs j JOIN tenants t ON t.id = j.tenant_id GROUP BY t.name
            """
        )
    ).all()
    return {
        name: {"first_created": float(first), "span": float(span or 0), "succeeded": int(n)}
        for name, first, span, n in rows
    }


# --- weights 2:1 ---------------------------------------------------------------------------


def weights(ns: argparse.Namespace) -> None:
    with limited_stack(ns) as stack:
        keys = {"heavy": new_key("heavy"), "light": new_key("light")}
        tenants_set(stack, "heavy", "--weight", "2")
        tenants_set(stack, "light", "--weight", "1")
        sizes = {"heavy": (ns.heavy, ns.heavy_prompt), "light": (ns.light, ns.light_prompt)}

        async def both() -> None:
            await asyncio.gather(
                *(
                    submit_all(stack.api_url, keys[t], n, 16, request_maker(t, prompt))
                    for t, (n, prompt) in sizes.items()
                )
            )

        asyncio.run(both())
        print(f"  both stored, no worker yet; load {_load()}", flush=True)
        engine = create_engine(stack.database_url, poolclass=NullPool)
        with engine.connect() as conn:
            cpu_before = stack.cpu_seconds()
            first_claim = start_workers(stack, conn, ns)
            wait_finished(conn, ns.timeout)
            last_claims = conn.execute(
                text(
                    "SELECT t.name, extract(epoch FROM max(j.started_at)) FROM jobs j "
                    "JOIN tenants t ON t.id = j.tenant_id GROUP BY t.name"
                )
            ).all()
            start = first_claim + 5
            end = min(float(row[1]) for row in last_claims) - 2
            done = _done_in(conn, start, end)
            slices = []
            t = start
            while t + 10 <= end:
                slices.append((t - first_claim, _done_in(conn, t, t + 10)))
                t += 10
        engine.dispose()
        cpu = cpu_delta(cpu_before, stack.cpu_seconds())
        stats = httpx.get(f"{stack.sim_url}/_sim/stats").json()
    ratio = done["heavy"][1] / max(1, done["light"][1])
    print(
        f"weights heavy={ns.heavy}x~{ns.heavy_prompt}tok(weight 2) "
        f"light={ns.light}x~{ns.light_prompt}tok(weight 1) "
        f"window=[{start - first_claim:.1f}s, {end - first_claim:.1f}s] after the first claim "
        f"({end - start:.1f}s) tokens heavy={done['heavy'][1]} light={done['light'][1]} "
        f"token_ratio={ratio:.3f} (target 2 +-10%: {'met' if 1.8 <= ratio <= 2.2 else 'MISSED'}) "
        f"jobs heavy={done['heavy'][0]} light={done['light'][0]} "
        f"jobs_per_s={(done['heavy'][0] + done['light'][0]) / max(0.001, end - start):.1f} "
        f"upstream_calls={stats['requests']} 429s={stats['rate_limited']} {cpu}",
        flush=True,
    )
    print(
        "  token ratio per 10 s of the window (s after the first claim: ratio): "
        + " ".join(f"{at:.0f}:{d['heavy'][1] / max(1, d['light'][1]):.2f}" for at, d in slices)
    )


def _done_in(conn: Connection, start: float, end: float) -> dict[str, tuple[int, int]]:
    rows = conn.execute(
        text(
            """
            SELECT t.name, count(*), coalesce(sum(j.total_tokens), 0)
            FROM jobs j JOIN tenants t ON t.id = j.tenant_id
            WHERE j.completed_at >= to_timestamp(:start) AND j.completed_at < to_timestamp(:end)
            GROUP BY t.name
            """
        ),
        {"start": start, "end": end},
    ).all()
    out = {"heavy": (0, 0), "light": (0, 0)}
    out.update({name: (int(n), int(tokens)) for name, n, tokens in rows})
    return out


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["small-tenants", "weights"])
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--jitter", type=float, default=0.5)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=64, help="slots per worker")
    parser.add_argument("--prompt", type=int, default=200, help="prompt tokens (small-tenants)")
    parser.add_argument("--big", type=int, default=10_000)
    parser.add_argument("--small", type=int, default=9, help="small tenants per round")
    parser.add_argument("--per-small", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--first-round", type=float, default=10, help="s after the first claim")
    parser.add_argument("--round-gap", type=float, default=60)
    parser.add_argument("--heavy", type=int, default=4000)
    parser.add_argument("--light", type=int, default=4000)
    parser.add_argument("--heavy-prompt", type=int, default=200)
    parser.add_argument("--light-prompt", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=900)
    ns = parser.parse_args()
    print(f"  load before: {_load()}", flush=True)
    if ns.scenario == "small-tenants":
        small_tenants(ns)
    else:
        weights(ns)
    print(f"  load after: {_load()}", flush=True)


if __name__ == "__main__":
    main()
