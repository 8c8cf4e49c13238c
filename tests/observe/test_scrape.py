"""The scrape: tallies of several processes add up in Redis, histograms aggregate bucket by
bucket, the Postgres snapshot is shared by concurrent scrapers, and the API's own HTTP
metrics (route templates, 429s) count every request."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from app.logs import JsonFormatter
from app.main import create_app
from app.observe import families as f
from app.observe.exposition import render
from app.observe.snapshot import Snapshot
from app.observe.tally import Tally
from app.settings import Settings
from app.streams import tallies
from app.streams.client import StreamClient
from app.streams.connection import create_redis
from app.streams.keys import Keys
from tests.conftest import Backends, make_settings
from tests.observe.test_workload import Samples, scrape

HEADERS = {"X-Requested-With": "test"}


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=HEADERS
        ) as client:
            yield app, client


def parse(body: bytes) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


async def test_two_processes_tallies_add_up_bucket_by_bucket(settings: Settings) -> None:
    stream = StreamClient(
        create_redis(settings), Keys(settings.redis_prefix), maxlen=settings.stream_maxlen
    )
    one, two = Tally(), Tally()  # two processes
    labels = ("q", "demo.echo")
    try:
        one.start(stream)
        two.start(stream)
        one.count(f.SUCCEEDED, labels, 3)
        two.count(f.SUCCEEDED, labels, 4)
        one.observe(f.RUN_TIME, labels, 0.0005)  # first bucket (le 0.001)
        two.observe(f.RUN_TIME, labels, 0.3)  # le 0.5
        two.observe(f.RUN_TIME, labels, 5000.0)  # over 1 h: +Inf only
        await one.stop()
        await two.stop()
        samples = parse(render(await tallies.read(stream), Snapshot(), 0.0)[0])
    finally:
        await stream.redis.delete(stream.keys.metrics)
        await stream.close()
    job = (("queue", "q"), ("type", "demo.echo"))
    assert samples[("conveyor_jobs_succeeded_total", job)] == 7

    def bucket(le: str) -> float:
        return samples[("conveyor_job_run_seconds_bucket", (("le", le), *job))]

    assert bucket("0.001") == 1 and bucket("0.25") == 1 and bucket("0.5") == 2
    assert bucket("3600.0") == 2 and bucket("+Inf") == 3
    assert samples[("conveyor_job_run_seconds_count", job)] == 3
    assert abs(samples[("conveyor_job_run_seconds_sum", job)] - 5000.3005) < 1e-6


async def test_a_tally_keeps_what_redis_did_not_take(backends: Backends) -> None:
    settings = make_settings(backends, redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5)
    stream = StreamClient(
        create_redis(settings), Keys(settings.redis_prefix), maxlen=settings.stream_maxlen
    )
    tally = Tally()
    tally.start(stream)
    tally.count(f.SUBMITTED, ("q", "t"), 2)
    await tally.stop()  # logged, not raised
    assert sum(tally.counts.values()) == 2 and not tally.totals
    await stream.close()


async def test_concurrent_scrapes_share_one_snapshot(backends: Backends) -> None:
    settings = make_settings(backends, metrics_snapshot_seconds=60)
    async with served(settings) as (app, client):
        responses = await asyncio.gather(*(client.get("/metrics") for _ in range(20)))
        assert all(r.status_code == 200 for r in responses)
        assert app.state.conveyor.snapshots.refreshes == 1


async def test_http_metrics_count_refusals_by_route_template(backends: Backends) -> None:
    settings = make_settings(backends, rate_limit_per_second=0.01, rate_limit_burst=2)
    async with served(settings) as (_, client):
        statuses = [(await client.get("/v1/queues")).status_code for _ in range(5)]
        assert statuses.count(429) == 3
        assert (await client.get("/no/such/path")).status_code == 404
        samples = await scrape(client)
    route = (("route", "/v1/queues"),)
    assert samples[("conveyor_http_rate_limited_total", route)] == 3
    by_class = (("method", "GET"), ("route", "/v1/queues"), ("status", "4xx"))
    assert samples[("conveyor_http_requests_total", by_class)] == 3
    unmatched = (("method", "GET"), ("route", "<unmatched>"), ("status", "4xx"))
    assert samples[("conveyor_http_requests_total", unmatched)] == 1
    latency = (("method", "GET"), ("route", "/v1/queues"))
    assert samples[("conveyor_http_request_duration_seconds_count", latency)] == 5


def test_json_log_lines_carry_the_fields_and_nothing_else() -> None:
    record = logging.LogRecord("conveyor.jobs", logging.INFO, __file__, 1, "job %s", ("x",), None)
    extra = {"job_id": "j1", "type": "demo.echo", "queue": "q", "attempt": 2, "worker": "w"}
    record.__dict__.update(extra, duration=0.25, payload={"secret": "s3cret"}, result="r3sult")
    line = json.loads(JsonFormatter().format(record))
    assert {k: line[k] for k in extra} == extra and line["duration"] == 0.25
    assert line["message"] == "job x" and line["level"] == "INFO" and "ts" in line
    assert "s3cret" not in json.dumps(line) and "r3sult" not in json.dumps(line)
