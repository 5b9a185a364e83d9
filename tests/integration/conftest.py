"""Fixtures for in-process tests of the job core: a broker queue of their own and a tenant."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from chatjobs.db import session_scope
from chatjobs.settings import get_settings
from chatjobs.tenants import create_key


@pytest.fixture
def queue(stack_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"core-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("CHATJOBS_QUEUE_NAME", name)
    get_settings.cache_clear()
    yield name
    monkeypatch.delenv("CHATJOBS_QUEUE_NAME")
    get_settings.cache_clear()


@pytest.fixture
def tenant(queue: str) -> uuid.UUID:
    from chatjobs.models import Tenant

    name = f"t-{uuid.uuid4().hex[:8]}"
    with session_scope() as session:
        create_key(session=session, tenant_name=name)
        return session.scalars(select(Tenant.id).where(Tenant.name == name)).one()
