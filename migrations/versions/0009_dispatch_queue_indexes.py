"""maintenance indexes lead with the queue; the confirmed stream entry of a dispatch

Promotion and the dispatch sweep filter by the worker's queues: indexes without the queue
made every poll walk other queues' due and undispatched rows (an unserved queue's backlog was
rescanned by every worker four times a second). The undispatched index also carries the
priority band, so the sweep walks each stream's candidates on their own and one full stream
cannot hold back the others. ``dispatch_entry`` records the stream entry id that a dispatch
mark stands for, so a worker can check that the entry still exists.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEDULED = sa.text("status = 'scheduled'")
RETRYING = sa.text("status = 'retrying'")
UNDISPATCHED = sa.text("status = 'queued' AND dispatched_at IS NULL")
SIGN = "least(greatest(priority, -1), 1)"  # the band: 1 high, 0 default, -1 low


def upgrade() -> None:
    op.add_column("jobs", sa.Column("dispatch_entry", sa.Text(), nullable=True))
    op.drop_index("ix_jobs_scheduled_due", table_name="jobs", postgresql_where=SCHEDULED)
    op.drop_index("ix_jobs_retrying_due", table_name="jobs", postgresql_where=RETRYING)
    op.drop_index("ix_jobs_undispatched", table_name="jobs", postgresql_where=UNDISPATCHED)
    op.create_index(
        "ix_jobs_scheduled_due", "jobs", ["queue", "run_at"], postgresql_where=SCHEDULED
    )
    op.create_index(
        "ix_jobs_retrying_due", "jobs", ["queue", "next_attempt_at"], postgresql_where=RETRYING
    )
    op.create_index(
        "ix_jobs_undispatched",
        "jobs",
        ["queue", sa.literal_column(SIGN), "enqueued_at", "id"],
        postgresql_where=UNDISPATCHED,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_undispatched", table_name="jobs", postgresql_where=UNDISPATCHED)
    op.drop_index("ix_jobs_retrying_due", table_name="jobs", postgresql_where=RETRYING)
    op.drop_index("ix_jobs_scheduled_due", table_name="jobs", postgresql_where=SCHEDULED)
    op.create_index("ix_jobs_scheduled_due", "jobs", ["run_at"], postgresql_where=SCHEDULED)
    op.create_index("ix_jobs_retrying_due", "jobs", ["next_attempt_at"], postgresql_where=RETRYING)
    op.create_index("ix_jobs_undispatched", "jobs", ["enqueued_at"], postgresql_where=UNDISPATCHED)
    op.drop_column("jobs", "dispatch_entry")
