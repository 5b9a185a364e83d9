"""The real stack for a benchmark: a fresh database, simulator, api, workers and beat.

Postgres and Redis are private servers of the benchmark's own (chatjobs.devservices, fsync on
as in production) unless CHATJOBS_BENCH_PG (an admin URL without a database) and
CHATJOBS_BENCH_REDIS name others; those are never flushed: the stack uses a queue of its own.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.pool import NullPool

from chatjobs import devservices
from chatjobs.testing import Proc, free_port, python_cli, wait_http

PG_ADMIN = os.environ.get("CHATJOBS_BENCH_PG", "")
REDIS = os.environ.get("CHATJOBS_BENCH_REDIS", "")


@dataclass
class Stack:
    api_url: str
    sim_url: str
    database_url: str
    key: str
    env: dict[str, str]
    logs: Path
    procs: list[Proc]
    servers: dict[str, devservices.Server]

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time used so far by each process of the stack, and by Postgres and Redis (every
        process of that name when they are not the stack's own)."""
        out = {p.name: _tree_cpu(p.popen.pid) for p in self.procs if p.popen is not None}
        for name, program in (("postgres", "postgres"), ("redis", "redis-server")):
            server = self.servers.get(name)
            if server is not None and server.popen is not None:
                out[name] = _tree_cpu(server.popen.pid)
            else:
                out[name] = sum(_cpu(pid) for pid in _pids_named(program))
        return out


_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # utime + stime + the times of reaped children (Postgres backends come and go).
    return sum(int(f) for f in fields[11:15]) / _TICK


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return kids


def _tree_cpu(pid: int) -> float:
    return _cpu(pid) + sum(_tree_cpu(child) for child in _children(pid))


def _pids_named(name: str) -> list[int]:
    pids = []
    for stat in Path("/proc").glob("[0-9]*/comm"):
        try:
            if stat.read_text().strip() == name:
                pids.append(int(stat.parent.name))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return pids


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> str:
    """``name=seconds`` for each process, largest first."""
    used = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return " ".join(f"cpu_{k}={v:.1f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))


@contextmanager
def running_stack(
    *,
    sim_args: Sequence[str] = (),
    workers: int = 1,
    worker_args: Sequence[str] = (),
    api_workers: int = 1,
    env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """Start everything, yield it, and tear it all down (the database included)."""
    from chatjobs import migrate

    logs = Path(tempfile.mkdtemp(prefix="chatjobs-bench-"))
    servers: dict[str, devservices.Server] = {}
    pg_admin, redis_url = PG_ADMIN, REDIS
    if not pg_admin:
        servers["postgres"] = devservices.start_postgres(logs)
        pg_admin = servers["postgres"].url.replace("postgresql://", "postgresql+psycopg://")
    if not redis_url:
        servers["redis"] = devservices.start_redis(logs)
        redis_url = servers["redis"].url
    name = f"chatjobs_bench_{uuid.uuid4().hex[:8]}"
    database_url = f"{pg_admin}/{name}"
    migrate.upgrade(database_url)
    sim_port, api_port = free_port(), free_port()
    full_env = {
        **os.environ,
        "CHATJOBS_DATABASE_URL": database_url,
        "CHATJOBS_REDIS_URL": redis_url,
        "CHATJOBS_QUEUE_NAME": f"chatjobs-bench-{uuid.uuid4().hex[:6]}",
        "CHATJOBS_UPSTREAM_BASE_URL": f"http://127.0.0.1:{sim_port}/v1",
        # A benchmark drives one tenant as hard as it can: the per-tenant submission and
        # queue limits (defaults 200/s, 100,000 queued) would measure the limit instead.
        "CHATJOBS_TENANT_SUBMIT_RPS": "0",
        "CHATJOBS_TENANT_MAX_QUEUED": "0",
        **(env or {}),
    }
    procs: list[Proc] = []
    try:
        sim = Proc(
            "simulator",
            python_cli("simulate", "--port", str(sim_port), *sim_args),
            full_env,
            logs / "simulator.log",
        ).start()
        procs.append(sim)
        wait_http(f"http://127.0.0.1:{sim_port}/healthz", proc=sim)
        api = Proc(
            "api",
            python_cli(
                "api", "--host", "127.0.0.1", "--port", str(api_port), "--workers", str(api_workers)
            ),
            full_env,
            logs / "api.log",
        ).start()
        procs.append(api)
        for i in range(workers):
            procs.append(
                Proc(
                    f"worker{i}",
                    python_cli(
                        "worker",
                        "--loglevel",
                        "WARNING",
                        "--hostname",
                        f"bench{i}@%h",
                        *worker_args,
                    ),
                    full_env,
                    logs / f"worker{i}.log",
                ).start()
            )
        procs.append(
            Proc(
                "beat", python_cli("beat", "--loglevel", "WARNING"), full_env, logs / "beat.log"
            ).start()
        )
        wait_http(f"http://127.0.0.1:{api_port}/healthz", proc=api)
        os.environ.update({k: v for k, v in full_env.items() if k.startswith("CHATJOBS_")})
        key = _new_key()
        yield Stack(
            api_url=f"http://127.0.0.1:{api_port}",
            sim_url=f"http://127.0.0.1:{sim_port}",
            database_url=database_url,
            key=key,
            env=full_env,
            logs=logs,
            procs=procs,
            servers=servers,
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
        from chatjobs.db import reset_engine

        reset_engine()
        admin = create_engine(
            f"{pg_admin}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool
        )
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        for server in servers.values():
            server.stop()
        shutil.rmtree(logs, ignore_errors=True)


def _new_key() -> str:
    from chatjobs.db import reset_engine, session_scope
    from chatjobs.settings import get_settings
    from chatjobs.tenants import create_key

    get_settings.cache_clear()
    reset_engine()
    with session_scope() as session:
        return create_key(session=session, tenant_name="bench")


def wait_finished(conn: Connection, timeout: float, poll: float = 0.25) -> None:
    """Block until no job of the benchmark's database is pending, or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = conn.scalar(
            text(
                "SELECT count(*) FROM jobs WHERE status NOT IN "
                "('succeeded', 'failed', 'cancelled', 'expired')"
            )
        )
        conn.commit()
        if pending == 0:
            return
        time.sleep(poll)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by the inclusive method; 0 for no values."""
    if not values:
        return 0.0
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, int(q) - 1))]
