"""cancelling running jobs, deferrals (RetryLater) and unique keys while waiting

``cancel_requested_at``/``cancel_requested_by``: a cancel asked of a running job, which its
worker sees at its next heartbeat. ``deferrals`` counts ``RetryLater`` deferrals (they spend
no attempt; past ``CONVEYOR_MAX_DEFERRALS`` one counts as a failed attempt). ``unique_key``
with ``unique_until``: a waiting job holds its key (per producer scope and type) until it
starts, is cancelled, or ``unique_until`` passes; the partial unique index is the arbiter
between concurrent submissions. A claim or cancel clears ``unique_until``, so a row never
enters that index again by an update.

Revision ID: 0011
Revises: 0009
Create Date: 2026-11-28 11:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

HOLDING = sa.text("unique_until IS NOT NULL")


def upgrade() -> None:
    op.add_column("jobs", sa.Column("cancel_requested_at", sa.DateTime(timezone=True)))
    op.add_column("jobs", sa.Column("cancel_requested_by", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("deferrals", sa.Integer(), server_default="0", nullable=False))
    op.add_column("jobs", sa.Column("unique_key", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("unique_until", sa.DateTime(timezone=True)))
    op.create_index(
        "uq_jobs_unique_waiting",
        "jobs",
        ["idempotency_scope", "type", "unique_key"],
        unique=True,
        postgresql_where=HOLDING,
    )


def downgrade() -> None:
    op.drop_index("uq_jobs_unique_waiting", table_name="jobs", postgresql_where=HOLDING)
    op.drop_column("jobs", "unique_until")
    op.drop_column("jobs", "unique_key")
    op.drop_column("jobs", "deferrals")
    op.drop_column("jobs", "cancel_requested_by")
    op.drop_column("jobs", "cancel_requested_at")
