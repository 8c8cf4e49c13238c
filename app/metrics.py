"""Prometheus metrics. Queue depths are read from Postgres at scrape time."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

PROCESS_REGISTRY = CollectorRegistry()
SUBMITTED = Counter(
    "conveyor_jobs_submitted",
    "Jobs accepted by this API process",
    ["queue"],
    registry=PROCESS_REGISTRY,
)


def render_metrics(counts: dict[str, dict[str, int]]) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    jobs = Gauge(
        "conveyor_jobs",
        "Unfinished and dead jobs by queue and status",
        ["queue", "status"],
        registry=registry,
    )
    for queue, by_status in counts.items():
        for status, n in by_status.items():
            jobs.labels(queue=queue, status=status).set(n)
    return generate_latest(registry) + generate_latest(PROCESS_REGISTRY), CONTENT_TYPE_LATEST
