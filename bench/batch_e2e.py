"""Batch end to end: an N-line batch through the simulator, with a worker and beat, to done.

    .venv/bin/python bench/batch_e2e.py [--lines 10000] [--upstream make-run|strict]
        [--sim-json '{...}'] [--release-window 64] [--probe-every 15] [--profile]

The stack is `make run`'s: one worker with the default threads pool and concurrency (64),
beat (dispatcher and reconciler), the simulator at 0.5 s latency. ``--upstream strict`` then
sets the simulator (POST /_sim/config) to a stricter upstream: 0.5-1.5 s latency (jitter),
3,000 RPM and 450,000 TPM in a sliding 60-second window, 5% of calls answered 429, 500, 502,
503 or 529 (no Retry-After), and 1% hanging for 30 s; chatjobs is told the limits
(CHATJOBS_UPSTREAM_RPM and _TPM, as an operator would) and gives up on a call after 10 s
(CHATJOBS_UPSTREAM_READ_TIMEOUT). ``--sim-json`` changes that config.

It uploads the file and creates the batch with the openai SDK, polls the batch every 0.25 s
until it ends, and meanwhile submits one ordinary job (POST /v1/jobs) every ``--probe-every``
seconds and times it to done: a job submitted while the batch runs must not wait behind it.
Then it reads Postgres (the batch's own timestamps and its lines'), downloads the output and
error files and checks that every custom_id appears exactly once across them. A batch where
no line ends for ``--stall-after`` seconds is reported as stalled, with what the dispatcher's
release window sees. ``--profile`` samples the worker with py-spy for 20 s, 30 s into the
run, and prints how many of its threads were in each state on average.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.batch_ingest import MODEL, batch_file, ingest, request_body, sdk, stop_on_signals
from bench.stack import Stack, cpu_delta, percentile, running_stack

MAKE_RUN_LATENCY = 0.5
STRICT_RPM, STRICT_TPM = 3000, 450_000
STRICT_SIM: dict[str, Any] = {
    "latency": 0.5,
    "jitter": 1.0,
    "rpm": STRICT_RPM,
    "tpm": STRICT_TPM,
    "limit_window": "minute",
    "error_rate": 0.05,
    "error_statuses": [429, 500, 502, 503, 529],
    "timeout_rate": 0.01,
    "hang_seconds": 30,
}
STRICT_ENV = {
    "CHATJOBS_UPSTREAM_RPM": str(STRICT_RPM),
    "CHATJOBS_UPSTREAM_TPM": str(STRICT_TPM),
    "CHATJOBS_UPSTREAM_READ_TIMEOUT": "10",
}
ENDED = {"completed", "failed", "expired", "cancelled"}
# The probe jobs' bodies: like the batch lines, drawn apart from them.
_PROBE_RNG = random.Random(7)


@dataclass
class Probe:
    """One ordinary job submitted while the batch ran."""

    at_s: float  # seconds after the batch went in_progress
    latency_s: float  # POST to a terminal status, as the client saw it
    status: str
    job_id: str


def probe_jobs(stack: Stack, every: float, stop: threading.Event, out: list[Probe]) -> None:
    """Every ``every`` seconds until ``stop``, submit one job and wait for it (polled 50 ms)."""
    started = time.monotonic()
    with httpx.Client(
        base_url=stack.api_url, headers={"Authorization": f"Bearer {stack.key}"}, timeout=30
    ) as client:
        while not stop.wait(every):
            body = {"request": {**request_body(_PROBE_RNG, max_tokens=16), "model": MODEL}}
            sent = time.monotonic()
            job = client.post("/v1/jobs", json=body).raise_for_status().json()
            while job["status"] not in ("succeeded", "failed", "cancelled", "expired"):
                time.sleep(0.05)
                job = client.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
            out.append(Probe(sent - started, time.monotonic() - sent, job["status"], job["id"]))


def wait_ended(
    client: openai.OpenAI,
    batch_id: str,
    *,
    stall_after: float,
    timeout: float,
    timeline: list[tuple[float, int, int]],
) -> Any:
    """Poll the batch every 0.25 s until it ends; returns it as last seen, ended or not, when
    no line has ended for ``stall_after`` seconds (or ``timeout`` has passed). Appends
    (seconds, lines ended, lines being called) to ``timeline`` at every poll."""
    started = time.monotonic()
    last_ended, moved = -1, started
    while True:
        batch = client.batches.retrieve(batch_id)
        counts = batch.request_counts
        ended = counts.completed + counts.failed if counts else 0
        now = time.monotonic()
        timeline.append((now - started, ended, int(getattr(counts, "in_progress", 0) or 0)))
        if ended != last_ended:
            last_ended, moved = ended, now
        if batch.status in ENDED or now - moved > stall_after or now - started > timeout:
            return batch
        time.sleep(0.25)


def rate_by_period(timeline: list[tuple[float, int, int]], period: float = 30.0) -> str:
    """Lines ended per second and the mean of lines being called, per ``period`` seconds."""
    out = []
    start = 0.0
    while timeline and start < timeline[-1][0]:
        window = [row for row in timeline if start <= row[0] < start + period]
        if len(window) > 1:
            (t0, e0, _), (t1, e1, _) = window[0], window[-1]
            running = sum(row[2] for row in window) / len(window)
            rate = (e1 - e0) / (t1 - t0) if t1 > t0 else 0.0
            out.append(f"{start:.0f}-{start + period:.0f}s:{rate:.0f}/s(calling {running:.0f})")
        start += period
    return " ".join(out)


def dispatcher_view(stack: Stack) -> str:
    """What the dispatcher's release window sees: held and released-not-started lines in
    Postgres, the ids the published set says are in the broker (and how many of those jobs
    have in fact finished), and the broker's real list."""
    import redis

    from chatjobs.jobs.dispatch import _published_key, waiting_in_broker

    broker = redis.Redis.from_url(stack.env["CHATJOBS_REDIS_URL"], decode_responses=True)
    published = [str(m) for m in broker.zrange(_published_key(), 0, -1)]
    messages = broker.llen(stack.env["CHATJOBS_QUEUE_NAME"])
    engine = create_engine(stack.database_url, poolclass=NullPool)
    with engine.connect() as conn:
        held, released = conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE held), count(*) FILTER (WHERE NOT held AND "
                "status IN ('queued', 'retrying')) FROM jobs WHERE batch_id IS NOT NULL"
            )
        ).one()
        finished = conn.scalar(
            text(
                "SELECT count(*) FROM jobs WHERE id = ANY(CAST(:ids AS uuid[])) "
                "AND status IN ('succeeded', 'failed', 'cancelled', 'expired')"
            ),
            {"ids": published},
        )
    engine.dispose()
    return (
        f"held_lines={held} released_not_started={released} "
        f"published_set={waiting_in_broker()} of_which_finished_jobs={finished} "
        f"broker_messages={messages}"
    )


