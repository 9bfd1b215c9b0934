"""Bearer tokens for the command line (`prunery tokens create|revoke`). Only a token's sha256 is stored
(`db.create_token`); the token itself is returned once, by `create`.

Failures are one line a person can act on (`TokenStoreError`, a RuntimeError; a bad tenant id is a
ValueError), never a driver's traceback, and a command that fails leaves no file behind: a SQLite database
that did not exist before `create` is removed again (with the folders made for it), and `revoke` never
creates one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from . import db


class TokenStoreError(RuntimeError):
    """The database cannot be used for tokens: not reachable, not migrated, ... (one line)."""


def sqlite_path(db_url: str) -> Path | None:
    """The file of a SQLite URL (or plain path); None for other databases and in-memory SQLite."""
    url = make_url(db.normalize_url(db_url))
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _where(db_url: str) -> str:
    """The database for messages: a SQLite file's path, else the URL without its password."""
    path = sqlite_path(db_url)
    return str(path) if path is not None else make_url(db.normalize_url(db_url)).render_as_string(hide_password=True)


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e  # the driver's error, without SQLAlchemy's SQL and links
    lines = [line.strip() for line in str(orig).splitlines() if line.strip()]
    return lines[0] if lines else type(orig).__name__


@contextmanager
def _one_line_errors(db_url: str) -> Iterator[None]:
    """Database errors as one line naming the database; a missing schema names the command that makes it."""
    try:
        yield
    except SQLAlchemyError as e:
        try:
            unmigrated = db.current_revision(db_url) is None
        except SQLAlchemyError:
            unmigrated = False
        if unmigrated:
            raise TokenStoreError(f"the database {_where(db_url)} has no Prunery schema yet: migrate it first "
                                  "(`prunery serve` and `prunery tokens create` do, unless PRUNERY_MIGRATE=0)") from e
        raise TokenStoreError(f"database {_where(db_url)}: {_first_line(e)}") from e
    except Exception as e:
        if type(e).__module__.startswith("alembic"):  # e.g. a database migrated by a newer Prunery
            raise TokenStoreError(f"cannot migrate the database {_where(db_url)}: {_first_line(e)}") from e
        raise


@contextmanager
def _removed_if_new_and_failed(db_url: str) -> Iterator[None]:
    """A SQLite file (and its folders) that did not exist before is removed again if the block fails."""
    path = sqlite_path(db_url)
    if path is None or path.exists():
        yield
        return
    path = path.resolve()
    made = [p for p in path.parents if not p.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for suffix in ("", "-wal", "-shm", "-journal"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty: something else lives there now
        raise


def create(db_url: str, tenant: str, description: str = "", *, migrate: bool = False) -> str:
    """A new token for `tenant` (created if new). With `migrate`, bring the database to head first."""
    return create_with_id(db_url, tenant, description, migrate=migrate)[1]


def create_with_id(db_url: str, tenant: str, description: str = "", *, migrate: bool = False) -> tuple[str, str]:
    """(token id, token): the id can revoke the token later without knowing it."""
    db.check_tenant_id(tenant)  # before touching the database
    with _removed_if_new_and_failed(db_url), _one_line_errors(db_url):
        if migrate:
            db.upgrade(db_url)
        database = db.Database(db_url)
        try:
            with database.session() as s:
                row, token = db.create_token(s, tenant, description)
                return str(row.id), token
        finally:
            database.dispose()


def revoke(db_url: str, token_or_id: str) -> bool:
    """Revoke a token given the token or its id; False if there is no such unrevoked token. API servers
    may keep accepting it for up to PRUNERY_AUTH_CACHE_S seconds. Never creates or migrates a database."""
    path = sqlite_path(db_url)
    if path is not None and not path.is_file():
        raise TokenStoreError(f"no database at {path}: no token to revoke there")
    with _one_line_errors(db_url):
        database = db.Database(db_url)
        try:
            with database.session() as s:
                return db.revoke_token(s, token_or_id)
        finally:
            database.dispose()
