"""Throughput scenarios against the real stack; each prints one line of figures.

    .venv/bin/python bench/throughput.py request-bound [--workers 2]
    .venv/bin/python bench/throughput.py token-bound [--workers 2]
    .venv/bin/python bench/throughput.py latency-bound

request-bound: 3,000 jobs, 0.5 s latency, simulator RPM 3,000 enforced per second (50/s), so
the limit binds: ideal makespan = N / RPM * 60 + latency.
token-bound: the same jobs, RPM out of the way, a TPM that binds first: ideal = total tokens
(as the simulator counts them: prompt + max_tokens) / TPM * 60 + latency.
latency-bound: 2,000 jobs, 2 s latency, no limits, one worker process with 256 threads: most
calls in flight at once (the simulator counts them), makespan against N / slots * latency,
and the worker's memory per call in flight.
In the limited scenarios the naive peer (bench/peer.py) runs the same requests after chatjobs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.overhead import submit_all
from bench.peer import run_peer
from bench.stack import Stack, cpu_delta, running_stack, wait_finished


def request_for(i: int) -> dict[str, Any]:
    # max_tokens 16 is below every simulated reply, so completion = max_tokens exactly and
    # the simulator's TPM charge (prompt + max_tokens) equals the real usage.
    return {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": f"Summarise document number {i} briefly."}],
        "max_tokens": 16,
    }


def wait_all(database_url: str, timeout: float) -> tuple[float, int]:
    """Wait until no job is pending; returns (makespan, succeeded)."""
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as conn:
        wait_finished(conn, timeout)
        row = conn.execute(
            text(
                "SELECT extract(epoch FROM max(completed_at) - min(created_at)), "
                "count(*) FILTER (WHERE status = 'succeeded') FROM jobs"
            )
        ).one()
    engine.dispose()
    return float(row[0] or 0), int(row[1])


def submit(stack: Stack, n: int) -> None:
    """Submit n jobs (bodies from request_for) with 32 concurrent clients."""
    asyncio.run(submit_all(stack.api_url, stack.key, n, 32, make_request=request_for))


def prompt_tokens(i: int) -> int:
    from chatjobs.tokens import count_messages, lookup_model

    return count_messages(request_for(i)["messages"], lookup_model("gpt-4.1")).tokens


def limited(ns: argparse.Namespace, kind: str) -> None:
    n, latency = ns.jobs, 0.5
    if kind == "request-bound":
        rpm, tpm = 3000, None
        ideal = n / rpm * 60 + latency
        sim_args = ["--rpm", str(rpm)]
    else:
        total = sum(prompt_tokens(i) + 16 for i in range(n))
        tpm, rpm = total, None  # one minute's worth: binds long before RPM would
        ideal = total / tpm * 60 + latency
        sim_args = ["--tpm", str(tpm)]
    sim_args += ["--latency", str(latency), "--limit-window", "second"]
    env = {
        "CHATJOBS_UPSTREAM_RPM": str(rpm) if rpm else "",
        "CHATJOBS_UPSTREAM_TPM": str(tpm) if tpm else "",
        "CHATJOBS_DISPATCH_INTERVAL_SECONDS": "0.25",
    }
    env = {k: v for k, v in env.items() if v}
    with running_stack(
        sim_args=sim_args,
        workers=ns.workers,
        env=env,
        worker_args=["--concurrency", str(ns.concurrency)],
    ) as stack:
        cpu_before = stack.cpu_seconds()
        submit(stack, n)
        makespan, succeeded = wait_all(stack.database_url, ns.timeout)
        cpu = cpu_delta(cpu_before, stack.cpu_seconds())
        stats = httpx.get(f"{stack.sim_url}/_sim/stats").json()
        peer = run_peer(stack.sim_url, n, ns.concurrency, request_for) if ns.peer else None
    line = (
        f"{kind} jobs={n} workers={ns.workers}x{ns.concurrency} succeeded={succeeded} "
        f"makespan_s={makespan:.1f} ideal_s={ideal:.1f} "
        f"over_ideal={(makespan / ideal - 1) * 100:+.1f}% upstream_calls={stats['requests']} "
        f"429s={stats['rate_limited']} "
        f"({stats['rate_limited'] / max(1, stats['requests']) * 100:.2f}%)"
    )
    if peer:
        line += (
            f" | peer(AsyncOpenAI, semaphore {ns.concurrency}, default retries): "
            f"makespan_s={peer['makespan_s']:.1f} 429s={peer['rate_limited']} "
            f"failed={peer['failed']}"
        )
    print(line + f" {cpu}")


def rss_kb(pid: int) -> int:
    total = 0
    for path in [Path(f"/proc/{pid}/status")]:
        for line in path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def latency_bound(ns: argparse.Namespace) -> None:
    n, latency, slots = ns.jobs, 2.0, ns.concurrency
    with running_stack(
        sim_args=["--latency", str(latency)],
        workers=1,
        worker_args=["--concurrency", str(slots)],
        env={"CHATJOBS_DISPATCH_INTERVAL_SECONDS": "0.25"},
    ) as stack:
        worker = next(p for p in stack.procs if p.name == "worker0")
        assert worker.popen is not None
        time.sleep(3)
        idle_kb = rss_kb(worker.popen.pid)
        peak = {"kb": idle_kb}
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                peak["kb"] = max(peak["kb"], rss_kb(worker.popen.pid))  # type: ignore[union-attr]

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        submit(stack, n)
        makespan, succeeded = wait_all(stack.database_url, ns.timeout)
        stop.set()
        stats = httpx.get(f"{stack.sim_url}/_sim/stats").json()
    ideal = n / slots * latency
    in_flight = stats["max_in_flight"]
    per_call = (peak["kb"] - idle_kb) / max(1, in_flight)
    print(
        f"latency-bound jobs={n} slots={slots} succeeded={succeeded} "
        f"max_in_flight={in_flight} makespan_s={makespan:.1f} ideal_s={ideal:.1f} "
        f"worker_rss_idle_mb={idle_kb / 1024:.0f} worker_rss_peak_mb={peak['kb'] / 1024:.0f} "
        f"kb_per_call_in_flight={per_call:.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=["request-bound", "token-bound", "latency-bound"])
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--timeout", type=float, default=900)
    ns = parser.parse_args()
    if ns.scenario == "latency-bound":
        ns.jobs = ns.jobs or 2000
        ns.concurrency = ns.concurrency or 256
        latency_bound(ns)
    else:
        ns.jobs = ns.jobs or 3000
        ns.concurrency = ns.concurrency or 64
        limited(ns, ns.scenario)


if __name__ == "__main__":
    main()
