"""Offload end to end: N jobs with a 48 h deadline offloaded to a second chatjobs stack's
OpenAI-shaped Files + Batches API (or to the simulator's Anthropic Message Batches), to done.

    .venv/bin/python bench/offload.py [--jobs 10000] [--latency 0.5] [--to chatjobs|anthropic]

The upstream is ``bench.stack.running_stack`` (api, one worker, beat, the simulator at
``--latency``); the offloading stack is a second api, worker and beat on the same database
and a queue of its own, with a models file whose route offloads to the first
(``offload_base_url``). The jobs are submitted with its beat stopped, then beat starts:
the timings are from that moment: gathered and submitted (the upstream batch created),
the upstream batch ended, and every job's outcome written; and where the upstream's time
went (its batch's own in_progress and finalizing timestamps). With ``--to anthropic`` the
route says ``offload = "anthropic-batch"`` and the upstream is the simulator's Message Batches
API, which processes a batch ``--anthropic-delay`` seconds after it is created (all at once):
what is left is chatjobs' own time (encode and send the requests, poll, stream the results,
write the outcomes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import running_stack
from chatjobs.testing import Proc, free_port, python_cli, wait_http

MODEL = "offload-bench"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--to", choices=("chatjobs", "anthropic"), default="chatjobs")
    parser.add_argument("--anthropic-delay", type=float, default=5.0)
    args = parser.parse_args()
    sim_args = (
        "--latency",
        str(args.latency),
        "--anthropic-batch-delay",
        str(args.anthropic_delay),
    )
    with running_stack(sim_args=sim_args) as up:
        models = Path(tempfile.mkdtemp()) / "models.toml"
        if args.to == "anthropic":
            offload = (
                'offload = "anthropic-batch"\n'
                f'offload_base_url = "{up.env["CHATJOBS_UPSTREAM_BASE_URL"]}"\n'
            )
        else:
            offload = (
                f'offload = "openai-batch"\noffload_base_url = "{up.api_url}/v1"\n'
                'offload_api_key_env = "BENCH_UPSTREAM_KEY"\n'
            )
        models.write_text(
            f'[models."{MODEL}"]\nupstream_model = "gpt-4.1"\n{offload}'
            "input_per_mtok = 2.0\noutput_per_mtok = 8.0\n"
        )
        port = free_port()
        env = {
            **up.env,
            "CHATJOBS_QUEUE_NAME": f"chatjobs-offload-{uuid.uuid4().hex[:6]}",
            "CHATJOBS_MODELS_FILE": str(models),
            "BENCH_UPSTREAM_KEY": up.key,
            "CHATJOBS_OFFLOAD_GATHER_SECONDS": "1",
            "CHATJOBS_OFFLOAD_POLL_SECONDS": "1",
            "CHATJOBS_OFFLOAD_POLL_MAX_SECONDS": "2",
        }
        procs = [
            Proc("api2", python_cli("api", "--port", str(port)), env, up.logs / "api2.log").start(),
            Proc("worker2", python_cli("worker"), env, up.logs / "worker2.log").start(),
        ]
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc=procs[0])
            deadline = (datetime.now(UTC) + timedelta(hours=48)).isoformat()
            body = {
                "request": {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "offload bench"}],
                    "max_tokens": 16,
                },
                "deadline": deadline,
            }
            started = time.monotonic()
            with (
                httpx.Client(
                    base_url=f"http://127.0.0.1:{port}",
                    headers={"Authorization": f"Bearer {up.key}"},
                    timeout=60,
                ) as client,
                ThreadPoolExecutor(16) as pool,
            ):
                codes = list(
                    pool.map(
                        lambda _: client.post("/v1/jobs", json=body).status_code, range(args.jobs)
                    )
                )
            assert all(c in (200, 201, 202) for c in codes), set(codes)
            submitted = time.monotonic() - started
            print(f"submitted {args.jobs} jobs in {submitted:.1f}s")
            beat = Proc("beat2", python_cli("beat"), env, up.logs / "beat2.log").start()
            procs.append(beat)
            t0 = time.monotonic()
            engine = create_engine(up.database_url, poolclass=NullPool)
            marks: dict[str, float] = {}
            with engine.connect() as conn:
                while True:
                    row = conn.execute(
                        text(
                            "SELECT count(*) FILTER (WHERE status = 'submitted') AS sub,"
                            " count(*) FILTER (WHERE status = 'ended') AS ended, count(*) AS n"
                            " FROM upstream_batches WHERE model = :m"
                        ),
                        {"m": MODEL},
                    ).one()
                    done = conn.execute(
                        text(
                            "SELECT count(*) FROM jobs WHERE model = :m"
                            " AND status IN ('succeeded', 'failed')"
                        ),
                        {"m": MODEL},
                    ).scalar_one()
                    conn.commit()
                    if row.n and "gathered" not in marks:
                        marks["gathered"] = time.monotonic() - t0
                    if (row.sub or row.ended) and "submitted" not in marks:
                        marks["submitted"] = time.monotonic() - t0
                    if done == args.jobs:
                        marks["all done"] = time.monotonic() - t0
                        break
                    if time.monotonic() - t0 > 1800:
                        raise SystemExit(f"not done after 30 min: {done}/{args.jobs}")
                    time.sleep(0.2)
                rows = conn.execute(
                    text(
                        "SELECT b.items, b.created_at, b.ended_at, u.in_progress_at,"
                        " u.finalizing_at, u.completed_at FROM upstream_batches b"
                        " LEFT JOIN batches u ON u.id = b.upstream_batch_id WHERE b.model = :m"
                    ),
                    {"m": MODEL},
                ).all()
            engine.dispose()
            print(" ".join(f"{k}={v:.1f}s" for k, v in marks.items()))
            for r in rows:
                if r.in_progress_at is None:  # not a chatjobs upstream
                    print(
                        f"upstream batch: {r.items} items; all outcomes written after"
                        f" {(r.ended_at - r.created_at).total_seconds():.1f}s"
                    )
                    continue
                print(
                    f"upstream batch: {r.items} items; upstream in_progress after"
                    f" {(r.in_progress_at - r.created_at).total_seconds():.1f}s, finalizing"
                    f" after {(r.finalizing_at - r.created_at).total_seconds():.1f}s, completed"
                    f" after {(r.completed_at - r.created_at).total_seconds():.1f}s; all outcomes"
                    f" written after {(r.ended_at - r.created_at).total_seconds():.1f}s"
                )
        finally:
            for proc in reversed(procs):
                proc.stop()


if __name__ == "__main__":
    main()
