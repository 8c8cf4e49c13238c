"""keep ix_jobs_open small for queue stats; the ordered one becomes ix_jobs_open_created

0004 widened ix_jobs_open with (created_at, id); that defeats B-tree deduplication and made
the queue-stats index-only scan read ~16x more pages on a million jobs. The wide index stays,
renamed, for listings; the small one comes back for the counts.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 00:05:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = sa.text("status NOT IN ('succeeded', 'cancelled')")


def upgrade() -> None:
    op.execute("ALTER INDEX ix_jobs_open RENAME TO ix_jobs_open_created")
    op.create_index(
        "ix_jobs_open", "jobs", ["queue", "status"], unique=False, postgresql_where=OPEN
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_open", table_name="jobs", postgresql_where=OPEN)
    op.execute("ALTER INDEX ix_jobs_open_created RENAME TO ix_jobs_open")
