"""Priority: with a backlog of low-priority jobs, how soon a higher-priority job is claimed.

    .venv/bin/python bench/priority.py [--low 5000] [--trials 10] [--upstream limited]
    .venv/bin/python bench/priority.py --upstream unlimited

``--low`` jobs at priority -50 are submitted while no worker runs (so all of them wait;
beat's dispatcher admits one window to the broker), then the worker starts; 5 s later, one job
at priority 50 is submitted every ``--gap`` seconds, ``--trials`` times. Per trial: the
low-priority jobs still waiting when it was submitted, and its ``started_at - created_at``
(claimed; target < 1 s) and ``completed_at - created_at``.

limited: the simulator of bench/fairness.py (3,000 RPM per calendar second, 0.5-1.0 s), so
the backlog outlasts the trials. unlimited: zero latency, no limits, so the backlog drains as
fast as the stack can and the broker's window turns over fastest.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fairness import LIMITED_ENV, limited_sim_args, request_maker
from bench.overhead import start_worker, submit_all
from bench.stack import cpu_delta, running_stack, wait_finished


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--low", type=int, default=5000)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--gap", type=float, default=3.0)
    parser.add_argument("--upstream", choices=["limited", "unlimited"], default="limited")
    parser.add_argument("--concurrency", type=int, default=64, help="worker slots")
    parser.add_argument("--timeout", type=float, default=900)
    ns = parser.parse_args()
    limited = ns.upstream == "limited"
    load_before = _load()
    with running_stack(
        sim_args=limited_sim_args(0.5, 0.5) if limited else (),
        workers=0,
        env=LIMITED_ENV if limited else None,
    ) as stack:
        asyncio.run(
            submit_all(
                stack.api_url, stack.key, ns.low, 32, request_maker("low", 200), {"priority": -50}
            )
        )
        cpu_before = stack.cpu_seconds()
        start_worker(stack, 0, ["--concurrency", str(ns.concurrency)])
        engine = create_engine(stack.database_url, poolclass=NullPool)
        trials: list[tuple[str, int]] = []
        high = request_maker("high", 200)
        with engine.connect() as conn:
            while conn.scalar(text("SELECT count(started_at) FROM jobs")) == 0:
                conn.commit()
                time.sleep(0.1)
            conn.commit()
            time.sleep(5)
            with httpx.Client(
                base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.key}"}
            ) as client:
                for i in range(ns.trials):
                    waiting = conn.scalar(text("SELECT count(*) FROM jobs WHERE status = 'queued'"))
                    conn.commit()
                    job = client.post("/v1/jobs", json={"request": high(i), "priority": 50})
                    job.raise_for_status()
                    trials.append((job.json()["id"], int(waiting or 0)))
                    time.sleep(ns.gap)
            wait_finished(conn, ns.timeout)
            rows = {
                str(r[0]): (float(r[1]), float(r[2]))
                for r in conn.execute(
                    text(
                        "SELECT id, extract(epoch FROM started_at - created_at), "
                        "extract(epoch FROM completed_at - created_at) FROM jobs "
                        "WHERE priority = 50"
                    )
                )
            }
            low_done = conn.scalar(
                text("SELECT count(*) FROM jobs WHERE priority = -50 AND status = 'succeeded'")
            )
        engine.dispose()
        cpu = cpu_delta(cpu_before, stack.cpu_seconds())
        stats = httpx.get(f"{stack.sim_url}/_sim/stats").json()
    claims = [rows[job_id][0] for job_id, _ in trials]
    print(
        f"priority upstream={ns.upstream} low={ns.low}(priority -50) high=priority 50 "
        f"trials={ns.trials} claim_s max={max(claims):.3f} "
        f"mean={sum(claims) / len(claims):.3f} (target < 1 s: "
        f"{'met' if max(claims) < 1 else 'MISSED'}) low_succeeded={low_done} "
        f"429s={stats['rate_limited']} load {load_before} -> {_load()} {cpu}",
        flush=True,
    )
    for n, (job_id, waiting) in enumerate(trials, 1):
        claim, done = rows[job_id]
        print(
            f"  trial {n}: low-priority jobs queued={waiting} claimed_after_s={claim:.3f} "
            f"done_after_s={done:.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
