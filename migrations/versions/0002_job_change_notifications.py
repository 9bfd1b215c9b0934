"""Postgres: every insert, update or delete of a job row sends NOTIFY prunery_jobs '<job id>'.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26

The API keeps job reads in memory and WatchJob streams wake on these notifications
(`prunery.service.api.jobcache`). A trigger, not application code, sends them, so no writer (worker, reaper,
API, an operator's SQL) can forget to. Postgres delivers a transaction's notifications when it commits, in
commit order. SQLite (the embedded stack) has no notifications: nothing to do there.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "prunery_jobs"  # prunery.service.api.jobcache.CHANNEL


def upgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute(f"""
        CREATE FUNCTION prunery_notify_job_change() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END::text);
            RETURN NULL;
        END $$
    """)
    op.execute("""
        CREATE TRIGGER jobs_notify_change AFTER INSERT OR UPDATE OR DELETE ON jobs
        FOR EACH ROW EXECUTE FUNCTION prunery_notify_job_change()
    """)


def downgrade() -> None:
    if op.get_context().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS jobs_notify_change ON jobs")
    op.execute("DROP FUNCTION IF EXISTS prunery_notify_job_change()")
