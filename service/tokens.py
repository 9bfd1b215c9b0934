"""Bearer tokens for the command line (`prunery tokens create|revoke`). Only a token's sha256 is stored
(`db.create_token`); the token itself is returned once, by `create`."""

from __future__ import annotations

from prunery.service import db


def _database(db_url: str, migrate: bool) -> db.Database:
    if migrate:
        db.upgrade(db_url)
    return db.Database(db_url)


def create(db_url: str, tenant: str, description: str = "", *, migrate: bool = False) -> str:
    """A new token for `tenant` (created if new). With `migrate`, bring the database to head first."""
    return create_with_id(db_url, tenant, description, migrate=migrate)[1]


def create_with_id(db_url: str, tenant: str, description: str = "", *, migrate: bool = False) -> tuple[str, str]:
    """(token id, token): the id can revoke the token later without knowing it."""
    database = _database(db_url, migrate)
    try:
        with database.session() as s:
            row, token = db.create_token(s, tenant, description)
            return str(row.id), token
    finally:
        database.dispose()


def revoke(db_url: str, token_or_id: str) -> bool:
    """Revoke a token given the token or its id; False if there is no such unrevoked token. API servers
    may keep accepting it for up to PRUNERY_AUTH_CACHE_S seconds."""
    database = db.Database(db_url)
    try:
        with database.session() as s:
            return db.revoke_token(s, token_or_id)
    finally:
        database.dispose()
