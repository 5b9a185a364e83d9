"""Peak API memory with concurrent 9.9 MiB bodies, first without a valid key, then with one.

    .venv/bin/python bench/big_bodies.py [--clients 8] [--mib 9.9]

One uvicorn process, no job workers. RSS is sampled from /proc every 5 ms while the requests
run; the peak is reported per phase next to the baseline before it. The unauthenticated
phase runs first, so its figure is not inflated by memory the authenticated one left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.stack import running_stack

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "this",
    "are",
    "or",
    "from",
    "at",
    "which",
    "but",
    "have",
    "they",
    "you",
    "were",
    "there",
    "been",
    "one",
    "all",
    "their",
    "would",
    "when",
    "if",
    "what",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "first",
    "any",
    "now",
    "such",
    "document",
    "system",
    "report",
]


def big_body(mib: float) -> bytes:
    rng = random.Random(7)
    size = int(mib * 1024 * 1024)
    words: list[str] = []
    length = 0
    while length < size - 200:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    body = {"request": {"model": "gpt-4.1", "messages": [{"role": "user", "content": ""}]}}
    body["request"]["messages"][0]["content"] = " ".join(words)  # type: ignore[index]
    return json.dumps(body).encode()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler:
    """The largest RSS of one process seen since start(), sampled every 5 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kb(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


async def burst(url: str, key: str, body: bytes, clients: int) -> tuple[Counter[int], float]:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one() -> int:
            try:
                response = await client.post("/v1/jobs", content=body, headers=headers)
            except httpx.HTTPError as exc:
                print(f"  request failed: {exc!r}", flush=True)
                return 0
            return response.status_code

        started = time.monotonic()
        statuses = await asyncio.gather(*(one() for _ in range(clients)))
        return Counter(statuses), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mib", type=float, default=9.9)
    ns = parser.parse_args()
    body = big_body(ns.mib)
    with running_stack(workers=0, api_workers=1) as stack:
        api = next(p for p in stack.procs if p.name == "api")
        assert api.popen is not None
        pid = api.popen.pid
        # One small authenticated request first, so imports and pools are warm in both phases.
        httpx.get(
            f"{stack.api_url}/v1/jobs", headers={"authorization": f"Bearer {stack.key}"}
        ).raise_for_status()
        time.sleep(2)  # the encodings load in a thread at start-up
        for label, key in (("no", "cj_not-a-key"), ("yes", stack.key)):
            baseline = rss_kb(pid)
            with Sampler(pid) as sampler:
                statuses, elapsed = asyncio.run(burst(stack.api_url, key, body, ns.clients))
            print(
                f"big_bodies authenticated={label} clients={ns.clients} "
                f"body_mib={len(body) / 2**20:.2f} statuses={dict(statuses)} "
                f"seconds={elapsed:.2f} rss_baseline_mb={baseline / 1024:.0f} "
                f"rss_peak_mb={sampler.peak / 1024:.0f}",
                flush=True,
            )
            time.sleep(2)


if __name__ == "__main__":
    main()
