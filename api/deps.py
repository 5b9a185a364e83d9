"""Request-scoped dependencies: the caller's tenant.

Handlers open their own ``session_scope()`` inside one sync function, so a request costs one
hop to the thread pool instead of one per dependency (measured: the hops were a fifth of the
API's CPU at 600 requests/s). The tenant is resolved on the event loop from a short-lived
cache and only goes to the database on a miss.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import Depends, Header
from starlette.concurrency import run_in_threadpool

from chatjobs.db import session_scope
from chatjobs.errors import AuthenticationFailed
from chatjobs.tenants import authenticate, cached_tenant


def _lookup(key: str) -> uuid.UUID:
    with session_scope() as session:
        return authenticate(session=session, key=key)


async def get_tenant(
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> uuid.UUID:
    if not authorization:
        raise AuthenticationFailed("missing Authorization header; send 'Bearer <API key>'")
    scheme, _, key = authorization.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise AuthenticationFailed("Authorization header must be 'Bearer <API key>'")
    tenant_id = cached_tenant(key)
    if tenant_id is None:
        tenant_id = await run_in_threadpool(_lookup, key)
    return tenant_id


TenantDep = Annotated[uuid.UUID, Depends(get_tenant)]
