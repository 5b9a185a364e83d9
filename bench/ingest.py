"""Ingest: POST /v1/jobs at rising client concurrency; requests/s, p50 and p99 latency.

    .venv/bin/python bench/ingest.py [--seconds 10] [--concurrency 1,8,32,64] [--api-workers 2]

The load generator is a minimal keep-alive HTTP/1.1 client on raw asyncio streams: httpx as a
load generator tops out below the server under test on this machine. No worker runs, so the
figures are the API's alone (jobs accumulate in Postgres; beat's dispatcher, poked by each
submission, admits one window of them to the broker and then finds no room). ``--profile N``
runs one more, unmeasured level of N clients under py-spy (the API's processes, active
samples) and prints the top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import Stack, cpu_delta, percentile, running_stack

BODY = json.dumps(
    {
        "request": {
            "model": "gpt-4.1",
            "messages": [{"role": "user", "content": "What are the three laws of thermodynamics?"}],
        }
    }
).encode()


async def client_loop(
    host: str, port: int, key: str, until: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode()
    while time.monotonic() < until:
        started = time.monotonic()
        writer.write(head + BODY)
        status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        latencies.append(time.monotonic() - started)
        if not status_line.startswith(b"HTTP/1.1 202"):
            errors.append(int(status_line.split()[1]))
    writer.close()
    await writer.wait_closed()


async def level(
    api_url: str, key: str, clients: int, seconds: float
) -> tuple[float, list[float], list[int]]:
    parts = urlsplit(api_url)
    latencies: list[float] = []
    errors: list[int] = []
    until = time.monotonic() + seconds
    started = time.monotonic()
    await asyncio.gather(
        *(
            client_loop(
                parts.hostname or "127.0.0.1", parts.port or 80, key, until, latencies, errors
            )
            for _ in range(clients)
        )
    )
    return time.monotonic() - started, latencies, errors


def profile_api(stack: Stack, clients: int, seconds: float) -> None:
    """One more level of ``clients`` under py-spy; prints the API's top functions."""
    from bench import pyspy

    api = next(p.popen for p in stack.procs if p.name == "api")
    assert api is not None
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "api.txt"
        with pyspy.cpu_profile(api.pid, raw, subprocesses=True):
            elapsed, latencies, _ = asyncio.run(level(stack.api_url, stack.key, clients, seconds))
        profile = pyspy.summarise(raw)
    print(
        f"profile api, {clients} clients, {elapsed:.1f}s under py-spy: {len(latencies)} requests "
        f"({len(latencies) / elapsed:.0f}/s), {profile.samples} samples holding the GIL at "
        f"100/s (~{profile.samples / 100 / max(1, len(latencies)) * 1000:.2f} ms per request)"
    )
    print(profile.report(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--profile", type=int, default=0, help="py-spy a level of N clients")
    ns = parser.parse_args()
    print(f"  load before: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    with running_stack(workers=0, api_workers=ns.api_workers) as stack:
        for clients in [int(c) for c in ns.concurrency.split(",")]:
            before = stack.cpu_seconds()
            elapsed, latencies, errors = asyncio.run(
                level(stack.api_url, stack.key, clients, ns.seconds)
            )
            cpu = cpu_delta(before, stack.cpu_seconds())
            print(
                f"ingest clients={clients} api_workers={ns.api_workers} "
                f"requests={len(latencies)} rps={len(latencies) / elapsed:.0f} "
                f"p50_ms={percentile(latencies, 50) * 1000:.1f} "
                f"p99_ms={percentile(latencies, 99) * 1000:.1f} errors={len(errors)} {cpu}",
                flush=True,
            )
        if ns.profile:
            profile_api(stack, ns.profile, ns.seconds)


if __name__ == "__main__":
    main()
