"""Overhead: N jobs against a zero-latency, unlimited simulator; jobs/s from submit to done.

    .venv/bin/python bench/overhead.py --jobs 5000

Prints one line: jobs, submit rate, end-to-end jobs/s (first submit to last completion),
p50 and p99 queue wait (created_at to started_at), and upstream calls seen by the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import cpu_delta, percentile, running_stack, wait_finished

REQUEST = {
    "model": "gpt-4.1",
    "messages": [{"role": "user", "content": "What are the three laws of thermodynamics?"}],
}


async def submit_all(
    api_url: str,
    key: str,
    jobs: int,
    concurrency: int,
    make_request: Callable[[int], dict[str, Any]] | None = None,
) -> float:
    """Submit ``jobs`` jobs with ``concurrency`` clients; returns the seconds it took."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(jobs):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=api_url, limits=limits, timeout=60, headers={"Authorization": f"Bearer {key}"}
    ) as client:

        async def one_client() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                request = make_request(i) if make_request else {**REQUEST, "metadata_i": i}
                body = {"request": request}
                response = await client.post("/v1/jobs", json=body)
                response.raise_for_status()

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32, help="submitting clients")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--worker-concurrency", type=int, default=64)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600)
    ns = parser.parse_args()

    with running_stack(
        workers=ns.workers,
        api_workers=ns.api_workers,
        worker_args=["--concurrency", str(ns.worker_concurrency)],
    ) as stack:
        cpu_before = stack.cpu_seconds()
        submit_s = asyncio.run(submit_all(stack.api_url, stack.key, ns.jobs, ns.concurrency))
        engine = create_engine(stack.database_url, poolclass=NullPool)
        with engine.connect() as conn:
            wait_finished(conn, ns.timeout)
            row = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
                    "extract(epoch FROM max(completed_at) - min(created_at)) FROM jobs"
                )
            ).one()
            retried = conn.scalar(text("SELECT count(*) FROM jobs WHERE attempts > 1"))
            failed_calls = conn.scalar(
                text("SELECT count(*) FROM upstream_calls WHERE status_code IS DISTINCT FROM 200")
            )
            waits = [
                float(w)
                for w in conn.scalars(
                    text(
                        "SELECT extract(epoch FROM started_at - created_at) FROM jobs "
                        "WHERE started_at IS NOT NULL"
                    )
                )
            ]
        engine.dispose()
        cpu = cpu_delta(cpu_before, stack.cpu_seconds())
        calls = httpx.get(f"{stack.sim_url}/_sim/stats").json()["requests"]
    succeeded, makespan = int(row[0]), float(row[1] or 0)
    print(
        f"overhead jobs={ns.jobs} succeeded={succeeded} workers={ns.workers}"
        f"x{ns.worker_concurrency} submit_rps={ns.jobs / submit_s:.0f} "
        f"makespan_s={makespan:.2f} jobs_per_s={succeeded / makespan if makespan else 0:.0f} "
        f"queue_wait_p50_ms={percentile(waits, 50) * 1000:.0f} "
        f"queue_wait_p99_ms={percentile(waits, 99) * 1000:.0f} upstream_calls={calls} "
        f"retried_jobs={retried} failed_calls={failed_calls} {cpu}"
    )


if __name__ == "__main__":
    main()
