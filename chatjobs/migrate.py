"""Running the Alembic migrations from code (the CLI, tests and `make run`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from chatjobs.db import ensure_database
from chatjobs.settings import get_settings

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Create the database if missing, then migrate it to ``revision``."""
    url = database_url or get_settings().database_url
    ensure_database(url)
    command.upgrade(alembic_config(url), revision)


def downgrade(database_url: str | None = None, revision: str = "base") -> None:
    url = database_url or get_settings().database_url
    command.downgrade(alembic_config(url), revision)
