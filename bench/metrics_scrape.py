"""What a Prometheus scrape of GET /metrics costs as the jobs table grows.

    .venv/bin/python bench/metrics_scrape.py --rows 100000,1000000

For each size: the benchmark's database gets that many jobs (97 % succeeded, 1 % failed,
1 % waiting for admission, 0.5 % admitted, 0.5 % running; a tenth of them batch lines,
retention keeps finished jobs for 30 days, so finished rows are most of a real table) and a
thousand batches, then analysed; /metrics is scraped over HTTP (past the gauge cache each
time) five times. Prints the scrape's wall time (p50, max) and the Postgres time of the
gauges' three statements (EXPLAIN ANALYZE).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import running_stack

FILL = """
INSERT INTO jobs (id, tenant_id, status, model, request, queue, priority, cost, attempts,
                  claim_seq, max_attempts, prompt_tokens, completion_tokens, total_tokens,
                  needs_plan, batch_id, next_attempt_at, created_at, updated_at)
SELECT gen_random_uuid(), :tenant,
       (CASE WHEN i % 200 < 194 THEN 'succeeded' WHEN i % 200 < 196 THEN 'failed'
             WHEN i % 200 < 198 THEN 'queued' WHEN i % 200 < 199 THEN 'retrying'
             ELSE 'running' END)::job_status,
       'gpt-4.1', '{}'::jsonb, :queue, 0, 1, 1, 1, 6, 10, 10, 20, false,
       CASE WHEN i % 10 = 0 THEN 'batch_' || (i % 1000) END,
       CASE WHEN i % 200 IN (196, 197) THEN now() - interval '1 minute' END,
       now() - (i || ' seconds')::interval, now()
FROM generate_series(:start, :stop - 1) AS i
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="100000,1000000")
    args = parser.parse_args()
    sizes = [int(n) for n in args.rows.split(",")]
    from api.routes.metrics import FINISHED_SECONDS, GAUGE_SECONDS
    from chatjobs import metrics
    from chatjobs.db import reset_engine, session_scope
    from chatjobs.settings import get_settings

    def median_ms(read: Callable[[Session], object]) -> float:
        times = []
        for _ in range(5):
            with session_scope() as session:
                started = time.perf_counter()
                read(session)
                times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    last_first = 0.0

    with running_stack(workers=0) as stack:
        engine = create_engine(
            stack.database_url.replace("postgresql://", "postgresql+psycopg://"),
            poolclass=NullPool,
        )
        queue = stack.env["CHATJOBS_QUEUE_NAME"]
        # This process reads the gauges as the api does: the same database and queue.
        os.environ["CHATJOBS_DATABASE_URL"] = stack.database_url
        os.environ["CHATJOBS_QUEUE_NAME"] = queue
        get_settings.cache_clear()
        reset_engine()
        with engine.begin() as conn:
            tenant = conn.execute(text("SELECT id FROM tenants LIMIT 1")).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO batches (id, tenant_id, status, endpoint, input_file_id,"
                    " completion_window, window_seconds, queue, expires_at)"
                    " SELECT 'batch_' || i, :t, 'completed', '/v1/chat/completions', 'file_x',"
                    " '24h', 86400, :q, now() FROM generate_series(0, 999) AS i"
                ),
                {"t": tenant, "q": queue},
            )
        done = 0
        with httpx.Client(base_url=stack.api_url, timeout=120) as client:
            for size in sizes:
                while done < size:
                    stop = min(size, done + 100_000)
                    with engine.begin() as conn:
                        conn.execute(
                            text(FILL),
                            {"tenant": tenant, "queue": queue, "start": done, "stop": stop},
                        )
                    done = stop
                with engine.connect() as conn:
                    conn.execution_options(isolation_level="AUTOCOMMIT").execute(
                        text("VACUUM ANALYZE jobs")
                    )
                timed = {
                    "finished": lambda s: metrics.count_jobs(s, finished=True),
                    "active": lambda s: metrics.count_jobs(s, finished=False),
                    "active+oldest+batches": lambda s: metrics.read_gauges(s, {}),
                }
                reads = {name: median_ms(read) for name, read in timed.items()}
                # The api counts finished jobs at most once a minute: the first scrape here is
                # the first past that minute.
                time.sleep(max(0.0, last_first + FINISHED_SECONDS - time.monotonic()))
                last_first = time.monotonic()
                walls = []
                for _ in range(6):
                    # Past both caches the first time, past the short one after.
                    time.sleep(GAUGE_SECONDS + 0.1)
                    started = time.perf_counter()
                    answer = client.get("/metrics")
                    walls.append((time.perf_counter() - started) * 1000)
                    assert answer.status_code == 200, answer.text
                print(
                    f"rows={size} scrape_ms with_finished={walls[0]:.1f} "
                    f"p50={statistics.median(walls[1:]):.1f} max={max(walls[1:]):.1f} "
                    + " ".join(f"{name}_ms={ms:.1f}" for name, ms in reads.items()),
                    flush=True,
                )
        engine.dispose()


if __name__ == "__main__":
    main()
