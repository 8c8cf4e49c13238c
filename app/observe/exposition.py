"""The Prometheus text of ``GET /metrics``: the shared counters and histograms read from Redis
(every process's counts), plus the gauges of the cached snapshot (:mod:`app.observe.snapshot`).
Also a worker's own process metrics (``conveyor worker --metrics-port``).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from app.errors import Unavailable
from app.observe import families
from app.observe.families import Family
from app.observe.snapshot import Snapshot, Snapshots
from app.observe.tally import SEP, TALLY
from app.streams import tallies
from app.streams.client import StreamClient
from app.streams.keys import BANDS

log = logging.getLogger(__name__)

STATUSES = ("queued", "scheduled", "retrying", "running", "dead")
BAND_NAMES = {0: "high", 1: "default", 2: "low"}
assert set(BAND_NAMES) == set(BANDS)


def _parse(
    values: Mapping[str, str | int | float],
) -> dict[str, dict[tuple[str, ...], dict[str, float]]]:
    """``{family: {labels: {part: value}}}``; ``part`` is "" for a counter, ``b<i>`` or
    ``sum`` for a histogram."""
    out: dict[str, dict[tuple[str, ...], dict[str, float]]] = defaultdict(dict)
    for name, value in values.items():
        parts = name.split(SEP)
        family = families.BY_NAME.get(parts[0])
        if family is None:
            continue
        n = len(family.labels)
        labels, rest = tuple(parts[1 : 1 + n]), parts[1 + n :]
        if len(labels) != n or len(rest) != (1 if family.buckets else 0):
            continue
        out[family.name].setdefault(labels, {})[rest[0] if rest else ""] = float(value)
    return out


def aggregated(values: Mapping[str, str | int | float]) -> Iterator[Metric]:
    """The counter and histogram families from the tally fields (every family, even empty)."""
    parsed = _parse(values)
    for family in families.AGGREGATED:
        series = parsed.get(family.name, {})
        if family.buckets:
            yield _histogram(family, series)
        else:
            counter = CounterMetricFamily(
                f"conveyor_{family.name}", family.help, labels=family.labels
            )
            for labels, parts in sorted(series.items()):
                counter.add_metric(labels, parts.get("", 0.0))
            yield counter


def _histogram(family: Family, series: dict[tuple[str, ...], dict[str, float]]) -> Metric:
    hist = HistogramMetricFamily(f"conveyor_{family.name}", family.help, labels=family.labels)
    bounds = [*family.buckets, math.inf]
    for labels, parts in sorted(series.items()):
        cumulative = 0.0
        buckets = []
        for i, bound in enumerate(bounds):
            cumulative += parts.get(f"b{i}", 0.0)
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        hist.add_metric(list(labels), buckets, parts.get("sum", 0.0))
    return hist


def gauges(snap: Snapshot, snapshot_age: float) -> Iterator[Metric]:
    jobs = GaugeMetricFamily(
        "conveyor_jobs",
        "Unfinished jobs, and dead jobs in the dead-letter queue, by queue and status",
        labels=["queue", "status"],
    )
    oldest = _per_queue("queue_oldest_queued_age_seconds", "Age of the oldest queued job")
    undispatched = _per_queue(
        "queue_undispatched", "Queued jobs whose stream entry is not confirmed sent yet"
    )
    undispatched_age = _per_queue(
        "queue_undispatched_oldest_age_seconds", "Age of the oldest undispatched queued job"
    )
    for queue in snap.queues:
        counts = snap.counts.get(queue, {})
        for status in STATUSES:
            jobs.add_metric([queue, status], counts.get(status, 0))
        oldest.add_metric([queue], snap.oldest_queued.get(queue, 0.0))
        n, age = snap.undispatched.get(queue, (0, 0.0))
        undispatched.add_metric([queue], n)
        undispatched_age.add_metric([queue], age)
    yield from (jobs, oldest, undispatched, undispatched_age)
    yield from _stream_gauges(snap)
    yield GaugeMetricFamily(
        "conveyor_workers_live", "Workers with a recent heartbeat", snap.workers
    )
    yield GaugeMetricFamily(
        "conveyor_worker_free_slots",
        "Free slots (concurrency - in flight) of live workers",
        snap.free_slots,
    )
    yield GaugeMetricFamily(
        "conveyor_metrics_snapshot_age_seconds",
        "Age of the cached snapshot behind the gauges",
        snapshot_age,
    )


def _per_queue(name: str, help: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"conveyor_{name}", help, labels=["queue"])


def _stream_gauges(snap: Snapshot) -> Iterator[Metric]:
    labels = ["queue", "band"]
    length = GaugeMetricFamily(
        "conveyor_stream_length", "Entries in the band's streams", labels=labels
    )
    pending = GaugeMetricFamily(
        "conveyor_stream_pending", "Entries delivered and not acknowledged yet", labels=labels
    )
    lag = GaugeMetricFamily(
        "conveyor_stream_lag", "Entries not delivered to the consumer group yet", labels=labels
    )
    for (queue, band), s in sorted(snap.streams.items()):
        values = [queue, BAND_NAMES[band]]
        length.add_metric(values, s.length)
        pending.add_metric(values, s.pending)
        if s.lag is not None:
            lag.add_metric(values, s.lag)
    yield from (length, pending, lag)


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def render(tallies: Mapping[str, str], snap: Snapshot, snapshot_age: float) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed([*aggregated(tallies), *gauges(snap, snapshot_age)]))
    return generate_latest(registry), CONTENT_TYPE_LATEST


async def scrape(stream: StreamClient, snapshots: Snapshots) -> tuple[bytes, str]:
    """Send this process's own unsent counts, then read everyone's; gauges from the
    snapshot. Redis or Postgres down: :class:`Unavailable` (a 503; never counters that
    look reset)."""
    try:
        await TALLY.flush()
        values = await tallies.read(stream)
        snap = await snapshots.get()
    except Exception as exc:
        log.warning("metrics scrape failed: %s", type(exc).__name__)
        raise Unavailable("metrics are unavailable: Postgres or Redis does not answer") from exc
    return render(values, snap, snapshots.age() or 0.0)


class _ProcessTotals(Collector):
    """What this process counted since it started (sent or not)."""

    def collect(self) -> Iterator[Metric]:
        values: defaultdict[str, float] = defaultdict(float)
        for source in (TALLY.totals, TALLY.counts, TALLY.sums):
            for k, v in source.items():
                values[k] += v
        return aggregated(values)


def serve_process_metrics(port: int, host: str) -> None:
    """A worker's own metrics on ``host:port``: the process collectors and its own counts."""
    REGISTRY.register(_ProcessTotals())
    start_http_server(port, addr=host)
