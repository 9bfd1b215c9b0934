"""jobs.last_sent_at: when the job's message was last sent to its queue (the reaper's resend of lost messages).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Nullable: the reaper reads a missing value as the job's create time. Jobs QUEUED when this revision runs get
their update time (that of their last event, when they were created or put back in the queue), the best
record of their last send there is.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET last_sent_at = update_time WHERE state = 'QUEUED'")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("last_sent_at")
