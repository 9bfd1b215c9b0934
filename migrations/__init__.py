"""Alembic migrations of the service database (`migrations/`, shipped as `prunery.migrations`; see
`prunery.service.store.db.upgrade`)."""
