"""A known workload through real API and worker processes; one scrape of the API (which runs
two processes) shows every outcome by its exact count, whichever process answers, and the
worker's JSON log lines parse and carry the transition fields (never the payload)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_until
from tests.support.processes import Proc, Spawner

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
NO_KEEPALIVE = httpx.Limits(max_keepalive_connections=0)  # each request: a new connection


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def mismatches(samples: Samples, expected: Mapping[tuple[str, Any], float]) -> dict[str, Any]:
    return {
        f"{name}{dict(labels)}": (samples.get((name, labels)), want)
        for (name, labels), want in expected.items()
        if samples.get((name, labels)) != want
    }


def json_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every line the process logged; each must be one JSON object."""
    lines = [line for line in proc.output().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


async def post(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await client.post("/v1/jobs", json=body)
    assert response.status_code in (200, 201, 202), response.text
    return str(response.json()["id"])


async def status_of(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200
    job: dict[str, Any] = response.json()
    return job


async def test_one_scrape_of_a_two_process_api_counts_every_outcome(
    spawn: Spawner, queue: str
) -> None:
    api, url = spawn.api(workers=2)
    worker = spawn.worker([queue], concurrency=4)
    canary = f"canary-{secrets.token_hex(8)}"
    async with httpx.AsyncClient(
        base_url=url, limits=NO_KEEPALIVE, timeout=15, headers={"X-Requested-With": "test"}
    ) as c:
        echo = [
            await post(c, {"type": "demo.echo", "queue": queue, "payload": {"secret": canary}})
            for _ in range(5)
        ]
        # more echo jobs until both API processes have taken submissions (their logs say so)
        while len({r["pid"] for r in json_lines(api) if r.get("event") == "submitted"}) < 2:
            assert len(echo) < 200, "every submission went to one API process"
            echo.append(await post(c, {"type": "demo.echo", "queue": queue}))
        flaky = await post(c, {"type": "demo.fail", "queue": queue, "payload": {"fail_times": 1}})
        doomed = await post(c, {"type": "test.permanent", "queue": queue})
        slow = await post(
            c,
            {
                "type": "demo.sleep",
                "queue": queue,
                "payload": {"seconds": 60},
                "timeout_seconds": 0.5,
                "max_attempts": 1,
            },
        )
        later = await post(c, {"type": "demo.echo", "queue": queue, "delay_seconds": 3600})
        assert (await c.post(f"/v1/jobs/{later}/cancel")).status_code == 200
        too_big = {"type": "demo.echo", "queue": queue, "payload": {"x": "y" * 300_000}}
        assert (await c.post("/v1/jobs", json=too_big)).status_code == 413

        async def dead(job_id: str, errors: int) -> bool:
            job = await status_of(c, job_id)
            return bool(job["status"] == "dead" and len(job["errors"]) == errors)

        await wait_until(lambda: dead(doomed, 1), timeout=60)
        assert (await c.post(f"/v1/dlq/{doomed}/replay")).status_code == 202
        await wait_until(lambda: dead(doomed, 2), timeout=60)
        await wait_until(lambda: dead(slow, 1), timeout=60)

        async def succeeded() -> bool:
            jobs = [await status_of(c, j) for j in [*echo, flaky]]
            return all(j["status"] == "succeeded" for j in jobs)

        await wait_until(succeeded, timeout=60)

        n = len(echo)
        expected = _expected(queue, n)
        # gauges (a snapshot, refreshed within seconds)
        expected[("conveyor_jobs", (("queue", queue), ("status", "dead")))] = 2
        expected[("conveyor_jobs", (("queue", queue), ("status", "queued")))] = 0

        async def exact() -> bool:
            return not mismatches(await scrape(c), expected)

        try:
            await wait_until(exact, timeout=60)
        finally:
            print(mismatches(await scrape(c), expected))
        for _ in range(8):  # whichever process answers, the whole total
            assert mismatches(await scrape(c), expected) == {}

    logged = json_lines(worker)
    assert canary not in worker.output() and canary not in api.output()
    done = [r for r in logged if r.get("event") == "succeeded" and r.get("job_id") == echo[0]]
    assert len(done) == 1, logged[-20:]
    line = done[0]
    assert line["type"] == "demo.echo" and line["queue"] == queue and line["attempt"] == 1
    assert line["level"] == "INFO" and line["worker"] and line["duration"] >= 0
    assert {r["event"] for r in logged if r.get("job_id") == flaky} >= {
        "started",
        "retrying",
        "succeeded",
    }


def _expected(queue: str, echo: int) -> dict[tuple[str, Any], float]:
    def job(t: str, **more: str) -> tuple[tuple[str, str], ...]:
        return tuple(sorted({"queue": queue, "type": t, **more}.items()))

    counters = {
        # (family, type, extra labels): count
        ("jobs_submitted", "demo.echo"): echo + 1,
        ("jobs_submitted", "demo.fail"): 1,
        ("jobs_submitted", "test.permanent"): 1,
        ("jobs_submitted", "demo.sleep"): 1,
        ("jobs_started", "demo.echo"): echo,
        ("jobs_started", "demo.fail"): 2,
        ("jobs_started", "test.permanent"): 2,
        ("jobs_started", "demo.sleep"): 1,
        ("jobs_succeeded", "demo.echo"): echo,
        ("jobs_succeeded", "demo.fail"): 1,
        ("jobs_retried", "demo.fail"): 1,
        ("jobs_dead", "test.permanent"): 2,
        ("jobs_dead", "demo.sleep"): 1,
        ("jobs_replayed", "test.permanent"): 1,
        ("jobs_cancelled", "demo.echo"): 1,
    }
    expected: dict[tuple[str, Any], float] = {
        (f"conveyor_{name}_total", job(t)): n for (name, t), n in counters.items()
    }
    for t, reason, n in [
        ("demo.fail", "error", 1),
        ("test.permanent", "error", 2),
        ("demo.sleep", "timeout", 1),
    ]:
        expected[("conveyor_job_attempts_failed_total", job(t, reason=reason))] = n
    for t, attempts, terminal in [
        ("demo.echo", echo, echo),
        ("demo.fail", 2, 1),
        ("test.permanent", 2, 2),
        ("demo.sleep", 1, 1),
    ]:
        expected[("conveyor_job_queue_wait_seconds_count", job(t))] = attempts
        expected[("conveyor_job_run_seconds_count", job(t))] = attempts
        expected[("conveyor_job_run_seconds_bucket", job(t, le="+Inf"))] = attempts
        expected[("conveyor_job_end_to_end_seconds_count", job(t))] = terminal
    # timed out after 0.5 s: in the (0.5, 1] bucket or just above, never at 60 s
    expected[("conveyor_job_run_seconds_bucket", job("demo.sleep", le="0.25"))] = 0
    expected[("conveyor_job_run_seconds_bucket", job("demo.sleep", le="5.0"))] = 1
    http = {
        ("/v1/jobs", "POST", "2xx"): echo + 4,
        ("/v1/jobs/{job_id}/cancel", "POST", "2xx"): 1,
        ("/v1/dlq/{job_id}/replay", "POST", "2xx"): 1,
        ("/v1/jobs", "POST", "4xx"): 1,
    }
    for (route, method, status), n in http.items():
        labels = (("method", method), ("route", route), ("status", status))
        expected[("conveyor_http_requests_total", labels)] = n
    expected[("conveyor_http_body_rejected_total", (("route", "/v1/jobs"), ("status", "413")))] = 1
    return expected
