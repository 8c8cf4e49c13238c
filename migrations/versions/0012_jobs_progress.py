"""jobs.progress: the latest progress a running attempt reported

``{"value": 0..1, "message": text or null}`` or NULL; written by the worker (coalesced, at most
a few times a second per job), fenced by the claim token like every write of an attempt, and
cleared by the next claim.

Revision ID: 0012
Revises: 0009
Create Date: 2026-11-28 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable without a default: a catalog change only, no table rewrite.
    op.add_column("jobs", sa.Column("progress", postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column("jobs", "progress")
