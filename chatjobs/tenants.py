"""Tenants, their API keys and their limits. A key is shown once; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs.errors import (
    AmbiguousKeyPrefix,
    AuthenticationFailed,
    KeyNotFound,
    TenantNotFound,
)
from chatjobs.models import ApiKey, Job, JobStatus, Tenant
from chatjobs.settings import Settings, get_settings

KEY_PREFIX = "cj_"
PREFIX_LENGTH = 10  # what lists show and revoke takes: "cj_" and 7 random characters
LIMITS = ("submit_rps", "max_queued", "max_streams", "max_calls_per_job")
# How the dispatcher treats the tenant (chatjobs.jobs.dispatch): its weight in fair share,
# its cap on jobs admitted or running (0: none), its fraction of each model's TPM (None: none).
DISPATCH = ("weight", "max_inflight", "tpm_share")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(*, session: Session, tenant_name: str) -> str:
    """Create the tenant if it is new, add an API key to it, and return the key in plaintext."""
    tenant_id = session.scalar(
        insert(Tenant)
        .values(id=uuid.uuid4(), name=tenant_name)
        .on_conflict_do_update(index_elements=[Tenant.name], set_={"name": tenant_name})
        .returning(Tenant.id)
    )
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:PREFIX_LENGTH]))
    session.flush()
    return key


# --- limits -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TenantLimits:
    """The limits that apply to a tenant: its own values, else the defaults; 0 is no limit."""

    submit_rps: int
    max_queued: int
    max_streams: int
    max_calls_per_job: int

    @classmethod
    def of(cls, row: Any, settings: Settings) -> TenantLimits:
        """The limits of a tenant row (or any row with its limit columns)."""
        return cls.resolve({name: getattr(row, name) for name in LIMITS}, settings)

    @classmethod
    def resolve(cls, own: dict[str, int | None], settings: Settings) -> TenantLimits:
        values = {}
        for name in LIMITS:
            value = own.get(name)
            values[name] = value if value is not None else getattr(settings, f"tenant_{name}")
        return cls(**values)


@dataclass(frozen=True)
class Caller:
    """Who an API key belongs to, with the limits in force when it was looked up."""

    tenant_id: uuid.UUID
    limits: TenantLimits


# hash -> (caller, monotonic expiry). Saves a query per request; a key revoked in another
# process keeps working for at most CHATJOBS_AUTH_CACHE_SECONDS in a process that saw it
# (revoke_key drops it at once from its own process), and a tenant's new limits take as long.
# Unknown keys are never cached, so a key works the moment it is created.
_known: dict[str, tuple[Caller, float]] = {}
_KNOWN_MAX = 10_000


def cached_caller(key: str) -> Caller | None:
    """The caller of a key seen recently by this process, without touching the database."""
    hit = _known.get(hash_key(key))
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    return None


def authenticate(*, session: Session, key: str) -> Caller:
    """The tenant an API key belongs to, with its limits; AuthenticationFailed if the key is
    unknown or revoked."""
    if (caller := cached_caller(key)) is not None:
        return caller
    digest = hash_key(key)
    columns = [getattr(Tenant, name) for name in LIMITS]
    row = session.execute(
        select(Tenant.id, *columns)
        .join(ApiKey, ApiKey.tenant_id == Tenant.id)
        .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    ).one_or_none()
    if row is None:
        raise AuthenticationFailed("invalid API key")
    settings = get_settings()
    caller = Caller(row.id, TenantLimits.of(row, settings))
    if len(_known) >= _KNOWN_MAX:
        _known.clear()
    _known[digest] = (caller, time.monotonic() + settings.auth_cache_seconds)
    return caller


def key_owner(*, session: Session, key: str) -> tuple[uuid.UUID, uuid.UUID]:
    """The (key id, tenant id) of a key that is not revoked, never from the cache: for callers
    that keep the key's id (a console session). AuthenticationFailed as ``authenticate``."""
    row = session.execute(
        select(ApiKey.id, ApiKey.tenant_id).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    ).one_or_none()
    if row is None:
        raise AuthenticationFailed("invalid API key")
    return row.id, row.tenant_id


