"""schedules (periodic jobs); jobs.schedule and jobs.scheduled_for with one job per slot

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 08:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SLOT = sa.text("schedule IS NOT NULL AND scheduled_for IS NOT NULL")
NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("cron", sa.Text(), nullable=False),
        sa.Column("timezone", sa.Text(), server_default="UTC", nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column(
            "payload",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("queue", sa.Text(), server_default="default", nullable=False),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("missed", sa.Text(), server_default="skip", nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("source", sa.Text(), server_default="api", nullable=False),
        sa.Column("declared_hash", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=NOW, nullable=False),
        sa.CheckConstraint(
            "missed IN ('skip', 'run_once')", name=op.f("ck_schedules_missed_valid")
        ),
        sa.CheckConstraint("source IN ('api', 'code')", name=op.f("ck_schedules_source_valid")),
        sa.CheckConstraint(
            "enabled = (next_run_at IS NOT NULL)", name=op.f("ck_schedules_next_run_iff_enabled")
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_schedules")),
    )
    op.create_index(
        "ix_schedules_due",
        "schedules",
        ["next_run_at"],
        unique=False,
        postgresql_where=sa.text("enabled"),
    )
    op.add_column("jobs", sa.Column("schedule", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("scheduled_for", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "uq_jobs_schedule_slot",
        "jobs",
        ["schedule", "scheduled_for"],
        unique=True,
        postgresql_where=SLOT,
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_schedule_slot", table_name="jobs", postgresql_where=SLOT)
    op.drop_column("jobs", "scheduled_for")
    op.drop_column("jobs", "schedule")
    op.drop_index("ix_schedules_due", table_name="schedules", postgresql_where=sa.text("enabled"))
    op.drop_table("schedules")
