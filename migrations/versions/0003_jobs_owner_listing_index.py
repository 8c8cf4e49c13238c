"""index for a producer's own job listing

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 23:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_owner_created",
        "jobs",
        ["owner", sa.literal_column("created_at DESC"), sa.literal_column("id DESC")],
        unique=False,
        postgresql_where=sa.text("owner IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index(
        "ix_jobs_owner_created",
        table_name="jobs",
        postgresql_where=sa.text("owner IS NOT NULL"),
    )
