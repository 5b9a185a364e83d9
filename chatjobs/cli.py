"""`chatjobs ...`: run the services, migrate, manage keys, simulate an upstream."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import timedelta

from chatjobs.settings import get_settings


def _api(ns: argparse.Namespace) -> None:
    import uvicorn

    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=ns.host,
        port=ns.port,
        workers=ns.workers,
        log_level="info",
        access_log=ns.access_log,
    )


def _worker(ns: argparse.Namespace) -> None:
    from chatjobs.settings import get_settings
    from worker import app

    settings = get_settings()
    argv = [
        "worker",
        f"--pool={ns.pool or settings.worker_pool}",
        f"--concurrency={ns.concurrency or settings.worker_concurrency}",
        f"--loglevel={ns.loglevel}",
        "--without-gossip",
        "--without-mingle",
    ]
    if ns.hostname:
        argv.append(f"--hostname={ns.hostname}")
    app.worker_main(argv)


def _beat(ns: argparse.Namespace) -> None:
    from worker import app

    app.start(["beat", f"--loglevel={ns.loglevel}"])


def _migrate(ns: argparse.Namespace) -> None:
    from chatjobs import migrate

    if ns.downgrade:
        migrate.downgrade(revision=ns.downgrade)
    else:
        migrate.upgrade(revision=ns.revision)
    print("database migrated")


def _keys_create(ns: argparse.Namespace) -> None:
    from chatjobs.db import session_scope
    from chatjobs.tenants import create_key

    with session_scope() as session:
        key = create_key(session=session, tenant_name=ns.tenant)
    print(f"API key for tenant {ns.tenant!r} (shown once, store it now):", file=sys.stderr)
    print(key)


def _simulate(ns: argparse.Namespace) -> None:
    from chatjobs import simulator

    simulator.serve(simulator.config_from_args(ns), host=ns.host, port=ns.port)


def _dev_services(ns: argparse.Namespace) -> None:
    from pathlib import Path

    from chatjobs import devservices

    devservices.serve(
        Path(ns.dir), postgres=ns.only in (None, "postgres"), redis=ns.only in (None, "redis")
    )


def _duration(text: str) -> timedelta:
    """``30d``, ``12h``, ``90m``, ``45s`` (a bare number is days)."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    text = text.strip().lower()
    unit = text[-1] if text[-1:] in units else "d"
    try:
        value = float(text[:-1] if text[-1:] in units else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 30d or 12h") from None
    if not 0 < value < 100_000:
        raise argparse.ArgumentTypeError("the duration must be positive")
    return timedelta(seconds=value * units[unit])


def _prune(ns: argparse.Namespace) -> None:
    from chatjobs.jobs.sweeps import prune

    older_than = ns.older_than or timedelta(days=get_settings().retention_days)
    deleted = prune(older_than=older_than, dry_run=ns.dry_run)
    verb = "would delete" if ns.dry_run else "deleted"
    print(f"{verb} {deleted} finished jobs older than {older_than} (with their steps and calls)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatjobs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="0.0.0.0")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.add_argument("--access-log", action="store_true")
    api.set_defaults(func=_api)

    worker = sub.add_parser("worker", help="run a Celery worker")
    worker.add_argument("--pool", choices=["threads", "prefork", "solo"])
    worker.add_argument("--concurrency", type=int)
    worker.add_argument("--hostname")
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(func=_worker)

    beat = sub.add_parser("beat", help="run Celery beat (dispatcher and periodic tasks)")
    beat.add_argument("--loglevel", default="INFO")
    beat.set_defaults(func=_beat)

    migrate = sub.add_parser("migrate", help="create the database if missing and migrate it")
    migrate.add_argument("--revision", default="head")
    migrate.add_argument("--downgrade", metavar="REVISION")
    migrate.set_defaults(func=_migrate)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create an API key (and the tenant if new)")
    create.add_argument("--tenant", required=True)
    create.set_defaults(func=_keys_create)

    simulate = sub.add_parser("simulate", help="run the OpenAI-compatible upstream simulator")
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8100)
    from chatjobs import simulator

    simulator.add_arguments(simulate)
    simulate.set_defaults(func=_simulate)

    dev = sub.add_parser(
        "dev-services",
        help="run a private Postgres and Redis on free ports, print their URLs as export lines",
    )
    dev.add_argument("--dir", default=".run/services", help="where the data and logs live")
    dev.add_argument("--only", choices=["postgres", "redis"], help="start just this one")
    dev.set_defaults(func=_dev_services)

    prune = sub.add_parser(
        "prune", help="delete finished jobs past retention, with their steps, calls, deliveries"
    )
    prune.add_argument(
        "--older-than",
        type=_duration,
        help="e.g. 30d, 12h (default: CHATJOBS_RETENTION_DAYS days)",
    )
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    prune.set_defaults(func=_prune)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # One line per upstream call comes from chatjobs.worker; these would repeat it, and the
    # per-second dispatcher ticks would drown everything else.
    for noisy in ("httpx", "celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    ns = build_parser().parse_args(argv)
    ns.func(ns)


if __name__ == "__main__":
    main()
