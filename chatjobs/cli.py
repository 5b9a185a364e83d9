"""`chatjobs ...`: run the services, migrate, manage keys, simulate an upstream, run batches
and schedules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import datetime, timedelta

from chatjobs.settings import get_settings


def _api(ns: argparse.Namespace) -> None:
    import uvicorn

    from chatjobs import logs

    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=ns.host,
        port=ns.port,
        workers=ns.workers,
        log_level="info",
        log_config=logs.config(),
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


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S%z") if value is not None else "-"


def _keys_list(ns: argparse.Namespace) -> None:
    from chatjobs.db import session_scope
    from chatjobs.tenants import list_keys

    with session_scope() as session:
        keys = list_keys(session=session, tenant_name=ns.tenant)
    print(f"{'PREFIX':<12} {'TENANT':<24} {'CREATED':<24} REVOKED")
    for key in keys:
        created, revoked = _when(key.created_at), _when(key.revoked_at)
        print(f"{key.prefix:<12} {key.tenant:<24} {created:<24} {revoked}")


def _keys_revoke(ns: argparse.Namespace) -> None:
    from chatjobs.db import session_scope
    from chatjobs.errors import ChatJobsError
    from chatjobs.tenants import revoke_key

    try:
        with session_scope() as session:
            key = revoke_key(session=session, prefix=ns.prefix)
    except ChatJobsError as exc:
        sys.exit(f"chatjobs keys revoke: {exc}")
    print(
        f"revoked {key.prefix} of tenant {key.tenant!r} at {_when(key.revoked_at)}; API processes "
        f"refuse it within CHATJOBS_AUTH_CACHE_SECONDS ({get_settings().auth_cache_seconds:g} s)"
    )


def _whole(text: str, low: int, high: int | None, rule: str) -> int | None:
    """A whole number from ``low`` to ``high`` (None: no top) for `tenants set`, or
    `default`; ``rule`` is the error for one out of range."""
    if text.strip().lower() == "default":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or 'default'") from None
    if value < low or (high is not None and value > high):
        raise argparse.ArgumentTypeError(rule)
    return value


def _limit(text: str) -> int | None:
    """A limit for `tenants set`: a number (0 = no limit) or `default`."""
    return _whole(text, 0, None, "a limit is 0 (no limit) or more")


def _weight(text: str) -> int | None:
    """A fair-share weight for `tenants set`: a whole number from 1, or `default`."""
    return _whole(text, 1, 1000, "a weight is from 1 to 1000")


def _share(text: str) -> float | None:
    """A fraction of each model's TPM for `tenants set`: more than 0, at most 1, or `none`."""
    if text.strip().lower() in {"none", "default"}:
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'none'") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError("a TPM share is more than 0 and at most 1, e.g. 0.25")
    return value


def _tenants_set(ns: argparse.Namespace) -> None:
    from chatjobs.db import session_scope
    from chatjobs.errors import ChatJobsError
    from chatjobs.tenants import DISPATCH, LIMITS, set_limits

    values = {
        name: getattr(ns, name) for name in (*LIMITS, *DISPATCH) if getattr(ns, name) is not _UNSET
    }
    if not values:
        sys.exit("chatjobs tenants set: name at least one limit, e.g. --submit-rps 50")
    try:
        with session_scope() as session:
            set_limits(session=session, tenant_name=ns.name, values=values)
    except ChatJobsError as exc:
        sys.exit(f"chatjobs tenants set: {exc}")
    print(
        f"tenant {ns.name!r}: "
        + ", ".join(f"{k}={'default' if v is None else v}" for k, v in values.items())
        + " (API processes apply limits within CHATJOBS_AUTH_CACHE_SECONDS; the dispatcher"
        " applies weight, max_inflight and tpm_share at its next pass)"
    )


def _tenants_list(ns: argparse.Namespace) -> None:
    from chatjobs.db import session_scope
    from chatjobs.tenants import DISPATCH, LIMITS, list_tenants

    settings = get_settings()

    def shown(own: float | None, name: str) -> str:
        if name == "tpm_share":
            return "none" if own is None else f"{own:g}"
        value = own if own is not None else getattr(settings, f"tenant_{name}")
        text = "none" if value == 0 else str(value)
        return text if own is not None else f"{text}*"

    columns = (*LIMITS, *DISPATCH)
    with session_scope() as session:
        rows = list_tenants(session=session)
        print(f"{'TENANT':<24} {'KEYS':>4} " + " ".join(f"{n.upper():>17}" for n in columns))
        for tenant, active in rows:
            limits = " ".join(f"{shown(getattr(tenant, n), n):>17}" for n in columns)
            print(f"{tenant.name:<24} {active:>4} {limits}")
    print("* the default (CHATJOBS_TENANT_*); none: no limit")


