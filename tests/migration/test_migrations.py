"""Migrations go up to head and back down to base, and head matches the ORM models."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from chatjobs import migrate
from chatjobs.db import Base
from tests.conftest import PG_ADMIN

pytestmark = pytest.mark.integration


@pytest.fixture
def empty_database() -> Iterator[str]:
    name = f"chatjobs_mig_{uuid.uuid4().hex[:10]}"
    url = f"{PG_ADMIN}/{name}"
    yield url
    admin = create_engine(f"{PG_ADMIN}/postgres", isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_upgrade_to_head_then_downgrade_to_base_and_up_again(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    engine = create_engine(empty_database, poolclass=NullPool)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"tenants", "api_keys", "jobs", "upstream_calls"} <= tables

        migrate.downgrade(empty_database, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        with engine.connect() as conn:
            types = conn.scalars(text("SELECT typname FROM pg_type WHERE typname = 'job_status'"))
            assert list(types) == []

        migrate.upgrade(empty_database)
        assert "jobs" in set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_head_matches_the_models(empty_database: str) -> None:
    migrate.upgrade(empty_database)
    engine = create_engine(empty_database, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()
