"""Live job events over Redis pub/sub: status changes and streamed content deltas.

Advisory only: Postgres holds the truth. The events endpoint sends the job's current state
first and re-reads it whenever a message arrives or a second passes, so a lost message costs
a second of latency, never a wrong answer.
"""

from __future__ import annotations

import json
import logging
import uuid
from functools import lru_cache
from typing import Any

import redis

from chatjobs.settings import get_settings

log = logging.getLogger(__name__)


def channel(job_id: uuid.UUID | str) -> str:
    return f"chatjobs:job:{job_id}"


@lru_cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(get_settings().redis_url, socket_timeout=2)


def publish(job_id: uuid.UUID, kind: str, data: dict[str, Any]) -> None:
    """Tell any listener about a job; never fails the caller (events are advisory)."""
    try:
        _client().publish(channel(job_id), json.dumps({"kind": kind, **data}))
    except redis.RedisError:
        log.debug("could not publish a %s event for job %s", kind, job_id, exc_info=True)
