"""Every metric family Conveyor exports, in one place: name, help text, labels, buckets.

The counters and histograms here are aggregated across processes (see :mod:`app.observe.tally`);
the gauges come from the scrape-time snapshot (:mod:`app.observe.snapshot`). Label values are
bounded: queue names, registered job types, route templates, fixed reasons; never job ids.
"""

from __future__ import annotations

from dataclasses import dataclass

# 1 ms .. 1 h (decision 0018): queue wait, run time and end-to-end share them.
JOB_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
)
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

JOB = ("queue", "type")


@dataclass(frozen=True, slots=True)
class Family:
    name: str  # without the conveyor_ prefix and, for counters, without _total
    help: str
    labels: tuple[str, ...]
    buckets: tuple[float, ...] = ()  # a histogram when not empty


def _c(name: str, help: str, labels: tuple[str, ...] = JOB) -> Family:
    return Family(name, help, labels)


SUBMITTED = _c("jobs_submitted", "Jobs created by a submission (POST /v1/jobs, batches)")
STARTED = _c("jobs_started", "Attempts started (a worker claimed the job)")
SUCCEEDED = _c("jobs_succeeded", "Jobs that succeeded")
FAILED = _c(
    "job_attempts_failed",
    "Attempts that failed, by reason: error, timeout, worker_lost, fenced (the outcome of a"
    " stale attempt, discarded because a newer attempt, a cancel or a replay won)",
    (*JOB, "reason"),
)
RETRIED = _c("jobs_retried", "Failed attempts followed by a retry (the job went retrying)")
DEAD = _c("jobs_dead", "Jobs that went dead (entered the dead-letter queue)")
REPLAYED = _c("jobs_replayed", "Dead jobs replayed from the dead-letter queue")
CANCELLED = _c("jobs_cancelled", "Jobs cancelled")
RECLAIMED = _c("jobs_reclaimed", "Attempts of lost workers reclaimed (lease lapsed)")
HANDED_BACK = _c(
    "jobs_handed_back",
    "Attempts handed back without counting (worker shutdown, unknown job type)",
)
QUEUE_WAIT = Family(
    "job_queue_wait_seconds",
    "From the job entering its queue (submitted, due, retried) to an attempt starting",
    JOB,
    JOB_BUCKETS,
)
RUN_TIME = Family("job_run_seconds", "Run time of an attempt, by its worker", JOB, JOB_BUCKETS)
END_TO_END = Family(
    "job_end_to_end_seconds",
    "From submission to the terminal state (succeeded or dead)",
    JOB,
    JOB_BUCKETS,
)
HTTP_REQUESTS = _c(
    "http_requests",
    "API requests by route template, method and status class",
    ("route", "method", "status"),
)
HTTP_LATENCY = Family(
    "http_request_duration_seconds",
    "API request latency by route template",
    ("route", "method"),
    HTTP_BUCKETS,
)
HTTP_RATE_LIMITED = _c("http_rate_limited", "API requests refused with 429", ("route",))
HTTP_BODY_REJECTED = _c(
    "http_body_rejected",
    "API requests whose body was refused (413 too large, 415 media type)",
    ("route", "status"),
)
POOL_WAIT = Family(
    "db_pool_wait_seconds",
    "Time an API submission waited for a Postgres connection",
    ("pool",),
    HTTP_BUCKETS,
)
POOL_TIMEOUTS = _c(
    "db_pool_timeouts", "Submissions that found no Postgres connection in time", ("pool",)
)

AGGREGATED: tuple[Family, ...] = (
    SUBMITTED,
    STARTED,
    SUCCEEDED,
    FAILED,
    RETRIED,
    DEAD,
    REPLAYED,
    CANCELLED,
    RECLAIMED,
    HANDED_BACK,
    QUEUE_WAIT,
    RUN_TIME,
    END_TO_END,
    HTTP_REQUESTS,
    HTTP_LATENCY,
    HTTP_RATE_LIMITED,
    HTTP_BODY_REJECTED,
    POOL_WAIT,
    POOL_TIMEOUTS,
)
BY_NAME = {f.name: f for f in AGGREGATED}
