"""index the dead jobs removed from the DLQ, so queue stats and /metrics can leave them out

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 00:06:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REMOVED = sa.text("status = 'dead' AND dlq_removed_at IS NOT NULL")


def upgrade() -> None:
    op.create_index(
        "ix_jobs_dlq_removed", "jobs", ["queue"], unique=False, postgresql_where=REMOVED
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_dlq_removed", table_name="jobs", postgresql_where=REMOVED)
