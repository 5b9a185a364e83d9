"""The naive peer: what a user does without chatjobs — the official openai SDK's AsyncOpenAI
with an asyncio semaphore and the SDK's default retries, straight at the same simulator."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai


async def _run(
    sim_url: str, n: int, concurrency: int, make_request: Callable[[int], dict[str, Any]]
) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=f"{sim_url}/v1", api_key="sk-peer")
    semaphore = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with semaphore:
            try:
                await client.chat.completions.create(**make_request(i))
            except openai.APIError:
                failures += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    makespan = time.monotonic() - started
    await client.close()
    return {"makespan_s": makespan, "failed": failures}


def run_peer(
    sim_url: str, n: int, concurrency: int, make_request: Callable[[int], dict[str, Any]]
) -> dict[str, Any]:
    """Run the peer; returns makespan, failed requests and the 429s the simulator answered."""
    httpx.post(f"{sim_url}/_sim/reset")
    out = asyncio.run(_run(sim_url, n, concurrency, make_request))
    stats = httpx.get(f"{sim_url}/_sim/stats").json()
    out["rate_limited"] = stats["rate_limited"]
    out["requests"] = stats["requests"]
    return out
