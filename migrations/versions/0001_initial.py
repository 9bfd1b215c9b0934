"""Initial schema: tenants, api_tokens, jobs, job_events, artifacts.

Revision ID: 0001
Revises:
Create Date: 2025-11-26

Written by hand to match `prunery.service.store.db` (tests/service/test_db.py checks that the models and the
migrated schema agree). Constraint names follow the models' naming convention so later revisions can address them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLING", "CANCELLED")
ARTIFACT_KINDS = ("MODEL", "DATASET", "REPORT")
ARTIFACT_STATES = ("PENDING", "READY")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), nullable=False),
        _time("create_time"),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
    )

    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("description", sa.String(200), nullable=False),
        _time("create_time"),
        _time("revoke_time", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_api_tokens_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.UniqueConstraint("token_sha256", name="uq_api_tokens_token_sha256"),
    )
    op.create_index("ix_api_tokens_tenant_id", "api_tokens", ["tenant_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Double(), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("attempt_count", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.Integer(), nullable=True),
        sa.Column("error_reason", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("result_artifact_ids", sa.JSON(), nullable=False),
        sa.Column("report", sa.JSON(), nullable=True),
        _time("create_time"),
        _time("start_time", nullable=True),
        _time("end_time", nullable=True),
        _time("update_time"),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        _time("lease_expires_at", nullable=True),
        _time("heartbeat_at", nullable=True),
        sa.Column("event_sequence", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_jobs_tenant_id_tenants", ondelete="CASCADE"),
        sa.UniqueConstraint("tenant_id", "request_id", name="uq_jobs_tenant_id_request_id"),
        sa.CheckConstraint(_in("state", JOB_STATES), name="ck_jobs_state"),
    )
    op.create_index("ix_jobs_tenant_id_create_time_id", "jobs", ["tenant_id", "create_time", "id"])
    op.create_index("ix_jobs_state_lease_expires_at", "jobs", ["state", "lease_expires_at"])

    op.create_table(
        "job_events",
        sa.Column("job_id", sa.Uuid(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        _time("time"),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("progress", sa.Double(), nullable=False),
        sa.Column("stage", sa.String(32), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("job_id", "sequence", name="pk_job_events"),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name="fk_job_events_job_id_jobs", ondelete="CASCADE"),
    )

    op.create_table(
        "artifacts",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("display_name", sa.String(512), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("storage_key", sa.String(1024), nullable=False),
        sa.Column("producer_job_id", sa.Uuid(), nullable=True),
        _time("create_time"),
        sa.PrimaryKeyConstraint("id", name="pk_artifacts"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_artifacts_tenant_id_tenants",
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["producer_job_id"], ["jobs.id"], name="fk_artifacts_producer_job_id_jobs",
                                ondelete="SET NULL"),
        sa.CheckConstraint(_in("kind", ARTIFACT_KINDS), name="ck_artifacts_kind"),
        sa.CheckConstraint(_in("state", ARTIFACT_STATES), name="ck_artifacts_state"),
    )
    op.create_index("ix_artifacts_tenant_id_create_time_id", "artifacts", ["tenant_id", "create_time", "id"])
    op.create_index("ix_artifacts_producer_job_id", "artifacts", ["producer_job_id"])


def downgrade() -> None:
    op.drop_index("ix_artifacts_producer_job_id", table_name="artifacts")
    op.drop_index("ix_artifacts_tenant_id_create_time_id", table_name="artifacts")
    op.drop_table("artifacts")
    op.drop_table("job_events")
    op.drop_index("ix_jobs_state_lease_expires_at", table_name="jobs")
    op.drop_index("ix_jobs_tenant_id_create_time_id", table_name="jobs")
    op.drop_table("jobs")
    op.drop_index("ix_api_tokens_tenant_id", table_name="api_tokens")
    op.drop_table("api_tokens")
    op.drop_table("tenants")
