"""ORM models. Postgres is the record: every job state lives here, never only in Redis.

The status column, its CHECK constraints and the partial indexes' predicates are built from
:class:`app.jobs.status.JobStatus` (a leaf module), the one definition of the status machine.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from app.jobs.status import TERMINAL, JobStatus

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Json = dict[str, Any]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _sql_in(statuses: frozenset[JobStatus] | set[JobStatus]) -> str:
    """``('a', 'b')``: the statuses as a SQL list for ``IN``, in declaration order."""
    return "(" + ", ".join(f"'{s.value}'" for s in JobStatus if s in statuses) + ")"


def _status_is(status: JobStatus) -> str:
    return f"status = '{status.value}'"


ALL_SQL = _sql_in(set(JobStatus))
TERMINAL_SQL = _sql_in(TERMINAL)
# A running row is in none of the listing indexes, only in ix_jobs_lease: a claim then writes
# two index entries instead of eight (decision 0029). The listings and counts read the
# running rows apart (few: one per attempt in progress) and merge them in.
RUNNING_SQL = _status_is(JobStatus.RUNNING)
NOT_RUNNING_SQL = f"status <> '{JobStatus.RUNNING.value}'"
# Rows that stay open for a while, running aside: everything but succeeded and cancelled (dead
# jobs are listed in the DLQ). Queue stats and the open listings read these.
OPEN_NOT_RUNNING_SQL = (
    f"status NOT IN {_sql_in({JobStatus.SUCCEEDED, JobStatus.CANCELLED, JobStatus.RUNNING})}"
)


CALLBACK_STATUS_SQL = "('pending', 'delivered', 'failed')"


class StatusText(TypeDecorator[JobStatus]):
    """A :class:`JobStatus` stored as ``text`` (the CHECK constraint keeps it to the enum)."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: JobStatus | str | None, dialect: Dialect) -> str | None:
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> JobStatus | None:
        return None if value is None else JobStatus(value)


