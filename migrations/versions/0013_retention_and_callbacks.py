"""retention index; completion callback columns, their due index and trigger

``ix_jobs_finished`` (status, type, finished_at over the finished rows) lets pruning find the
expired rows of each status and type directly. The callback columns hold each job's delivery
state; the trigger makes a delivery pending (turn + 1) whenever a job with a ``callback_url``
finishes, whichever statement finished it (ADR 0017).

Safe on a live database: the new columns are nullable or have constant defaults (no rewrite),
the CHECK is added NOT VALID and validated without blocking writes, and both indexes are built
CONCURRENTLY outside the migration's transaction.

Revision ID: 0013
Revises: 0009
Create Date: 2026-11-28 12:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FINISHED = sa.text("finished_at IS NOT NULL")
PENDING = sa.text("callback_status = 'pending'")

CALLBACK_DUE = """
CREATE OR REPLACE FUNCTION conveyor_callback_due() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.callback_status := 'pending';
    NEW.callback_attempts := 0;
    NEW.callback_last_error := NULL;
    NEW.callback_next_at := now();
    NEW.callback_turn := OLD.callback_turn + 1;
    RETURN NEW;
END
$$
"""
# WHEN is evaluated without calling the function: jobs without a callback pay next to nothing.
TRIGGER = """
CREATE TRIGGER jobs_callback_due BEFORE UPDATE OF status ON jobs FOR EACH ROW
WHEN (NEW.callback_url IS NOT NULL AND NEW.finished_at IS NOT NULL AND OLD.finished_at IS NULL)
EXECUTE FUNCTION conveyor_callback_due()
"""


def upgrade() -> None:
    op.add_column("jobs", sa.Column("callback_url", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("callback_status", sa.Text(), nullable=True))
    op.add_column(
        "jobs", sa.Column("callback_attempts", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column("jobs", sa.Column("callback_last_error", sa.Text(), nullable=True))
    op.add_column("jobs", sa.Column("callback_next_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "jobs", sa.Column("callback_turn", sa.Integer(), server_default="0", nullable=False)
    )
    op.execute(
        "ALTER TABLE jobs ADD CONSTRAINT ck_jobs_callback_status_valid"
        " CHECK (callback_status IN ('pending', 'delivered', 'failed')) NOT VALID"
    )
    op.execute("ALTER TABLE jobs VALIDATE CONSTRAINT ck_jobs_callback_status_valid")
    op.execute(CALLBACK_DUE)
    op.execute(TRIGGER)
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_jobs_finished",
            "jobs",
            ["status", "type", "finished_at"],
            postgresql_where=FINISHED,
            postgresql_concurrently=True,
            if_not_exists=True,
        )
        op.create_index(
            "ix_jobs_callback_due",
            "jobs",
            ["callback_next_at"],
            postgresql_where=PENDING,
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index("ix_jobs_callback_due", table_name="jobs", postgresql_concurrently=True)
        op.drop_index("ix_jobs_finished", table_name="jobs", postgresql_concurrently=True)
    op.execute("DROP TRIGGER IF EXISTS jobs_callback_due ON jobs")
    op.execute("DROP FUNCTION IF EXISTS conveyor_callback_due()")
    op.execute("ALTER TABLE jobs DROP CONSTRAINT ck_jobs_callback_status_valid")
    for column in (
        "callback_turn",
        "callback_next_at",
        "callback_last_error",
        "callback_attempts",
        "callback_status",
        "callback_url",
    ):
        op.drop_column("jobs", column)
