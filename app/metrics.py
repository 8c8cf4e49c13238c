"""Prometheus metrics, read from Postgres at scrape time.

Every figure comes from the database, so each API process (``conveyor api --workers N``) gives
the same answer; nothing is counted per process.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest


def render_metrics(counts: dict[str, dict[str, int]]) -> tuple[bytes, str]:
    registry = CollectorRegistry()
    jobs = Gauge(
        "conveyor_jobs",
        "Unfinished jobs, and dead jobs in the dead-letter queue, by queue and status",
        ["queue", "status"],
        registry=registry,
    )
    for queue, by_status in counts.items():
        for status, n in by_status.items():
            jobs.labels(queue=queue, status=status).set(n)
    return generate_latest(registry), CONTENT_TYPE_LATEST
