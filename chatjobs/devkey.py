"""Credentials `make run` keeps between runs: the demo tenant's API key and Flower's basic-auth
pair, each in its own file of mode 600 under `.run/`.

A kept key is reused only while it still authenticates as its tenant: after the database is
reset (or the key revoked) the file holds a key nobody accepts, so a new one replaces it. The
Flower pair never expires; deleting the file makes the next run generate another.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

FLOWER_USER = "admin"


def read_secret(path: Path) -> str | None:
    """The first line of ``path``, or None if the file is missing or empty."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return text.strip().splitlines()[0] if text.strip() else None


def write_secret(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` with mode 600 from the start: the secret is never readable
    by others, not even between creating the file and a later chmod."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    os.chmod(part, 0o600)  # O_CREAT's mode is masked by the umask; 600 whatever it is
    part.replace(path)


def kept(
    path: Path, *, valid: Callable[[str], bool], create: Callable[[], str]
) -> tuple[str, bool]:
    """The secret kept in ``path`` if ``valid`` accepts it, else a new one from ``create``,
    written there; with True when it is new."""
    value = read_secret(path)
    if value is not None and valid(value):
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return value, False
    value = create()
    write_secret(path, value)
    return value, True


def flower_auth(path: Path) -> tuple[str, bool]:
    """Flower's ``user:password`` kept in ``path``, generated once; True when new."""
    return kept(
        path,
        valid=lambda pair: ":" in pair,
        create=lambda: f"{FLOWER_USER}:{secrets.token_urlsafe(18)}",
    )


def key_authenticates(key: str, *, tenant: str) -> bool:
    """Whether ``key`` is an unrevoked API key of ``tenant`` in the configured database."""
    from chatjobs.db import session_scope
    from chatjobs.errors import AuthenticationFailed
    from chatjobs.models import Tenant
    from chatjobs.tenants import authenticate

    with session_scope() as session:
        try:
            caller = authenticate(session=session, key=key)
        except AuthenticationFailed:
            return False
        owner = session.get(Tenant, caller.tenant_id)
        return owner is not None and owner.name == tenant


def demo_key(path: Path, *, tenant: str = "demo") -> tuple[str, bool]:
    """The API key of ``tenant`` kept in ``path``, or a new one if that no longer
    authenticates (or was never made); True when new."""
    from chatjobs.db import session_scope
    from chatjobs.tenants import create_key

    def create() -> str:
        with session_scope() as session:
            return create_key(session=session, tenant_name=tenant)

    return kept(path, valid=lambda key: key_authenticates(key, tenant=tenant), create=create)
