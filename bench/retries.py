"""Retry amplification: N jobs against a simulator that fails 10% with 429 and 5% with 503.

    .venv/bin/python bench/retries.py --jobs 2000

Prints one line: jobs succeeded, upstream calls per job (amplification; the ideal for a 15%
independent failure rate is 1 / 0.85 = 1.18), failed jobs, the attempt histogram, makespan.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.overhead import submit_all
from bench.stack import running_stack, wait_finished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=600)
    ns = parser.parse_args()
    # Drawn uniformly from the list: two 429s and one 503 in 15% gives 10% and 5%.
    sim_args = ["--error-rate", "0.15", "--error-statuses", "429,429,503", "--seed", "7"]
    env = {
        "CHATJOBS_RETRY_BASE_SECONDS": "0.5",
        "CHATJOBS_RETRY_CAP_SECONDS": "8",
        "CHATJOBS_DISPATCH_INTERVAL_SECONDS": "0.5",
    }
    with running_stack(sim_args=sim_args, env=env) as stack:
        asyncio.run(submit_all(stack.api_url, stack.key, ns.jobs, 32))
        engine = create_engine(stack.database_url, poolclass=NullPool)
        with engine.connect() as conn:
            wait_finished(conn, ns.timeout)
            succeeded = conn.scalar(text("SELECT count(*) FROM jobs WHERE status='succeeded'"))
            failed = conn.scalar(text("SELECT count(*) FROM jobs WHERE status='failed'"))
            calls = conn.scalar(text("SELECT count(*) FROM upstream_calls"))
            by_status = dict(
                conn.execute(
                    text("SELECT coalesce(status_code, 0), count(*) FROM upstream_calls GROUP BY 1")
                ).all()
            )
            histogram = dict(
                conn.execute(
                    text("SELECT attempts, count(*) FROM jobs GROUP BY 1 ORDER BY 1")
                ).all()
            )
            makespan = conn.scalar(
                text("SELECT extract(epoch FROM max(completed_at) - min(created_at)) FROM jobs")
            )
        engine.dispose()
        sim_stats = httpx.get(f"{stack.sim_url}/_sim/stats").json()
    print(
        f"retries jobs={ns.jobs} succeeded={succeeded} failed={failed} calls={calls} "
        f"amplification={calls / ns.jobs:.3f} ideal={1 / 0.85:.3f} "
        f"calls_by_status={by_status} attempts_histogram={histogram} "
        f"makespan_s={float(makespan or 0):.1f} sim_requests={sim_stats['requests']}"
    )


if __name__ == "__main__":
    main()