# Where a worker thread is, by the frames of its stack (first match wins); ``other_in_job``
# is the rest of a job's time in the worker: CPU, and sleeping until a limiter slot.
_WORKER_STATES = (
    ("upstream_call", "Runtime.call (worker/runtime.py"),
    ("batch_progress_db", "lines_ended (chatjobs/batches/progress.py"),
    ("other_db", "Connection.wait (psycopg/connection.py"),
    ("other_db", "_exec_command (psycopg/_connection_base.py"),
    ("other_in_job", "run_job (worker/execute.py"),
)


def worker_threads(raw: Path) -> dict[str, float]:
    """Mean worker threads in each state over a py-spy recording (raw, --idle, --threads):
    a thread of the pool that is not inside run_job is waiting for a message. Normalised by
    the samples py-spy took of each thread (it falls short of the rate asked for)."""
    states: Counter[str] = Counter()
    per_thread: Counter[str] = Counter()
    for row in raw.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        per_thread[stack.split(";", 1)[0]] += int(count)
        if "_worker (concurrent/futures/thread.py" not in stack:
            continue  # Celery's own threads, the asyncio loop: not job slots
        state = next((name for name, frame in _WORKER_STATES if frame in stack), "waiting_for_work")
        states[state] += int(count)
    samples = max(per_thread.values(), default=0) or 1
    return {name: n / samples for name, n in states.most_common()}


def profile_worker(
    stack: Stack, after: float, seconds: float, out: list[str], keep: Path | None = None
) -> None:
    """Record the worker with py-spy for ``seconds`` from ``after`` seconds on (the raw stacks
    copied into ``keep``, when given)."""
    from bench.batch_ingest import py_spy_binary, py_spy_record

    if py_spy_binary() is None:
        out.append("py-spy not found (pip install py-spy, or PY_SPY=/path)")
        return
    time.sleep(after)
    popen = next(p.popen for p in stack.procs if p.name == "worker0")
    assert popen is not None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "worker.txt"
        with py_spy_record(popen.pid, raw, rate=100):
            time.sleep(seconds)
        threads = worker_threads(raw)
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(raw, keep / "worker.txt")
    out.append(
        f"worker threads, mean over {after:.0f}-{after + seconds:.0f} s (py-spy): "
        + " ".join(f"{k}={v:.1f}" for k, v in threads.items())
    )


