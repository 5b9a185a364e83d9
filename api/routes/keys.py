"""/v1/keys: the tenant's own API keys, by prefix (a key itself is shown once, at creation)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path
from pydantic import BaseModel, Field

from api.deps import TenantDep
from api.openapi import V1_ERRORS, errors
from chatjobs import tenants
from chatjobs.db import session_scope

router = APIRouter(prefix="/v1/keys", tags=["keys"], responses=V1_ERRORS)


class KeyRead(BaseModel):
    object: Literal["api_key"] = "api_key"
    prefix: str = Field(description="the key's first characters, as `chatjobs keys list` shows")
    created_at: datetime
    revoked_at: datetime | None = Field(description="set once the key is revoked")

    @classmethod
    def of(cls, key: tenants.KeyInfo) -> KeyRead:
        return cls(prefix=key.prefix, created_at=key.created_at, revoked_at=key.revoked_at)


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyRead]


@router.get("", response_model=KeyList)
def list_keys(tenant_id: TenantDep) -> KeyList:
    """The tenant's API keys, oldest first, revoked ones included."""
    with session_scope() as session:
        keys = tenants.list_keys(session=session, tenant_id=tenant_id)
    return KeyList(data=[KeyRead.of(key) for key in keys])


@router.delete("/{prefix}", response_model=KeyRead, responses=errors(404, 409))
def revoke_key(
    prefix: Annotated[str, Path(min_length=1, max_length=16)], tenant_id: TenantDep
) -> KeyRead:
    """Revoke one of the tenant's keys (the one making the call included): refused from now
    on by this process, and by every other within CHATJOBS_AUTH_CACHE_SECONDS. Revoking a
    revoked key returns it unchanged; another tenant's prefix is a 404."""
    with session_scope() as session:
        key = tenants.revoke_key(session=session, prefix=prefix, tenant_id=tenant_id)
    return KeyRead.of(key)
