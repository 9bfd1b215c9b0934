"""Alembic environment of the service database.

The database URL comes from, in order: a connection or URL passed programmatically
(`prunery.service.store.db.upgrade(url)`), `alembic -x url=...`, the `PRUNERY_DATABASE_URL` environment variable,
or `sqlalchemy.url` in alembic.ini. Examples, from the repository root:

    PRUNERY_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1:5432/prunery alembic upgrade head
    alembic -x url=sqlite:///prunery.db downgrade base
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from prunery.service.store.db import Base, make_engine, normalize_url

config = context.config
if config.config_file_name is not None and not config.attributes.get("connection"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = (config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
           or os.environ.get("PRUNERY_DATABASE_URL") or config.get_main_option("sqlalchemy.url"))
    if not url:
        raise SystemExit("no database URL: pass -x url=... or set PRUNERY_DATABASE_URL")
    return normalize_url(url)


def _configure(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                      render_as_batch=connection.dialect.name == "sqlite")


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.begin() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
