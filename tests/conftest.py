"""Fixtures: private servers, a fresh database, and the real api, worker and simulator processes.

The session starts its own Postgres and Redis (chatjobs.devservices, in a temporary directory,
on free ports) and stops them at the end, so tests may stop, restart or flush them and never
touch a server the suite did not start. CHATJOBS_TEST_PG (an admin URL without a database) and
CHATJOBS_TEST_REDIS point the suite at other servers instead; it then never flushes or stops
them, and skips the tests that would. One database and one set of processes serve the whole
session; tests isolate themselves by creating their own tenant.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from chatjobs import devservices
from chatjobs.testing import Proc, free_port, python_cli, wait_http

# The real-browser fixtures (browser, page, new_page, watch) for every test module.
pytest_plugins = ["tests.browser"]

# The admin URL (no database) and the Redis URL: private servers unless the environment names
# others. Set in pytest_sessionstart, before any test module imports them.
PG_ADMIN = os.environ.get("CHATJOBS_TEST_PG", "")
REDIS = os.environ.get("CHATJOBS_TEST_REDIS", "")
_private: dict[str, devservices.Server] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    global PG_ADMIN, REDIS
    # Servers of earlier sessions killed with SIGKILL (a live session's are left alone).
    for earlier in Path(tempfile.gettempdir()).glob(f"{_SERVICES_PREFIX}*"):
        if devservices.reap(earlier):
            shutil.rmtree(earlier, ignore_errors=True)
    directory = Path(tempfile.mkdtemp(prefix=_SERVICES_PREFIX))
    session.config.stash[_SERVICES_DIR] = directory
    if not PG_ADMIN:
        _private["postgres"] = devservices.start_postgres(directory, durable=False)
        PG_ADMIN = _private["postgres"].url.replace("postgresql://", "postgresql+psycopg://")
    if not REDIS:
        _private["redis"] = devservices.start_redis(directory)
        REDIS = _private["redis"].url


def pytest_sessionfinish(session: pytest.Session) -> None:
    for server in _private.values():
        server.stop()
    shutil.rmtree(session.config.stash[_SERVICES_DIR], ignore_errors=True)


_SERVICES_DIR = pytest.StashKey[Path]()
_SERVICES_PREFIX = "chatjobs-test-services-"


@pytest.fixture(scope="session")
def private_postgres() -> devservices.Server:
    """The suite's own Postgres, for tests that stop it."""
    if "postgres" not in _private:
        pytest.skip("CHATJOBS_TEST_PG names a server this suite did not start: never stopped")
    return _private["postgres"]


@pytest.fixture(scope="session")
def private_redis() -> devservices.Server:
    """The suite's own Redis, for tests that flush it."""
    if "redis" not in _private:
        pytest.skip("CHATJOBS_TEST_REDIS names a server this suite did not start: never flushed")
    return _private["redis"]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("procs")


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A database of its own, migrated to head, dropped at the end."""
    from chatjobs import migrate

    name = f"chatjobs_test_{uuid.uuid4().hex[:10]}"
    url = f"{PG_ADMIN}/{name}"
    migrate.upgrade(url)
    yield url
    admin = create_engine(f"{PG_ADMIN}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def simulator(run_dir: Path) -> Iterator[str]:
    """The upstream simulator over real HTTP; yields its base URL (…/v1)."""
    port = free_port()
    proc = Proc(
        "simulator",
        python_cli("simulate", "--port", str(port)),
        dict(os.environ),
        run_dir / "simulator.log",
    ).start()
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/healthz", proc=proc)
    yield f"{base}/v1"
    proc.stop()


@pytest.fixture(scope="session")
def stack_env(database_url: str, simulator: str) -> Iterator[dict[str, str]]:
    """The environment every chatjobs process of the session runs with."""
    env = {
        **os.environ,
        "CHATJOBS_DATABASE_URL": database_url,
        "CHATJOBS_REDIS_URL": REDIS,
        "CHATJOBS_UPSTREAM_BASE_URL": simulator,
        "CHATJOBS_UPSTREAM_API_KEY": "sk-test-upstream",
        "CHATJOBS_QUEUE_NAME": f"chatjobs-test-{uuid.uuid4().hex[:6]}",
        "CHATJOBS_RETRY_BASE_SECONDS": "0.2",
        "CHATJOBS_RETRY_CAP_SECONDS": "1",
        "CHATJOBS_DISPATCH_INTERVAL_SECONDS": "0.2",
        "CHATJOBS_WORKER_CONCURRENCY": "16",
        "CHATJOBS_UPSTREAM_READ_TIMEOUT": "30",
    }
    saved = dict(os.environ)
    os.environ.update(env)
    _reset_settings()
    yield env
    os.environ.clear()
    os.environ.update(saved)
    _reset_settings()


def _reset_settings() -> None:
    from chatjobs.db import reset_engine
    from chatjobs.queue import get_producer
    from chatjobs.settings import get_settings

    get_settings.cache_clear()
    get_producer.cache_clear()
    reset_engine()


@pytest.fixture(scope="session")
def api_url(stack_env: dict[str, str], run_dir: Path) -> Iterator[str]:
    port = free_port()
    proc = Proc(
        "api",
        python_cli("api", "--host", "127.0.0.1", "--port", str(port)),
        stack_env,
        run_dir / "api.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/healthz", proc=proc)
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def worker(stack_env: dict[str, str], run_dir: Path) -> Iterator[Proc]:
    """One Celery worker process and one beat, as `make run` starts them."""
    worker = Proc(
        "worker", python_cli("worker", "--loglevel", "INFO"), stack_env, run_dir / "worker.log"
    ).start()
    beat = Proc("beat", python_cli("beat"), stack_env, run_dir / "beat.log").start()
    yield worker
    beat.stop()
    worker.stop()


def new_key(tenant: str | None = None) -> str:
    from chatjobs.db import session_scope
    from chatjobs.tenants import create_key

    with session_scope() as session:
        return create_key(session=session, tenant_name=tenant or f"t-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def api_key(stack_env: dict[str, str]) -> str:
    return new_key()


@pytest.fixture
def client(api_url: str, api_key: str) -> Iterator[httpx.Client]:
    """An HTTP client for the API, authenticated as a fresh tenant."""
    with httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
    ) as c:
        yield c


@pytest.fixture
def sim(simulator: str) -> Iterator[httpx.Client]:
    """A client for the simulator's admin endpoints; its config is reset after each test."""
    with httpx.Client(base_url=simulator.removesuffix("/v1"), timeout=10) as c:
        yield c
        c.post(
            "/_sim/config",
            json={
                "latency": 0.0,
                "rpm": None,
                "tpm": None,
                "error_rate": 0.0,
                "timeout_rate": 0.0,
                "malformed_rate": 0.0,
                "context_window": None,
            },
        )