def read_jsonl(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = client.files.content(file_id).content
    return [json.loads(line) for line in content.splitlines() if line.strip()]


def expected_tokens(content: bytes) -> int:
    """What the simulator charges against its TPM for the whole file (prompt + max_tokens)."""
    from chatjobs.simulator import count_prompt_tokens

    total = 0
    for line in content.splitlines():
        body = json.loads(line)["body"]
        total += count_prompt_tokens(body["messages"]) + body["max_tokens"]
    return total


def facts(database_url: str, batch_id: str, probes: list[str]) -> dict[str, Any]:
    """What Postgres says about the batch, its lines and the probe jobs."""
    engine = create_engine(database_url, poolclass=NullPool)
    with engine.connect() as conn:
        row = conn.execute(
            text(
                """SELECT extract(epoch FROM b.completed_at - b.in_progress_at),
                          extract(epoch FROM b.completed_at - l.last_end),
                          extract(epoch FROM b.finalizing_at - l.last_end),
                          extract(epoch FROM l.first_start - b.in_progress_at),
                          l.attempts_gt1, l.max_attempts
                     FROM batches b,
                          (SELECT max(completed_at) AS last_end, min(started_at) AS first_start,
                                  count(*) FILTER (WHERE attempts > 1) AS attempts_gt1,
                                  max(attempts) AS max_attempts
                             FROM jobs WHERE batch_id = :b) l
                    WHERE b.id = :b"""
            ),
            {"b": batch_id},
        ).one()
        attempts: dict[Any, Any] = dict(
            conn.execute(
                text("SELECT attempts, count(*) FROM jobs WHERE batch_id = :b GROUP BY 1"),
                {"b": batch_id},
            ).all()
        )
        calls: dict[Any, Any] = dict(
            conn.execute(
                text(
                    "SELECT coalesce(status_code::text, 'none'), count(*) FROM upstream_calls "
                    "GROUP BY 1 ORDER BY 2 DESC"
                )
            ).all()
        )
        waits = [
            float(w)
            for w in conn.scalars(
                text(
                    "SELECT extract(epoch FROM started_at - created_at) FROM jobs "
                    "WHERE id = ANY(CAST(:ids AS uuid[])) AND started_at IS NOT NULL"
                ),
                {"ids": probes},
            )
        ]
    engine.dispose()
    return {
        "run_s": float(row[0] or 0),
        "last_line_to_completed_s": float(row[1]) if row[1] is not None else None,
        "last_line_to_finalizing_s": float(row[2]) if row[2] is not None else None,
        "first_start_s": float(row[3] or 0),
        "retried_lines": int(row[4] or 0),
        "attempts": {int(k): int(v) for k, v in sorted(attempts.items())},
        "calls": {str(k): int(v) for k, v in calls.items()},
        "probe_queue_waits": waits,
    }


def _secs(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--upstream", choices=["make-run", "strict"], default="make-run")
    parser.add_argument(
        "--release-window", type=int, help="CHATJOBS_BATCH_RELEASE_WINDOW (default: the app's)"
    )
    parser.add_argument("--probe-every", type=float, default=15.0)
    parser.add_argument(
        "--sim-json",
        default="{}",
        help="changes to the strict simulator config, e.g. '{\"error_statuses\": [500, 503]}'",
    )
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument(
        "--profile", action="store_true", help="py-spy the worker for 20 s, 30 s into the run"
    )
    parser.add_argument("--keep-profile", type=Path, help="directory for py-spy's raw stacks")
    parser.add_argument(
        "--stall-after", type=float, default=90, help="give up when no line ends for this long"
    )
    ns = parser.parse_args()
    stop_on_signals()

    content = batch_file(ns.lines, seed=2)
    custom_ids = [f"req-{i}" for i in range(ns.lines)]
    env = dict(STRICT_ENV) if ns.upstream == "strict" else {}
    if ns.release_window:
        env["CHATJOBS_BATCH_RELEASE_WINDOW"] = str(ns.release_window)
    with running_stack(sim_args=["--latency", str(MAKE_RUN_LATENCY)], workers=1, env=env) as stack:
        if ns.upstream == "strict":
            sim_config = {**STRICT_SIM, **json.loads(ns.sim_json)}
            httpx.post(f"{stack.sim_url}/_sim/config", json=sim_config).raise_for_status()
        client = sdk(stack)
        cpu_before = stack.cpu_seconds()
        started = time.monotonic()
        run = ingest(client, content)
        assert run.batch.status == "in_progress", (run.batch.status, run.batch.errors)
        in_progress = time.monotonic()
        probes: list[Probe] = []
        timeline: list[tuple[float, int, int]] = []
        stop = threading.Event()
        prober = threading.Thread(target=probe_jobs, args=(stack, ns.probe_every, stop, probes))
        prober.start()
        profile: list[str] = []
        profiler = threading.Thread(
            target=profile_worker,
            args=(stack, 30.0, 20.0, profile, ns.keep_profile),
            daemon=True,
        )
        if ns.profile:
            profiler.start()
        try:
            batch = wait_ended(
                client,
                run.batch.id,
                stall_after=ns.stall_after,
                timeout=ns.timeout,
                timeline=timeline,
            )
        finally:
            stop.set()
            prober.join()
        ended = time.monotonic()
        cpu = cpu_delta(cpu_before, stack.cpu_seconds())
        if batch.status not in ENDED:
            counts = batch.request_counts
            print(
                f"batch_e2e upstream={ns.upstream} lines={ns.lines} STALLED status={batch.status} "
                f"completed={counts.completed if counts else None} "
                f"failed={counts.failed if counts else None} after {ended - in_progress:.0f} s "
                f"(no line ended for {ns.stall_after:.0f} s); {dispatcher_view(stack)}; "
                f"probes (at_s/latency_s): "
                + ",".join(f"{p.at_s:.0f}/{p.latency_s:.2f}" for p in probes)
                + f"; logs kept in {stack.logs}.kept",
                flush=True,
            )
            print(f"  timeline: {rate_by_period(timeline)}", flush=True)
            shutil.copytree(
                stack.logs, f"{stack.logs}.kept", ignore=shutil.ignore_patterns("postgres")
            )
            sys.exit(1)
        output = read_jsonl(client, batch.output_file_id)
        errors = read_jsonl(client, batch.error_file_id)
        db = facts(stack.database_url, batch.id, [p.job_id for p in probes])
        sim = httpx.get(f"{stack.sim_url}/_sim/stats").json()

    seen = Counter(line["custom_id"] for line in output + errors)
    once = sorted(seen) == sorted(custom_ids) and max(seen.values()) == 1
    ok_lines = sum(1 for line in output if (line.get("response") or {}).get("status_code") == 200)
    counts = batch.request_counts
    latencies = [p.latency_s for p in probes]
    wall = ended - in_progress
    print(
        f"batch_e2e upstream={ns.upstream} lines={ns.lines} status={batch.status} "
        f"completed={counts.completed if counts else None} "
        f"failed={counts.failed if counts else None} "
        f"upload_s={run.upload_s:.2f} validate_s={run.to_in_progress_s:.2f} "
        f"in_progress_to_completed_s={wall:.1f} (db {db['run_s']:.1f}) "
        f"upload_to_completed_s={ended - started:.1f} lines_per_s={ns.lines / db['run_s']:.1f} "
        f"first_line_started_after_s={db['first_start_s']:.2f} "
        f"last_line_to_completed_s={_secs(db['last_line_to_completed_s'])} "
        f"last_line_to_finalizing_s={_secs(db['last_line_to_finalizing_s'])} "
        f"output_lines={len(output)} ok_lines={ok_lines} error_lines={len(errors)} "
        f"each_custom_id_once={once}",
        flush=True,
    )
    print(
        f"  probes: n={len(probes)} statuses={dict(Counter(p.status for p in probes))} "
        f"latency_s p50={percentile(latencies, 50):.2f} max={max(latencies, default=0):.2f} "
        f"queue_wait_s max={max(db['probe_queue_waits'], default=0):.2f} "
        "each(at_s/latency_s)=" + ",".join(f"{p.at_s:.0f}/{p.latency_s:.2f}" for p in probes),
        flush=True,
    )
    # 64 threads, each call MAKE_RUN_LATENCY long; and the dispatcher's window, refilled once
    # a tick (CHATJOBS_DISPATCH_INTERVAL_SECONDS, 1 s): at most a window of lines a second.
    ideal = ns.lines / (64 / MAKE_RUN_LATENCY)
    window_bound = ns.lines / (ns.release_window or 64)
    if ns.upstream == "strict":
        tokens = expected_tokens(content)
        ideal = max(ns.lines / STRICT_RPM * 60, tokens / STRICT_TPM * 60)
        print(f"  file tokens (simulator's count, with max_tokens)={tokens}", flush=True)
    print(
        f"  ideal_s={ideal:.1f} release_window_bound_s={window_bound:.1f} "
        f"attempts={db['attempts']} retried_lines={db['retried_lines']} "
        f"upstream_calls={db['calls']} sim_requests={sim.get('requests')} {cpu}",
        flush=True,
    )
    print(f"  timeline: {rate_by_period(timeline)}", flush=True)
    for line in profile:
        print(f"  {line}", flush=True)


if __name__ == "__main__":
    main()
