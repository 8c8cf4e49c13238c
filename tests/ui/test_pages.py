"""The dashboard's pages and parts over HTTP (in-process): what they load, who may read and
act, filters and pages, escaping, and that live parts come from the cached snapshot. The
browser drives them in test_browser.py."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from markupsafe import escape

from app.main import create_app
from app.observe import history
from app.observe.history import Totals
from app.settings import Settings
from app.streams import tallies
from tests.conftest import (
    CLIENT_HEADERS,
    Backends,
    make_settings,
    submit,
    wait_for_status,
    wait_until,
)
from tests.support.processes import Spawner

UI = Path(__file__).resolve().parents[2] / "app" / "ui"
PAGES = [
    "/ui",
    "/ui/jobs",
    "/ui/workers",
    "/ui/schedules",
    "/ui/jobs/0193a6f2-7c1e-7b7a-9f00-3d2a1c5e8b40",
]  # fixed: xdist workers must collect alike
ADMIN, PRODUCER = "ad-dashboard-secret", "pr-dashboard-secret"


@asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://conveyor", headers=CLIENT_HEADERS
        ) as client:
            yield app, client


@pytest.mark.parametrize("path", PAGES)
async def test_pages_are_open_html_that_load_their_parts(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert '<script src="/ui/static/htmx.min.js"' in page
    assert '<script src="/ui/static/ui.js"' in page
    assert 'id="api-key"' in page  # the page asks for the key
    if path != "/ui/jobs":  # the jobs page lists once its filter is given (or empty)
        assert 'hx-get="/ui/part/' in page


async def test_static_files_are_served_offline_and_htmx_keeps_its_license(
    client: httpx.AsyncClient,
) -> None:
    htmx = await client.get("/ui/static/htmx.min.js")
    assert htmx.status_code == 200
    assert htmx.text.startswith("/*! htmx 2.")
    assert "0BSD" in htmx.text.splitlines()[0]
    license_text = await client.get("/ui/static/htmx.LICENSE")
    assert license_text.status_code == 200 and "Zero-Clause BSD" in license_text.text
    for name in ("ui.js", "ui.css"):
        assert (await client.get(f"/ui/static/{name}")).status_code == 200


async def test_nothing_loads_from_outside_and_no_script_writes_markup(
    client: httpx.AsyncClient,
) -> None:
    pages = [(await client.get(p)).text for p in PAGES]
    script = (UI / "static" / "ui.js").read_text()
    templates = [p.read_text() for p in (UI / "templates").glob("*.html")]
    for text in [*pages, *templates, script, (UI / "static" / "ui.css").read_text()]:
        assert not re.search(r"""(src|href|action)\s*=\s*["']?(https?:)?//""", text)
        assert "@import" not in text and "url(" not in text
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", script)
    assert "localStorage" not in script and "sessionStorage" in script  # the tab only
    for template in templates:  # every value is autoescaped: nothing marked safe
        assert "|safe" not in template.replace(" ", "") and "autoescape false" not in template
    assert '"allowEval": false' in pages[0]  # htmx runs no code from attributes


async def test_parts_need_a_key_and_actions_an_admin_key(backends: Backends, queue: str) -> None:
    settings = make_settings(backends, api_keys=f"admin:{ADMIN},producer:{PRODUCER}")
    async with served(settings) as (_, client):
        admin, producer = {"X-API-Key": ADMIN}, {"X-API-Key": PRODUCER}
        assert (await client.get("/ui")).status_code == 200  # the page: open, no data
        for part in ("/ui/part/overview", "/ui/part/jobs", "/ui/part/workers"):
            assert (await client.get(part)).status_code == 401
            assert (await client.get(part, headers={"X-API-Key": "wrong"})).status_code == 401
            assert (await client.get(part, headers=producer)).status_code == 200
        pause = f"/ui/part/queues/{queue}/pause"
        assert (await client.post(pause)).status_code == 401
        assert (await client.post(pause, headers=producer)).status_code == 403
        done = await client.post(pause, headers=admin)
        assert done.status_code == 200 and done.headers["HX-Trigger"] == "refresh"
        assert f"Queue {queue} paused" in done.text
        queues = (await client.get("/v1/queues", headers=admin)).json()["items"]
        assert any(q["queue"] == queue and q["paused"] for q in queues)
        schedules = await client.get("/ui/part/schedules", headers=producer)
        assert "shown with an admin key" in schedules.text

        # a producer sees its own jobs only, in the list and by id
        own = await client.post(
            "/v1/jobs", json={"type": "demo.echo", "queue": queue}, headers=producer
        )
        other = await client.post(
            "/v1/jobs", json={"type": "demo.echo", "queue": queue}, headers=admin
        )
        listed = (await client.get(f"/ui/part/jobs?queue={queue}", headers=producer)).text
        assert own.json()["id"] in listed and other.json()["id"] not in listed
        hidden = await client.get(f"/ui/part/jobs/{other.json()['id']}", headers=producer)
        assert hidden.status_code == 404