@dataclass
class MiniStack:
    """An api, beat and workers of their own, on a queue of their own, for tests that kill,
    flush or reconfigure parts of the system without disturbing the session's stack."""

    url: str
    env: dict[str, str]
    queue: str
    run_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def start_worker(self, *args: str, name: str = "worker") -> Proc:
        proc = Proc(
            name,
            python_cli(
                "worker",
                "--loglevel",
                "INFO",
                "--hostname",
                f"{name}-{uuid.uuid4().hex[:6]}@%h",
                *args,
            ),
            self.env,
            self.run_dir / f"{self.queue}-{name}-{len(self.procs)}.log",
        ).start()
        self.procs.append(proc)
        return proc

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


# Short timeouts so recovery happens within seconds, not the production minutes.
FAST_RECOVERY = {
    "CHATJOBS_LEASE_SECONDS": "3",
    "CHATJOBS_RECONCILE_INTERVAL_SECONDS": "0.5",
    "CHATJOBS_STALE_QUEUED_SECONDS": "3",
    "CHATJOBS_DISPATCH_INTERVAL_SECONDS": "0.2",
    "CHATJOBS_WORKER_SHUTDOWN_SECONDS": "0",
    "CHATJOBS_UPSTREAM_READ_TIMEOUT": "60",
}


@pytest.fixture
def make_stack(stack_env: dict[str, str], run_dir: Path) -> Iterator[Callable[..., MiniStack]]:
    """Build MiniStacks: ``make_stack(env={...}, workers=[[args...]], beat=True)``."""
    stacks: list[MiniStack] = []

    def make(
        env: dict[str, str] | None = None,
        workers: list[list[str]] | None = None,
        beat: bool = True,
    ) -> MiniStack:
        queue = f"chatjobs-mini-{uuid.uuid4().hex[:6]}"
        full_env = {**stack_env, **FAST_RECOVERY, "CHATJOBS_QUEUE_NAME": queue, **(env or {})}
        port = free_port()
        stack = MiniStack(
            url=f"http://127.0.0.1:{port}", env=full_env, queue=queue, run_dir=run_dir
        )
        stacks.append(stack)
        api = Proc(
            "api",
            python_cli("api", "--host", "127.0.0.1", "--port", str(port)),
            full_env,
            run_dir / f"{queue}-api.log",
        ).start()
        stack.procs.append(api)
        if beat:
            stack.procs.append(
                Proc(
                    "beat",
                    python_cli("beat", "--loglevel", "INFO"),
                    full_env,
                    run_dir / f"{queue}-beat.log",
                ).start()
            )
        for args in workers if workers is not None else [[]]:
            stack.start_worker(*args)
        wait_http(f"{stack.url}/healthz", proc=api)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that restart shared services run last, so nothing after them meets the aftermath.
    items.sort(key=lambda item: item.get_closest_marker("disruptive") is not None)
