"""running rows out of the listing indexes: a claim writes two index entries, not eight

A claim turns a queued row into a running one; every index whose predicate the new version
meets gets an entry. The listing indexes (by created time, status, queue, type, owner) and
the open-row indexes (queue stats, a queue's jobs in one status) took one each, for a row
that stays running for the length of one attempt. They now leave running rows out; the
listings and the counts read those from ``ix_jobs_lease``, which holds exactly them
(decision 0029).

Safe on a live database: each index is built anew under a temporary name with ``CREATE
INDEX CONCURRENTLY`` (writes go on meanwhile), the old one dropped concurrently, and the new
one renamed (a brief lock). The downgrade builds the old definitions back the same way.

Revision ID: 0017
Revises: 0016
Create Date: 2026-11-29 14:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOT_RUNNING = "status <> 'running'"
OPEN = "status NOT IN ('succeeded', 'cancelled')"
OPEN_NOT_RUNNING = "status NOT IN ('running', 'succeeded', 'cancelled')"

# name: (columns, predicate before, predicate after)
INDEXES: dict[str, tuple[str, str | None, str]] = {
    "ix_jobs_created": ("created_at DESC, id DESC", None, NOT_RUNNING),
    "ix_jobs_status_created": ("status, created_at DESC, id DESC", None, NOT_RUNNING),
    "ix_jobs_queue_created": ("queue, created_at DESC, id DESC", None, NOT_RUNNING),
    "ix_jobs_type_created": ("type, created_at DESC, id DESC", None, NOT_RUNNING),
    "ix_jobs_owner_created": (
        "owner, created_at DESC, id DESC",
        "owner IS NOT NULL",
        f"owner IS NOT NULL AND {NOT_RUNNING}",
    ),
    "ix_jobs_open": ("queue, status", OPEN, OPEN_NOT_RUNNING),
    "ix_jobs_open_created": ("queue, status, created_at DESC, id DESC", OPEN, OPEN_NOT_RUNNING),
}


def _rebuild(name: str, columns: str, where: str | None) -> None:
    building = f"{name}_new"
    predicate = f" WHERE {where}" if where else ""
    op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {building}")  # a build that failed midway
    op.execute(f"CREATE INDEX CONCURRENTLY {building} ON jobs ({columns}){predicate}")
    op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
    op.execute(f"ALTER INDEX {building} RENAME TO {name}")


def upgrade() -> None:
    with op.get_context().autocommit_block():
        for name, (columns, _, after) in INDEXES.items():
            _rebuild(name, columns, after)


def downgrade() -> None:
    with op.get_context().autocommit_block():
        for name, (columns, before, _) in INDEXES.items():
            _rebuild(name, columns, before)
