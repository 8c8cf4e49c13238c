"""The dashboard at /ui: a self-contained page that uses the public API and renders data as text."""

from __future__ import annotations

import re
import shutil
import subprocess
from html import escape
from pathlib import Path

import httpx
import pytest

from tests.conftest import wait_for_status
from tests.support.processes import Spawner

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


async def test_ui_is_html_that_calls_the_api(client: httpx.AsyncClient) -> None:
    response = await client.get("/ui")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for endpoint in (
        "/v1/queues",
        "/v1/workers",
        "/v1/jobs?limit=50",
        "&status=",
        "/v1/dlq",
        "/replay",
        "/events",
        "/readyz",
        "/v1/schedules",
        '"trigger"',
        "/cancel",
    ):
        assert endpoint in page, endpoint
    assert "X-API-Key" in page and "localStorage" in page
    assert "setInterval" in page and "2000" in page


async def test_ui_loads_nothing_from_outside_and_never_sets_inner_html(
    client: httpx.AsyncClient,
) -> None:
    page = (await client.get("/ui")).text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page
    assert not re.search(r"\.(inner|outer)HTML\s*=|insertAdjacentHTML|document\.write", page)


def _browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def _render(browser: str, url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran, from a headless browser."""
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu"]
    args += ["--disable-background-networking", f"--user-data-dir={profile}"]
    args += ["--virtual-time-budget=8000", "--dump-dom", url]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(_browser() is None, reason="no Chromium on this machine to render /ui")
async def test_browser_renders_queues_and_a_hostile_error_as_text(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    _, url = spawn.api()
    spawn.worker([queue])
    hostile = '<img src=x id="pwned" onerror="document.title=1">'
    job = (
        await client.post(
            "/v1/jobs",
            json={
                "type": "demo.fail",
                "queue": queue,
                "max_attempts": 1,
                "payload": {"message": hostile},
            },
        )
    ).json()
    await wait_for_status(client, job["id"], {"dead"}, timeout=60)

    dom = _render(_browser() or "", f"{url}/ui#job={job['id']}", tmp_path / "profile")

    queues_table = dom[dom.index('id="queues"') : dom.index('id="workers"')]
    assert f">{queue}<" in queues_table
    assert escape(hostile, quote=False) in dom  # the error message, shown as text
    assert "<img" not in dom  # and never parsed as markup
    assert job["id"] in dom  # the detail view of the job
    assert "claimed" in dom and "dead" in dom  # with its events


@pytest.mark.skipif(_browser() is None, reason="no Chromium on this machine to render /ui")
async def test_browser_shows_schedules_with_their_actions_and_a_cancel_button(
    client: httpx.AsyncClient, spawn: Spawner, queue: str, tmp_path: Path
) -> None:
    _, url = spawn.api()
    name = f"nightly-{queue}"
    created = await client.post(
        "/v1/schedules",
        json={"name": name, "cron": "0 3 * * *", "type": "demo.echo", "queue": queue},
    )
    assert created.status_code == 201, created.text
    waiting = await client.post(
        "/v1/jobs", json={"type": "demo.echo", "queue": queue, "delay_seconds": 3600}
    )
    job = waiting.json()

    dom = _render(_browser() or "", f"{url}/ui#job={job['id']}", tmp_path / "profile")

    schedules = dom[dom.index('id="schedules"') : dom.index('id="jobs"')]
    assert f">{name}<" in schedules and ">0 3 * * *<" in schedules
    assert ">pause</button>" in schedules and ">trigger</button>" in schedules
    detail = dom[dom.index('id="detail"') :]
    assert 'id="cancel-job"' in detail and ">Cancel</button>" in detail
