"""The private servers the suite and `make run` start: they answer, restart on the same port
with their data, stop, and clean up after an owner that was killed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from chatjobs import devservices
from chatjobs.testing import python_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def directory() -> Iterator[Path]:
    # Not tmp_path: under root Postgres runs as `nobody`, which cannot enter pytest's 0700 base.
    path = Path(tempfile.mkdtemp(prefix="chatjobs-devservices-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_cli(directory: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """`chatjobs dev-services`, and the variables its `export` lines set."""
    with (directory / "cli.log").open("w") as log:
        proc = subprocess.Popen(
            python_cli("dev-services", "--dir", str(directory), *args),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
    assert proc.stdout is not None
    exports = {}
    for _ in range(1 if "--only" in args else 2):
        name, _, value = proc.stdout.readline().removeprefix("export ").strip().partition("=")
        exports[name] = value
    proc.stdout.close()
    return proc, exports


def server_url(database_url: str) -> str:
    return database_url.rsplit("/", 1)[0] + "/postgres"


def test_postgres_restarts_on_the_same_port_with_its_data(directory: Path) -> None:
    pg = devservices.start_postgres(directory, durable=False)
    try:
        with psycopg.connect(f"{pg.url}/postgres", autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (7)")
        pg.stop()
        assert not devservices.answers(pg.url)
        pg.start()
        with psycopg.connect(f"{pg.url}/postgres") as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(7,)]
    finally:
        pg.stop()
    assert not devservices.answers(pg.url)


def test_redis_answers_and_keeps_nothing_across_a_restart(directory: Path) -> None:
    server = devservices.start_redis(directory)
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        server.restart()
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") is None
    finally:
        server.stop()
    assert not devservices.answers(server.url)


def test_cli_prints_exports_and_stops_both_on_sigterm(directory: Path) -> None:
    proc, exports = start_cli(directory)
    try:
        assert set(exports) == {"CHATJOBS_DATABASE_URL", "CHATJOBS_REDIS_URL"}
        assert exports["CHATJOBS_DATABASE_URL"].endswith("/chatjobs")
        with psycopg.connect(server_url(exports["CHATJOBS_DATABASE_URL"])) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with redis.Redis.from_url(exports["CHATJOBS_REDIS_URL"]) as client:
            assert client.ping()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not any(devservices.answers(url) for url in exports.values())


def test_servers_left_by_a_killed_owner_are_stopped_by_the_next_start(directory: Path) -> None:
    proc, exports = start_cli(directory)
    proc.kill()
    proc.wait()
    assert all(devservices.answers(url) for url in exports.values())

    pg = devservices.start_postgres(directory, durable=False)
    try:
        assert not devservices.answers(exports["CHATJOBS_REDIS_URL"])
        with psycopg.connect(f"{pg.url}/postgres") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()
    assert devservices.reap(directory) is False  # nothing left to reap


def test_reap_leaves_the_servers_of_a_live_owner_alone(directory: Path) -> None:
    server = devservices.start_redis(directory)
    try:
        assert devservices.reap(directory) is False
        assert devservices.answers(server.url)
    finally:
        server.stop()