def set_limits(
    *, session: Session, tenant_name: str, values: dict[str, int | float | None]
) -> Tenant:
    """Set some of a tenant's own limits and dispatch settings (None: back to the default);
    TenantNotFound if new."""
    unknown = set(values) - set(LIMITS) - set(DISPATCH)
    if unknown:
        raise ValueError(f"unknown limits {sorted(unknown)}")
    tenant = session.scalars(
        update(Tenant).where(Tenant.name == tenant_name).values(**values).returning(Tenant)
    ).one_or_none()
    if tenant is None:
        raise TenantNotFound(
            f"no tenant {tenant_name!r}; `chatjobs keys create --tenant NAME` creates one"
        )
    return tenant


def list_tenants(*, session: Session) -> list[tuple[Tenant, int]]:
    """Every tenant, by name, with its number of keys that are not revoked."""
    active = (
        select(func.count())
        .where(ApiKey.tenant_id == Tenant.id, ApiKey.revoked_at.is_(None))
        .scalar_subquery()
    )
    rows = session.execute(select(Tenant, active).order_by(Tenant.name)).all()
    return [(tenant, count) for tenant, count in rows]


def queued_jobs(*, session: Session, tenant_id: uuid.UUID, cap: int) -> int:
    """How many of the tenant's jobs wait (queued or retrying), counted up to ``cap`` only, so
    a deep backlog costs no more to check than the limit."""
    waiting = (
        select(Job.id)
        .where(
            Job.tenant_id == tenant_id,
            Job.status.in_((JobStatus.queued, JobStatus.retrying)),
            Job.parent_id.is_(None),
        )
        .limit(cap)
        .subquery()
    )
    return int(session.scalar(select(func.count()).select_from(waiting)) or 0)


# --- keys ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """An API key as lists show it: never the key, only its prefix."""

    prefix: str
    tenant: str
    created_at: datetime
    revoked_at: datetime | None


def list_keys(
    *, session: Session, tenant_id: uuid.UUID | None = None, tenant_name: str | None = None
) -> list[KeyInfo]:
    """Keys, oldest first: one tenant's (by id or name) or everyone's."""
    stmt = select(ApiKey.prefix, Tenant.name, ApiKey.created_at, ApiKey.revoked_at).join(
        Tenant, Tenant.id == ApiKey.tenant_id
    )
    if tenant_id is not None:
        stmt = stmt.where(ApiKey.tenant_id == tenant_id)
    if tenant_name is not None:
        stmt = stmt.where(Tenant.name == tenant_name)
    rows = session.execute(stmt.order_by(ApiKey.created_at, ApiKey.id)).all()
    return [KeyInfo(*row) for row in rows]


def revoke_key(*, session: Session, prefix: str, tenant_id: uuid.UUID | None = None) -> KeyInfo:
    """Revoke the key with that prefix (only among the tenant's, when one is named).

    Revoking a revoked key changes nothing and returns it. The key stops working at once in
    this process; other processes drop it from their caches within the auth cache time.
    """
    where: list[Any] = [ApiKey.prefix == prefix]
    if tenant_id is not None:
        where.append(ApiKey.tenant_id == tenant_id)
    matches = session.execute(select(ApiKey.id).where(*where).with_for_update()).all()
    if not matches:
        raise KeyNotFound(f"no API key with prefix {prefix!r}")
    if len(matches) > 1:
        raise AmbiguousKeyPrefix(f"{len(matches)} API keys have prefix {prefix!r}")
    key = session.scalars(
        update(ApiKey)
        .where(ApiKey.id == matches[0].id)
        .values(revoked_at=func.coalesce(ApiKey.revoked_at, func.now()))
        .returning(ApiKey)
    ).one()
    # Dropped now and again after the commit: a request of this process that looked the key
    # up in between (seeing it valid until the commit) must not leave it cached.
    digest = key.key_hash
    _known.pop(digest, None)
    event.listen(session, "after_commit", lambda _: _known.pop(digest, None), once=True)
    tenant = session.scalar(select(Tenant.name).where(Tenant.id == key.tenant_id))
    return KeyInfo(key.prefix, tenant or "", key.created_at, key.revoked_at)