def _simulate(ns: argparse.Namespace) -> None:
    from chatjobs import simulator

    simulator.serve(simulator.config_from_args(ns), host=ns.host, port=ns.port)


def _dev_services(ns: argparse.Namespace) -> None:
    from pathlib import Path

    from chatjobs import devservices

    devservices.serve(
        Path(ns.dir), postgres=ns.only in (None, "postgres"), redis=ns.only in (None, "redis")
    )


def _dev_key(ns: argparse.Namespace) -> None:
    from pathlib import Path

    from chatjobs.devkey import demo_key

    key, new = demo_key(Path(ns.file), tenant=ns.tenant)
    said = "created" if new else "reused"
    print(f"API key for tenant {ns.tenant!r} ({said}, kept in {ns.file}):", file=sys.stderr)
    print(key)


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


_UNSET: object = object()  # a `tenants set` flag not given: that limit is left as it is


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatjobs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    api = sub.add_parser("api", help="serve the HTTP API")
    # Loopback unless asked: an API left on every interface by default is an open door.
    api.add_argument("--host", default="127.0.0.1")
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
    keys_list = keys_sub.add_parser("list", help="list API keys: prefix, tenant, created, revoked")
    keys_list.add_argument("--tenant", help="only this tenant's")
    keys_list.set_defaults(func=_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke the API key with this prefix")
    revoke.add_argument("prefix", help="as `chatjobs keys list` shows it, e.g. cj_AbC12xY")
    revoke.set_defaults(func=_keys_revoke)

    tenants = sub.add_parser("tenants", help="per-tenant limits and dispatch settings")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    tenants_set = tenants_sub.add_parser(
        "set", help="set a tenant's own limits (N, 0 for no limit, or `default`)"
    )
    tenants_set.add_argument("name")
    for flag, what in (
        ("--submit-rps", "job submissions per second (POST /v1/jobs)"),
        ("--max-queued", "jobs waiting (queued or retrying) at once"),
        ("--max-streams", "event streams open at once"),
        ("--max-calls-per-job", "map calls one long input may be split into"),
    ):
        tenants_set.add_argument(flag, type=_limit, default=_UNSET, metavar="N", help=what)
    tenants_set.add_argument(
        "--weight",
        type=_weight,
        default=_UNSET,
        metavar="N",
        help="weight in fair share between tenants (1-1000; 2 gets twice the tokens of 1)",
    )
    tenants_set.add_argument(
        "--max-inflight",
        type=_limit,
        default=_UNSET,
        metavar="N",
        help="jobs admitted to the broker or running at once; more wait queued",
    )
    tenants_set.add_argument(
        "--tpm-share",
        type=_share,
        default=_UNSET,
        metavar="F",
        help="fraction of each model's TPM this tenant may use (0-1, or none)",
    )
    tenants_set.set_defaults(func=_tenants_set)
    tenants_list = tenants_sub.add_parser("list", help="tenants, their keys and limits")
    tenants_list.set_defaults(func=_tenants_list)

    simulate = sub.add_parser(
        "simulate", help="run the upstream simulator (OpenAI, Workers AI, AI Gateway, Azure shapes)"
    )
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

    dev_key = sub.add_parser(
        "dev-key",
        help="print the API key kept in a file (mode 600), creating one if it no longer works",
    )
    dev_key.add_argument("--tenant", default="demo")
    dev_key.add_argument("--file", default=".run/demo-key", help="where the key is kept")
    dev_key.set_defaults(func=_dev_key)

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

    from chatjobs import batch_cli, schedule_cli, usage_cli

    batch_cli.add_parser(sub)
    schedule_cli.add_parser(sub)
    usage_cli.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from chatjobs import logs

    logs.configure()
    ns = build_parser().parse_args(argv)
    ns.func(ns)


if __name__ == "__main__":
    main()
