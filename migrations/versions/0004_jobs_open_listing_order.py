"""ix_jobs_open also orders by (created_at, id), for listings of a queue's open jobs

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 23:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = sa.text("status NOT IN ('succeeded', 'cancelled')")


def upgrade() -> None:
    op.drop_index("ix_jobs_open", table_name="jobs", postgresql_where=OPEN)
    op.create_index(
        "ix_jobs_open",
        "jobs",
        [
            "queue",
            "status",
            sa.literal_column("created_at DESC"),
            sa.literal_column("id DESC"),
        ],
        unique=False,
        postgresql_where=OPEN,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_open", table_name="jobs", postgresql_where=OPEN)
    op.create_index(
        "ix_jobs_open", "jobs", ["queue", "status"], unique=False, postgresql_where=OPEN
    )
