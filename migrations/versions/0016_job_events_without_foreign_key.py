"""job_events without its foreign key to jobs: an event row no longer costs a key lookup

Every transition inserts its ``job_events`` rows in the statement that moves the job, so the
job exists and is locked when its events are written; the foreign key only checked that
again, once per row (a ``FOR KEY SHARE`` lookup of the job by the RI trigger), and cascaded
retention's deletes. Those checks were most of what the event rows cost the worker's claim
and completion (ADR 0027). Retention now deletes a job's events in the statement that
deletes the job.

Safe on a live database: dropping a constraint scans nothing; it takes its locks for a
moment. The downgrade first deletes the events whose job is gone (none, unless rows were
deleted by hand), then adds the key back NOT VALID and validates it without blocking writes.

Revision ID: 0016
Revises: 0015
Create Date: 2026-11-28 21:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_job_events_job_id_jobs"


def upgrade() -> None:
    op.execute(f"ALTER TABLE job_events DROP CONSTRAINT IF EXISTS {FK}")


def downgrade() -> None:
    op.execute(
        "DELETE FROM job_events e WHERE NOT EXISTS (SELECT FROM jobs j WHERE j.id = e.job_id)"
    )
    op.execute(
        f"ALTER TABLE job_events ADD CONSTRAINT {FK} FOREIGN KEY (job_id)"
        " REFERENCES jobs (id) ON DELETE CASCADE NOT VALID"
    )
    op.execute(f"ALTER TABLE job_events VALIDATE CONSTRAINT {FK}")
