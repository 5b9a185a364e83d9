"""Pacing under stricter enforcement: one rate-limited route, each way a provider may enforce it.

    .venv/bin/python bench/pacing.py                       # every mode, 1 and 2 workers
    .venv/bin/python bench/pacing.py --modes sliding --workers 2 --calls /tmp/calls

N jobs (default 600) at an RPM limit (default 1,200) and upstream latency (default 0.5 s),
chatjobs told the same RPM, against the simulator enforcing it as fixed calendar-second
buckets of RPM/60 (`second`), RPM/60 in every sliding 1-second interval (`sliding`) or RPM in
a sliding 60-second window (`minute`), with 1 and 2 worker processes. One line per run: 429s,
makespan (first submission to last completion) and ideal / makespan, where ideal = N / (RPM/60)
(the limit's own pace, no latency, no headroom). From the simulator's call log: the most
arrivals in any sliding second (all, and admitted ones) and the spread of gaps between
arrivals. `--calls DIR` keeps each run's call log (arrival time and status) as JSON.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import cpu_delta, percentile, running_stack
from bench.throughput import submit, wait_all

MODES = ("second", "sliding", "minute")


def busiest_second(times: list[float]) -> int:
    """Most arrivals within any closed interval of one second."""
    return max((bisect.bisect_right(times, t + 1.0) - i for i, t in enumerate(times)), default=0)


def arrivals(calls: list[dict[str, Any]]) -> str:
    """The call log's shape: busiest sliding second (all / admitted) and gaps between arrivals."""
    times = sorted(c["t"] for c in calls)
    admitted = sorted(c["t"] for c in calls if c["status"] != 429)
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    return (
        f"busiest_1s={busiest_second(times)}/{busiest_second(admitted)} "
        f"gap_ms_p1={percentile(gaps, 1):.0f} p50={percentile(gaps, 50):.0f} "
        f"p99={percentile(gaps, 99):.0f} max={max(gaps, default=0):.0f}"
    )


def run(ns: argparse.Namespace, mode: str, workers: int) -> dict[str, Any]:
    sim_args = ["--rpm", str(ns.rpm), "--latency", str(ns.latency), "--limit-window", mode]
    env = {"CHATJOBS_UPSTREAM_RPM": str(ns.rpm), **dict(ns.env)}
    with running_stack(
        sim_args=sim_args,
        workers=workers,
        env=env,
        worker_args=["--concurrency", str(ns.concurrency)],
    ) as stack:
        cpu_before = stack.cpu_seconds()
        submit(stack, ns.jobs)
        makespan, succeeded = wait_all(stack.database_url, ns.timeout)
        cpu = cpu_delta(cpu_before, stack.cpu_seconds())
        stats = httpx.get(f"{stack.sim_url}/_sim/stats").json()
        calls = httpx.get(f"{stack.sim_url}/_sim/calls", params={"limit": 100_000}).json()
    ideal = ns.jobs / (ns.rpm / 60)
    limited, requests = stats["rate_limited"], stats["requests"]
    result = {
        "mode": mode,
        "workers": workers,
        "succeeded": succeeded,
        "requests": requests,
        "429s": limited,
        "makespan": makespan,
        "ideal": ideal,
    }
    print(
        f"pacing mode={mode} workers={workers}x{ns.concurrency} jobs={ns.jobs} rpm={ns.rpm} "
        f"latency={ns.latency} succeeded={succeeded} upstream_calls={requests} "
        f"429s={limited} ({limited / max(1, requests) * 100:.1f}%) "
        f"makespan_s={makespan:.2f} ideal_s={ideal:.1f} of_ideal={ideal / makespan:.3f} "
        f"{arrivals(calls)} {cpu}",
        flush=True,
    )
    if ns.calls:
        ns.calls.mkdir(parents=True, exist_ok=True)
        log = [{"t": c["t"], "status": c["status"]} for c in calls]
        (ns.calls / f"{mode}-{workers}w.json").write_text(json.dumps(log))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of " + str(MODES)
    )
    parser.add_argument("--workers", default="1,2", help="worker process counts, comma-separated")
    parser.add_argument("--jobs", type=int, default=600)
    parser.add_argument("--rpm", type=int, default=1200)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=64, help="slots per worker process")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--calls", type=Path, help="keep each run's call log here")
    parser.add_argument(
        "--env", action="append", default=[], type=lambda s: tuple(s.split("=", 1)),
        help="NAME=VALUE for every chatjobs process (repeatable)",
    )  # fmt: skip
    ns = parser.parse_args()
    modes = [m for m in ns.modes.split(",") if m]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {MODES}")
    results = [run(ns, mode, int(w)) for mode in modes for w in ns.workers.split(",")]
    print("\n| mode | workers | 429s | of ideal | makespan |\n|---|---|---|---|---|")
    for r in results:
        share = r["429s"] / max(1, r["requests"]) * 100
        print(
            f"| {r['mode']} | {r['workers']} | {r['429s']} ({share:.1f}%) "
            f"| {r['ideal'] / r['makespan']:.3f} | {r['makespan']:.1f} s |"
        )


if __name__ == "__main__":
    main()
