"""Overhead: N jobs against a zero-latency, unlimited simulator; jobs/s from submit to done.

    .venv/bin/python bench/overhead.py --jobs 5000
    .venv/bin/python bench/overhead.py --drain --jobs 10000 [--profile 20]

Prints one line: jobs, submit rate, end-to-end jobs/s (first submit to last completion),
p50 and p99 queue wait (created_at to started_at), and upstream calls seen by the simulator.

``--drain``: every job is submitted before any worker runs (beat's dispatcher admits a
window of them to the broker, nothing consumes), then the workers start; jobs/s is from the
first claim (min started_at) to the last success (max completed_at), and the CPU of each
process over that span (sampled every second), per job. ``--profile S`` records the
first worker with py-spy (active samples) for S seconds from 2 s after the first claim and
prints its top functions; that run's jobs/s is py-spy's as much as the stack's.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Stack, cpu_delta, percentile, running_stack, wait_finished
from chatjobs.testing import Proc, python_cli

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
    fields: dict[str, Any] | None = None,
) -> float:
    """Submit ``jobs`` jobs with ``concurrency`` clients; returns the seconds it took.
    ``fields`` are added to each body beside the request (e.g. a priority)."""
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
                body = {"request": request, **(fields or {})}
                try:
                    response = await client.post("/v1/jobs", json=body)
                except httpx.TransportError as exc:
                    # A kept-alive connection the server closed as it was reused (seen on
                    # a loaded machine): once more on a new one. The first may have been
                    # stored, so a job can exist twice; the scripts count what they find.
                    print(f"submit {i}: {exc!r}, sent again", file=sys.stderr)
                    response = await client.post("/v1/jobs", json=body)
                response.raise_for_status()

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        return time.monotonic() - started


class CpuSampler:
    """The stack's CPU seconds per process, sampled with the wall clock every ``every``
    seconds, so a span found afterwards (first claim to last success, from Postgres's
    timestamps on this host's clock) gets its own figures."""

    def __init__(self, stack: Stack, every: float = 1.0) -> None:
        self.stack, self.every = stack, every
        self.times: list[float] = []
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.times.append(time.time())
            self.samples.append(self.stack.cpu_seconds())
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> tuple[dict[str, float], float]:
        """CPU seconds per process from the last sample at or before ``start`` to the first
        at or after ``end``, and the seconds those two samples span."""
        i = max(0, bisect.bisect_right(self.times, start) - 1)
        j = min(len(self.times) - 1, bisect.bisect_left(self.times, end))
        first, last = self.samples[i], self.samples[j]
        return {k: v - first.get(k, 0.0) for k, v in last.items()}, self.times[j] - self.times[i]


def start_worker(stack: Stack, i: int, args: list[str]) -> Proc:
    """A worker started after the stack (the way running_stack starts its own); stopped with
    the stack."""
    proc = Proc(
        f"worker{i}",
        python_cli("worker", "--loglevel", "WARNING", "--hostname", f"bench{i}@%h", *args),
        stack.env,
        stack.logs / f"worker{i}.log",
    ).start()
    stack.procs.append(proc)
    return proc


def _profile_drain(stack: Stack, conn: Any, seconds: float, top: int, keep: Path | None) -> str:
    """py-spy the first worker for ``seconds``, 2 s after the first claim (the raw stacks
    copied to ``keep``, when given)."""
    from bench import pyspy

    while conn.scalar(text("SELECT count(started_at) FROM jobs")) == 0:
        conn.commit()
        time.sleep(0.05)
    conn.commit()
    time.sleep(2)
    worker = next(p.popen for p in stack.procs if p.name == "worker0")
    assert worker is not None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "worker.txt"
        with pyspy.cpu_profile(worker.pid, raw, subprocesses=True):
            started = time.time()
            time.sleep(seconds)
            ended = time.time()
        profile = pyspy.summarise(raw, top=top)
        if keep is not None:
            keep.write_bytes(raw.read_bytes())
    done = conn.scalar(
        text(
            "SELECT count(*) FROM jobs WHERE completed_at BETWEEN to_timestamp(:a) "
            "AND to_timestamp(:b)"
        ),
        {"a": started, "b": ended},
    )
    conn.commit()
    cpu_s = profile.samples / 100
    per_job = cpu_s / done * 1000 if done else 0.0
    return "\n".join(
        [
            f"profile worker0 {ended - started:.1f}s: {profile.samples} samples holding the GIL "
            f"at 100/s (~{cpu_s:.1f} s), {done} jobs completed meanwhile, ~{per_job:.2f} ms/job",
            profile.report(),
        ]
    )


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def drain(ns: argparse.Namespace) -> None:
    """Submit everything with no worker consuming, then start the workers and time the drain."""
    load_before = _load()
    with running_stack(workers=0, api_workers=ns.api_workers) as stack:
        submit_s = asyncio.run(submit_all(stack.api_url, stack.key, ns.jobs, ns.concurrency))
        args = ["--concurrency", str(ns.worker_concurrency)]
        if ns.pool:
            args += ["--pool", ns.pool]
        engine = create_engine(stack.database_url, poolclass=NullPool)
        profile = ""
        with engine.connect() as conn, CpuSampler(stack) as sampler:
            for i in range(ns.workers):
                start_worker(stack, i, args)
            if ns.profile:
                profile = _profile_drain(stack, conn, ns.profile, 20, ns.keep_profile)
            wait_finished(conn, ns.timeout)
            time.sleep(0.5)  # a sample after the last completion
            row = conn.execute(
                text(
                    "SELECT count(*) FILTER (WHERE status = 'succeeded'), "
                    "extract(epoch FROM min(started_at)), extract(epoch FROM max(completed_at)), "
                    "count(*) FILTER (WHERE attempts > 1) FROM jobs"
                )
            ).one()
        engine.dispose()
        calls = httpx.get(f"{stack.sim_url}/_sim/stats").json()["requests"]
    succeeded, first, last, retried = int(row[0]), float(row[1]), float(row[2]), int(row[3])
    span = last - first
    used, sampled = sampler.between(first, last)
    per_job = " ".join(
        f"{k}={v / max(1, succeeded) * 1000:.2f}"
        for k, v in sorted(used.items(), key=lambda kv: -kv[1])
        if v >= 0.05
    )
    print(
        f"drain jobs={ns.jobs} succeeded={succeeded} workers={ns.workers}x"
        f"{ns.worker_concurrency}{'/' + ns.pool if ns.pool else ''} "
        f"submit_rps={ns.jobs / submit_s:.0f} first_claim_to_last_success_s={span:.2f} "
        f"jobs_per_s={succeeded / span if span else 0:.0f} upstream_calls={calls} "
        f"retried_jobs={retried} load {load_before} -> {_load()} cpu_span_s={sampled:.2f} "
        + " ".join(f"cpu_{k}={v:.1f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))
        + f" | cpu_ms_per_job: {per_job} total={sum(used.values()) / max(1, succeeded) * 1000:.2f}",
        flush=True,
    )
    if profile:
        print(profile, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32, help="submitting clients")
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--worker-concurrency", type=int, default=64)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--pool", choices=["threads", "prefork", "solo"], help="worker pool")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument(
        "--drain", action="store_true", help="submit all first, then start the workers"
    )
    parser.add_argument(
        "--profile", type=float, default=0, help="with --drain: py-spy worker0 for S seconds"
    )
    parser.add_argument("--keep-profile", type=Path, help="file for py-spy's raw stacks")
    ns = parser.parse_args()
    if ns.drain:
        drain(ns)
        return

    with running_stack(
        workers=ns.workers,
        api_workers=ns.api_workers,
        worker_args=["--concurrency", str(ns.worker_concurrency)]
        + (["--pool", ns.pool] if ns.pool else []),
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