async def test_a_state_change_without_a_key_needs_the_ui_header(
    settings: Settings, queue: str
) -> None:
    """With auth off, a cross-site form cannot pause a queue: the gate wants a header that
    only a same-origin script (the page's htmx) sends."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://conveyor") as bare:
            refused = await bare.post(
                f"/ui/part/queues/{queue}/pause",
                content=b"",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert refused.status_code == 415
            ok = await bare.post(
                f"/ui/part/queues/{queue}/pause", headers={"X-Requested-With": "conveyor-ui"}
            )
            assert ok.status_code == 200


async def test_jobs_part_filters_pages_and_escapes(client: httpx.AsyncClient, queue: str) -> None:
    other = f"{queue}-other"
    hostile = "<b>&'\"x"
    ids = [
        (await submit(client, {"type": "demo.echo", "queue": queue, "delay_seconds": 3600}))["id"]
        for _ in range(55)
    ]
    elsewhere = await submit(client, {"type": "demo.echo", "queue": other, "delay_seconds": 60})
    scheduled = await submit(
        client,
        {"type": "demo.sleep", "queue": queue, "delay_seconds": 3600, "payload": {"seconds": 1}},
    )

    first = (await client.get(f"/ui/part/jobs?queue={queue}")).text
    shown = re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', first)
    assert len(shown) == 50 and elsewhere["id"] not in first
    assert shown[0] == scheduled["id"]  # newest first
    cursor = re.search(r'id="next-page" href="/ui/jobs\?([^"]+)"', first)
    assert cursor is not None
    second = (await client.get(f"/ui/part/jobs?{cursor.group(1).replace('&amp;', '&')}")).text
    rest = re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', second)
    assert set(shown) | set(rest) == {*ids, scheduled["id"]} and not set(shown) & set(rest)
    assert 'id="next-page"' not in second

    by_type = (await client.get(f"/ui/part/jobs?queue={queue}&type=demo.sleep")).text
    assert re.findall(r'href="/ui/jobs/([0-9a-f-]{36})"', by_type) == [scheduled["id"]]
    after = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3600))
    later = (await client.get(f"/ui/part/jobs?queue={queue}&after={after}")).text
    assert "no jobs match" in later

    for bad in ("status=bogus", "after=yesterday", f"queue={hostile}", "cursor=xyz"):
        response = await client.get(f"/ui/part/jobs?{bad}")
        assert response.status_code == 422, bad
    found = await client.get(f"/ui/jobs?id=%20{scheduled['id']}%20", follow_redirects=False)
    assert found.status_code == 303
    assert found.headers["location"] == f"/ui/jobs/{scheduled['id']}"
    not_an_id = await client.get("/ui/jobs", params={"id": hostile})
    assert not_an_id.status_code == 422
    assert str(escape(hostile)) in not_an_id.text and hostile not in not_an_id.text


async def test_job_part_shows_a_hostile_error_as_text(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    hostile = '<img src=x id="pwned" onerror="document.title=1">'
    job = await submit(
        client,
        {"type": "demo.fail", "queue": queue, "max_attempts": 1, "payload": {"message": hostile}},
    )
    await wait_for_status(client, job["id"], {"dead"}, timeout=60)
    part = (await client.get(f"/ui/part/jobs/{job['id']}")).text
    assert "<img" not in part
    assert str(escape(hostile)) in part  # the error, as text
    assert 'id="replay-job"' in part and 'id="remove-job"' in part
    assert ">claimed<" in part and ">dead<" in part  # the timeline
    assert 'id="cancel-job"' not in part  # a dead job cannot be cancelled
    assert 'hx-trigger="every' not in part  # a finished job is not polled


async def test_dlq_actions_take_json_and_refuse_what_selects_nothing(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    spawn.worker([queue])
    gate = tmp_path / "gate"
    body = {"type": "test.gate", "queue": queue, "max_attempts": 1}
    jobs = [await submit(client, {**body, "payload": {"path": str(gate)}}) for _ in range(3)]
    for job in jobs:
        await wait_for_status(client, job["id"], {"dead"}, timeout=60)
    listed = (await client.get(f"/ui/part/jobs?queue={queue}&status=dead")).text
    assert 'hx-confirm="Replay all 3 dead jobs matching this filter?"' in listed

    replay = "/ui/part/dlq/replay"
    form = await client.post(
        replay,
        content=f"ids={jobs[0]['id']}".encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status_code == 415  # bodies are JSON, as on /v1
    for bad in ({}, {"ids": ["nope"]}, {"all": "everything"}, {"all": "matching", "after": "x"}):
        assert (await client.post(replay, json=bad)).status_code == 422, bad

    removed = await client.post(f"/ui/part/dlq/{jobs[0]['id']}/remove", json={})
    assert removed.status_code == 200 and "Removed job" in removed.text
    again = await client.post(f"/ui/part/dlq/{jobs[0]['id']}/remove", json={})
    assert again.status_code == 404
    gate.touch()
    picked = await client.post(replay, json={"ids": [jobs[0]["id"], jobs[1]["id"]]})
    assert "Replayed 1 of 2 selected jobs." in picked.text  # the removed one is not in the DLQ
    rest = await client.post(replay, json={"all": "matching", "queue": queue})
    assert "Replayed 1 dead job matching the filter." in rest.text
    for job in jobs[1:]:
        await wait_for_status(client, job["id"], {"succeeded"}, timeout=60)
    assert (await client.get(f"/v1/jobs/{jobs[0]['id']}")).json()["status"] == "dead"


async def test_live_parts_share_one_snapshot(backends: Backends) -> None:
    settings = make_settings(backends, metrics_snapshot_seconds=60)
    async with served(settings) as (app, client):
        responses = await asyncio.gather(
            *(client.get(p) for p in ["/ui/part/overview", "/ui/part/workers"] * 10)
        )
        assert all(r.status_code == 200 for r in responses)
        assert app.state.conveyor.snapshots.refreshes == 1


def test_chart_points_are_differences_between_samples() -> None:
    zero = (0.0,) * len(history.WAIT_BOUNDS)
    waits = list(zero)
    waits[5] = 100.0  # 100 jobs waited 25..50 ms
    samples = [
        Totals(at=60.0, succeeded=10, failed=1, wait=zero),
        Totals(at=120.0, succeeded=70, failed=4, wait=tuple(waits)),
        Totals(at=240.0, succeeded=70, failed=4, wait=tuple(waits)),  # nothing in 2 minutes
    ]
    now = Totals(at=270.0, succeeded=100, failed=4, wait=tuple(waits))
    points = history.points(samples, now)
    assert [(p.at, p.succeeded, p.failed) for p in points] == [
        (120.0, 60.0, 3.0),
        (240.0, 0.0, 0.0),
        (270.0, 60.0, 0.0),  # 30 in the last half minute
    ]
    assert points[0].wait_p50 == pytest.approx(0.0375)
    assert points[0].wait_p99 == pytest.approx(0.025 + 0.025 * 0.99)
    assert points[1].wait_p50 is None
    assert Totals.decode(samples[1].encode()) == samples[1]
    assert Totals.decode("not json") is None


async def test_history_keeps_the_first_sample_of_each_minute(
    settings: Settings, spawn: Spawner, queue: str
) -> None:
    """Succeeded jobs show in the throughput, from the tallies every process adds to."""
    spawn.worker([queue])
    async with served(settings) as (app, client):
        stream = app.state.conveyor.stream
        for _ in range(3):
            job = await submit(client, {"type": "demo.echo", "queue": queue})
        await wait_for_status(client, job["id"], {"succeeded"}, timeout=60)

        async def counted() -> bool:
            return history.totals(await tallies.read(stream), 0).succeeded >= 3

        await wait_until(counted, timeout=30)
        now = (time.time() // 60) * 60 + 20  # well inside one minute
        minute = int(now // 60)
        zero = history.totals({}, now - 60)
        await stream.redis.set(stream.keys.history(minute - 1), zero.encode())
        points = await history.record_and_read(stream, now)
        assert [p.succeeded for p in points] == [3.0]  # 3 in the minute since "zero"
        again = await history.record_and_read(stream, now + 1)
        assert again == points  # the minute's first sample stays; no live point yet
        later = await history.record_and_read(stream, now + 30)
        assert later[-1].at == now + 30 and later[-1].succeeded == 0.0
