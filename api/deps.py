"""Request-scoped dependencies: one database session per request, and the caller's tenant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header
from sqlalchemy.orm import Session

from chatjobs.db import session_scope
from chatjobs.errors import AuthenticationFailed
from chatjobs.tenants import authenticate


def get_db() -> Iterator[Session]:
    with session_scope() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_db)]


def get_tenant(
    session: SessionDep,
    authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> uuid.UUID:
    if not authorization:
        raise AuthenticationFailed("missing Authorization header; send 'Bearer <API key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthenticationFailed("Authorization header must be 'Bearer <API key>'")
    return authenticate(session=session, key=key.strip())


TenantDep = Annotated[uuid.UUID, Depends(get_tenant)]
