"""Tenants and their API keys. A key is shown once; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs.errors import AuthenticationFailed
from chatjobs.models import ApiKey, Tenant
from chatjobs.settings import get_settings

KEY_PREFIX = "cj_"


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
    session.add(ApiKey(tenant_id=tenant_id, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


# hash -> (tenant id, monotonic expiry). Saves a query per request; a revoked key keeps
# working for at most CHATJOBS_AUTH_CACHE_SECONDS in a process that saw it. Unknown keys
# are never cached, so a key works the moment it is created.
_known: dict[str, tuple[uuid.UUID, float]] = {}
_KNOWN_MAX = 10_000


def cached_tenant(key: str) -> uuid.UUID | None:
    """The tenant of a key seen recently by this process, without touching the database."""
    hit = _known.get(hash_key(key))
    if hit is not None and hit[1] > time.monotonic():
        return hit[0]
    return None


def authenticate(*, session: Session, key: str) -> uuid.UUID:
    """The tenant id an API key belongs to; AuthenticationFailed if it is unknown or revoked."""
    if (tenant_id := cached_tenant(key)) is not None:
        return tenant_id
    digest = hash_key(key)
    tenant_id = session.scalar(
        select(ApiKey.tenant_id).where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
    )
    if tenant_id is None:
        raise AuthenticationFailed("invalid API key")
    if len(_known) >= _KNOWN_MAX:
        _known.clear()
    _known[digest] = (tenant_id, time.monotonic() + get_settings().auth_cache_seconds)
    return tenant_id
