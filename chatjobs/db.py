"""Engine, session factory and the declarative base."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, MetaData, create_engine, func, make_url, select, text, update
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.pool import NullPool

from chatjobs import storable
from chatjobs.settings import get_settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@lru_cache
def get_engine() -> Engine:
    """The process's engine; built on first use so forked workers each get their own."""
    settings = get_settings()
    return create_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size // 2,
        # No pre-ping: it costs a round trip per checkout. A dropped server connection
        # raises a disconnect error, which invalidates the whole pool, so the next unit of
        # work reconnects.
        pool_timeout=30,
        connect_args={"connect_timeout": 5},
        # Reads what Python's json refuses (numbers over 4,300 digits, deep nesting) that
        # older rows may hold: a stored row must always read back.
        json_deserializer=storable.loads,
    )


@lru_cache
def get_sessionmaker() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def reset_engine(*, after_fork: bool = False) -> None:
    """Forget the engine (after a fork, or when tests change the settings).

    After a fork the pooled sockets belong to the parent: drop them without closing.
    """
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=not after_fork)
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()


def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it does not exist; True if it was created."""
    target = make_url(url)
    admin = create_engine(
        target.set(database="postgres"), isolation_level="AUTOCOMMIT", poolclass=NullPool
    )
    try:
        with admin.connect() as conn:
            exists = conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"),
                {"name": target.database},
            )
            if exists:
                return False
            conn.execute(text(f'CREATE DATABASE "{target.database}"'))
            return True
    finally:
        admin.dispose()


def take_due(session: Session, model: Any, *where: Any, limit: int) -> list[uuid.UUID]:
    """Claim the right to publish rows of ``model`` whose ``next_attempt_at`` has passed,
    clearing it: the earliest first, SKIP LOCKED so two dispatchers never take one row."""
    due = (
        select(model.id)
        .where(*where, model.next_attempt_at <= func.now())
        .order_by(model.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    return list(
        session.scalars(
            update(model)
            .where(model.id.in_(due))
            .values(next_attempt_at=None, updated_at=func.now())
            .returning(model.id)
            .execution_options(synchronize_session=False)
        )
    )
