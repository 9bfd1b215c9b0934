"""jobs.queue: the worker pool (Celery queue, e.g. a GPU class) a job is sent to.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26

Jobs created before this revision ran on the default queue, which the server default records.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue", sa.String(64), nullable=False, server_default="prunery"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queue")
