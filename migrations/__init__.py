"""Alembic migrations of the service database (shipped as `prunery.migrations`; see service/db.upgrade)."""
