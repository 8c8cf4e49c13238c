"""jobs.claim_token: the fencing token of an attempt, raised by every claim, never lowered

``(attempts, worker)`` could repeat: a replay resets ``attempts`` and a release on shutdown
lowers it, so one worker could hold the same pair twice. The token only grows.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A constant default: no table rewrite, the rows keep their place.
    op.add_column(
        "jobs", sa.Column("claim_token", sa.BigInteger(), server_default="0", nullable=False)
    )


def downgrade() -> None:
    op.drop_column("jobs", "claim_token")