# The sign of a job's priority, which names its band (app.streams.keys.band_for): 1 high,
# 0 default, -1 low. An integer compared with "=", so an index on it keeps enqueued_at order.
PRIORITY_SIGN_SQL = "least(greatest(priority, -1), 1)"


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(Text)
    status: Mapped[JobStatus] = mapped_column(StatusText)
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    payload: Mapped[Json] = mapped_column(JSONB)
    result: Mapped[Any | None] = mapped_column(JSONB, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    # The fencing token of the current attempt: every claim raises it, nothing lowers it.
    claim_token: Mapped[int] = mapped_column(BigInteger, server_default="0")
    max_attempts: Mapped[int] = mapped_column(Integer, server_default="3")
    errors: Mapped[list[Json]] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    timeout_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_scope: Mapped[str] = mapped_column(Text, server_default="")
    request_hash: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(Text, nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    run_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dispatch_entry: Mapped[str | None] = mapped_column(Text, nullable=True)  # its stream entry id
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dlq_removed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The schedule that made the job and the slot it was made for (NULL for a trigger).
    schedule: Mapped[str | None] = mapped_column(Text, nullable=True)
    scheduled_for: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A cancel asked of a running job (its worker sees it at its next heartbeat), and by whom.
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested_by: Mapped[str | None] = mapped_column(Text, nullable=True)
    # RetryLater deferrals so far (they spend no attempt; see CONVEYOR_MAX_DEFERRALS).
    deferrals: Mapped[int] = mapped_column(Integer, server_default="0")
    # Debounce: a waiting job holds (scope, type, unique_key) until it starts, is cancelled or
    # unique_until passes (NULL: holds nothing). Only claims and cancels clear it.
    unique_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    unique_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The latest progress of the running attempt: {"value": 0..1, "message": str | None}.
    progress: Mapped[Json | None] = mapped_column(JSONB, nullable=True)
    # Completion callback (app.jobs.callbacks): a trigger makes a delivery pending, turn + 1,
    # whenever a job with a callback_url finishes; the workers deliver it (ADR 0017).
    callback_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_status: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    callback_last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    callback_next_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    callback_turn: Mapped[int] = mapped_column(Integer, server_default="0")
    # The W3C traceparent of the submission's span, when tracing is on (ADR 0022): every
    # attempt's span is its child.
    traceparent: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        CheckConstraint(f"status IN {ALL_SQL}", name="status_valid"),
        CheckConstraint(f"callback_status IN {CALLBACK_STATUS_SQL}", name="callback_status_valid"),
        CheckConstraint(
            f"(finished_at IS NOT NULL) = (status IN {TERMINAL_SQL})", name="finished_iff_terminal"
        ),
        CheckConstraint("attempts >= 0 AND max_attempts BETWEEN 1 AND 100", name="attempts_range"),
        Index(
            "uq_jobs_idempotency",
            "idempotency_scope",
            "idempotency_key",
            unique=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
        # Listing, newest first, with optional filters; running rows are listed from
        # ix_jobs_lease (see RUNNING_SQL).
        Index(
            "ix_jobs_created",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text(NOT_RUNNING_SQL),
        ),
        Index(
            "ix_jobs_status_created",
            "status",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text(NOT_RUNNING_SQL),
        ),
        Index(
            "ix_jobs_queue_created",
            "queue",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text(NOT_RUNNING_SQL),
        ),
        Index(
            "ix_jobs_type_created",
            "type",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text(NOT_RUNNING_SQL),
        ),
        # A producer's own listing (auth on): without it, a key with few jobs scans them all.
        Index(
            "ix_jobs_owner_created",
            "owner",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text(f"owner IS NOT NULL AND {NOT_RUNNING_SQL}"),
        ),
        # Queue stats over the non-finished rows only: an index-only scan of an index that
        # B-tree deduplication keeps small (few distinct keys).
        Index(
            "ix_jobs_open",
            "queue",
            "status",
            postgresql_where=text(OPEN_NOT_RUNNING_SQL),
        ),
        # Listing a queue's jobs in one open status ("dead in q"), in order, however rare.
        Index(
            "ix_jobs_open_created",
            "queue",
            "status",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text(OPEN_NOT_RUNNING_SQL),
        ),
        # Maintenance: promotion, re-dispatch, lease expiry. Each worker polls for its own
        # queues, so the queue leads: another queue's backlog is never walked.
        Index(
            "ix_jobs_scheduled_due",
            "queue",
            "run_at",
            postgresql_where=text(_status_is(JobStatus.SCHEDULED)),
        ),
        Index(
            "ix_jobs_retrying_due",
            "queue",
            "next_attempt_at",
            postgresql_where=text(_status_is(JobStatus.RETRYING)),
        ),
        # Per queue and priority band (one stream per band and partition), oldest first.
        Index(
            "ix_jobs_undispatched",
            "queue",
            text(PRIORITY_SIGN_SQL),
            "enqueued_at",
            "id",
            postgresql_where=text(f"{_status_is(JobStatus.QUEUED)} AND dispatched_at IS NULL"),
        ),
        # Lease expiry, and every read of the running rows (listings, counts, limits).
        Index(
            "ix_jobs_lease",
            "lease_expires_at",
            postgresql_where=text(RUNNING_SQL),
        ),
        Index(
            "ix_jobs_dlq",
            text("finished_at DESC"),
            text("id DESC"),
            postgresql_where=text(f"{_status_is(JobStatus.DEAD)} AND dlq_removed_at IS NULL"),
        ),
        # One job per (schedule, slot): the key that makes each due slot run exactly once.
        Index(
            "uq_jobs_schedule_slot",
            "schedule",
            "scheduled_for",
            unique=True,
            postgresql_where=text("schedule IS NOT NULL AND scheduled_for IS NOT NULL"),
        ),
        # One waiting job per (scope, type, unique_key): the arbiter of concurrent submissions.
        Index(
            "uq_jobs_unique_waiting",
            "idempotency_scope",
            "type",
            "unique_key",
            unique=True,
            postgresql_where=text("unique_until IS NOT NULL"),
        ),
        # Retention: the expired rows of each (status, type), oldest first, found directly.
        Index(
            "ix_jobs_finished",
            "status",
            "type",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
        # Completion callbacks due for delivery.
        Index(
            "ix_jobs_callback_due",
            "callback_next_at",
            postgresql_where=text("callback_status = 'pending'"),
        ),
        # Queue stats: dead jobs taken out of the DLQ are subtracted from the dead count.
        Index(
            "ix_jobs_dlq_removed",
            "queue",
            postgresql_where=text("status = 'dead' AND dlq_removed_at IS NOT NULL"),
        ),
    )


class JobEventRow(Base):
    """Append-only history of every transition, written in the transition's own statement.

    No foreign key to ``jobs`` (ADR 0027): the statement that writes an event holds its job's
    row, so the key's per-row check added nothing but cost; retention deletes a job's events
    with the job (app/jobs/retention.py)."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    event: Mapped[str] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(Text, nullable=True)
    actor: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index("ix_job_events_job", "job_id", "id"),)


class WorkerRow(Base):
    """Live workers, refreshed by each worker's heartbeat."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list[str]] = mapped_column(ARRAY(Text))
    concurrency: Mapped[int] = mapped_column(Integer)
    in_flight: Mapped[int] = mapped_column(Integer, server_default="0")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_seen_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class StateRow(Base):
    """Small facts Conveyor must remember across Redis losses (e.g. the Redis data epoch)."""

    __tablename__ = "conveyor_state"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class AlertStateRow(Base):
    """Whether an alert (``kind`` for ``queue``) is firing: the one process whose statement
    turns ``firing`` on sends the alert (app/observe/alerts.py)."""

    __tablename__ = "alert_states"

    kind: Mapped[str] = mapped_column(Text, primary_key=True)
    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    firing: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    value: Mapped[float | None] = mapped_column(Float)
    changed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ScheduleRow(Base):
    """A periodic job: every due slot of ``cron`` in ``timezone`` makes one job."""

    __tablename__ = "schedules"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    cron: Mapped[str] = mapped_column(Text)
    timezone: Mapped[str] = mapped_column(Text, server_default="UTC")
    type: Mapped[str] = mapped_column(Text)
    payload: Mapped[Json] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    queue: Mapped[str] = mapped_column(Text, server_default="default")
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    missed: Mapped[str] = mapped_column(Text, server_default="skip")
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(Text, server_default="api")
    declared_hash: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint("missed IN ('skip', 'run_once')", name="missed_valid"),
        CheckConstraint("source IN ('api', 'code')", name="source_valid"),
        CheckConstraint("enabled = (next_run_at IS NOT NULL)", name="next_run_iff_enabled"),
        Index("ix_schedules_due", "next_run_at", postgresql_where=text("enabled")),
    )


class FlowControlRow(Base):
    """Flow control of one queue or job type (``scope``): a queue's pause, limits set over
    HTTP (``limits_set``; they replace a type's declared limits), and the state of the token
    bucket of its rate limit, which the claims of every worker share."""

    __tablename__ = "flow_controls"

    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text, primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    limits_set: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    concurrency: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rate_count: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rate_period: Mapped[int | None] = mapped_column(Integer, nullable=True)
    burst: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tokens: Mapped[float | None] = mapped_column(Float, nullable=True)
    refilled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        CheckConstraint("scope IN ('queue', 'type')", name="scope_valid"),
        CheckConstraint("scope = 'queue' OR NOT paused", name="only_queues_pause"),
        CheckConstraint("concurrency IS NULL OR concurrency >= 1", name="concurrency_valid"),
        CheckConstraint(
            "(rate_count IS NULL) = (rate_period IS NULL)"
            " AND (rate_count IS NULL OR rate_count >= 1)"
            " AND (rate_period IS NULL OR rate_period IN (1, 60, 3600))",
            name="rate_valid",
        ),
        CheckConstraint(
            "burst IS NULL OR (burst >= 1 AND rate_count IS NOT NULL)", name="burst_valid"
        ),
    )
