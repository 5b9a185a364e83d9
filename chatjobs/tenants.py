"""Tenants and their API keys. A key is shown once; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import secrets
import uuid

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from chatjobs.errors import AuthenticationFailed
from chatjobs.models import ApiKey, Tenant

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


def authenticate(*, session: Session, key: str) -> uuid.UUID:
    """The tenant id an API key belongs to; AuthenticationFailed if it is unknown or revoked."""
    tenant_id = session.scalar(
        select(ApiKey.tenant_id).where(
            ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    )
    if tenant_id is None:
        raise AuthenticationFailed("invalid API key")
    return tenant_id
