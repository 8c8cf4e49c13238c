"""The dashboard driven in headless Chromium (Selenium with the system's chromedriver) against
real API and worker processes. Each step leaves a screenshot under
``test-artifacts/ui/`` (or ``$CONVEYOR_TEST_ARTIFACTS/ui/``), and no page may log a console
error (except the 401s of a page opened before its key was typed, which are checked)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoAlertPresentException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import CLIENT_HEADERS
from tests.support.processes import Spawner

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CONVEYOR_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "ui"
CHROMIUM = next(
    (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None
)
CHROMEDRIVER = shutil.which("chromedriver")
ADMIN = "ad-browser-secret"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="no Chromium and chromedriver on this machine (Debian: apt-get install chromium"
    " chromium-driver): the dashboard's browser tests need them",
)


class Page:
    """One browser tab on the dashboard of the API at ``base``."""

    def __init__(self, driver: webdriver.Chrome, base: str, name: str) -> None:
        self.driver = driver
        self.base = base
        self.name = name
        self.shots = 0

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def wait(self, what: Callable[[], Any], timeout: float = 60) -> Any:
        """Poll ``what`` until it returns something truthy (a page part loads every few s;
        an element that a refresh replaced meanwhile is looked up again)."""
        return WebDriverWait(
            self.driver,
            timeout,
            poll_frequency=0.2,
            ignored_exceptions=(StaleElementReferenceException,),
        ).until(lambda _: what())

    def text(self, css: str) -> str:
        """The element's text, read again if a refresh replaced it while it was read."""
        for _ in range(10):
            try:
                found = self.driver.find_elements(By.CSS_SELECTOR, css)
                return found[0].text if found else ""
            except StaleElementReferenceException:
                continue
        raise AssertionError(f"{css} kept being replaced")

    def click(self, css: str, by: str = By.CSS_SELECTOR) -> None:
        """Click it once found, again if a refresh replaced it before the click landed."""

        def clicked() -> bool:
            self.driver.find_element(by, css).click()
            return True

        self.wait(clicked)

    def confirm(self) -> str:
        """Accept the confirmation the click raised; its text."""

        def alert() -> Any:
            try:
                return self.driver.switch_to.alert
            except NoAlertPresentException:
                return None

        dialog = self.wait(alert, timeout=20)
        text = str(dialog.text)
        dialog.accept()
        return text

    def shot(self, step: str) -> Path:
        self.shots += 1
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{self.shots:02d}-{step}.png"
        self.driver.save_screenshot(str(path))
        return path

    def console_errors(self) -> list[str]:
        """The console's errors since the last call (reading the log empties it)."""
        entries: list[dict[str, Any]] = self.driver.get_log("browser")  # type: ignore[no-untyped-call]
        return [str(e["message"]) for e in entries if e["level"] == "SEVERE"]


@pytest.fixture
def page(request: pytest.FixtureRequest) -> Iterator[Callable[[str], Page]]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(arg)
    options.add_argument("--disable-dev-shm-usage")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    opened: list[Page] = []

    def make(base: str) -> Page:
        p = Page(driver, base, re.sub(r"\W+", "-", request.node.name).strip("-"))
        opened.append(p)
        return p

    try:
        yield make
        for p in opened:
            assert p.console_errors() == [], "the page logged console errors"
    finally:
        with contextlib.suppress(WebDriverException):  # a dead browser has no last screen
            for p in opened:
                p.shot("last")
        driver.quit()


def _submit(api: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/v1/jobs", json=body)
    assert response.status_code in (200, 202), response.text
    job: dict[str, Any] = response.json()
    return job


def _status(api: httpx.Client, job_id: str, wanted: set[str], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = str(api.get(f"/v1/jobs/{job_id}").json()["status"])
        if status in wanted:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is {status}, not {wanted} after {timeout} s")


def test_find_a_job_by_id_and_open_a_dead_job(
    spawn: Spawner, queue: str, page: Callable[[str], Page]
) -> None:
    _, url = spawn.api()
    spawn.worker([queue])
    hostile = '<img src=x id="pwned" onerror="document.title=1">'
    with httpx.Client(base_url=url, headers=CLIENT_HEADERS, timeout=30) as api:
        dead = _submit(
            api,
            {
                "type": "demo.fail",
                "queue": queue,
                "max_attempts": 1,
                "payload": {"message": hostile},
            },
        )
        done = _submit(api, {"type": "demo.echo", "queue": queue, "payload": {"n": 1}})
        _status(api, dead["id"], {"dead"})
        _status(api, done["id"], {"succeeded"})

    tab = page(url)
    tab.open("/ui")
    tab.wait(lambda: queue in tab.text("#queues"))
    tab.wait(lambda: "1 workers live" in tab.text("#overview"))
    dead_cell = f"//table[@id='queues']//tr[td/a[text()='{queue}']]/td[6]"
    tab.wait(lambda: tab.driver.find_element(By.XPATH, dead_cell).text == "1")
    tab.shot("overview")

    # find the succeeded job by its id, from the search box of every page
    tab.driver.find_element(By.ID, "find-id").send_keys(done["id"])
    tab.click("form.find button")
    tab.wait(lambda: tab.text("#job-status") == "succeeded")
    assert tab.driver.current_url.endswith(f"/ui/jobs/{done['id']}")
    assert '"n": 1' in tab.text("#result")
    tab.shot("found-by-id")

    # the dead job, from the dead jobs of its queue
    tab.open(f"/ui/jobs?queue={queue}&status=dead")
    tab.wait(lambda: dead["id"] in tab.text("#jobs-table"))
    tab.shot("dead-jobs")
    tab.click(f"a[href='/ui/jobs/{dead['id']}']")
    tab.wait(lambda: tab.text("#job-status") == "dead")
    assert tab.text("#errors td.wrap") == hostile  # the error, as text
    assert tab.driver.find_elements(By.ID, "pwned") == []  # never parsed as markup
    assert tab.driver.title != "1"
    events = tab.text("#events")
    assert "claimed" in events and "dead" in events
    assert tab.driver.find_elements(By.ID, "replay-job")
    tab.shot("dead-job")


def test_bulk_replay_a_filtered_set_and_see_them_succeed(
    spawn: Spawner, queue: str, page: Callable[[str], Page], tmp_path: Path
) -> None:
    _, url = spawn.api(CONVEYOR_API_KEYS=f"admin:{ADMIN}")
    spawn.worker([queue, f"{queue}-other"], concurrency=8)
    gate = tmp_path / "gate"  # test.gate fails until this file exists
    body = {"type": "test.gate", "max_attempts": 1, "payload": {"path": str(gate)}}
    headers = {**CLIENT_HEADERS, "X-API-Key": ADMIN}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as api:
        ours = [_submit(api, {**body, "queue": queue})["id"] for _ in range(4)]
        other = _submit(api, {**body, "queue": f"{queue}-other"})["id"]
        for job_id in [*ours, other]:
            _status(api, job_id, {"dead"})
        gate.touch()

        tab = page(url)
        tab.open(f"/ui/jobs?queue={queue}&status=dead")
        tab.wait(lambda: "401" in tab.text("#message"))  # no key yet: the page says so
        assert "admin API key" in tab.text("#message")
        before_key = tab.console_errors()
        assert before_key and all("401" in e for e in before_key), before_key
        tab.driver.find_element(By.ID, "api-key").send_keys(ADMIN)
        tab.click("#key-form button")
        tab.wait(lambda: len(tab.driver.find_elements(By.CSS_SELECTOR, "input[name=ids]")) == 4)
        assert "Replay all 4 matching" in tab.text("#replay-all")
        assert tab.driver.execute_script("return localStorage.length") == 0
        tab.shot("dead-with-key")

        # one selected
        first = tab.driver.find_element(By.CSS_SELECTOR, f"input[name=ids][value='{ours[0]}']")
        first.click()
        tab.click("#replay-selected")
        assert tab.confirm() == "Replay 1 selected dead jobs?"
        tab.wait(lambda: "Replayed 1 of 1 selected" in tab.text("#message"))
        _status(api, ours[0], {"succeeded"})
        tab.wait(lambda: "Replay all 3 matching" in tab.text("#replay-all"))
        tab.shot("replayed-one")

        # all the rest that match the filter, after a confirmation that counts them
        tab.click("#replay-all button")
        assert tab.confirm() == "Replay all 3 dead jobs matching this filter?"
        tab.wait(lambda: "Replayed 3 dead jobs matching the filter" in tab.text("#message"))
        for job_id in ours:
            _status(api, job_id, {"succeeded"})
        assert api.get(f"/v1/jobs/{other}").json()["status"] == "dead"  # another queue's

        tab.open(f"/ui/jobs?queue={queue}&status=succeeded")
        tab.wait(lambda: all(j in tab.text("#jobs-table") for j in ours))
        tab.shot("succeeded")


def test_cancel_a_scheduled_job_and_pause_its_queue(
    spawn: Spawner, queue: str, page: Callable[[str], Page]
) -> None:
    _, url = spawn.api()
    with httpx.Client(base_url=url, headers=CLIENT_HEADERS, timeout=30) as api:
        job = _submit(api, {"type": "demo.echo", "queue": queue, "delay_seconds": 3600})
        _submit(api, {"type": "demo.echo", "queue": queue, "delay_seconds": 3600})  # stays
        tab = page(url)
        tab.open(f"/ui/jobs/{job['id']}")
        tab.wait(lambda: tab.text("#job-status") == "scheduled")
        tab.shot("scheduled")
        tab.click("#cancel-job")
        assert tab.confirm() == "Cancel this scheduled job?"
        tab.wait(lambda: tab.text("#job-status") == "cancelled")
        assert f"Cancelled job {job['id']}" in tab.text("#message")
        assert tab.driver.find_elements(By.ID, "cancel-job") == []
        assert api.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
        events = tab.text("#events")
        assert "cancelled" in events
        tab.shot("cancelled")

        tab.open("/ui")
        pause = f"//table[@id='queues']//tr[td/a[text()='{queue}']]//button"
        tab.wait(lambda: tab.driver.find_elements(By.XPATH, pause))
        tab.click(pause, By.XPATH)
        assert tab.confirm().startswith(f"Pause queue {queue}?")
        tab.wait(lambda: f"Queue {queue} paused" in tab.text("#message"))
        tab.wait(lambda: tab.driver.find_element(By.XPATH, pause).text == "Resume")
        queues = api.get("/v1/queues").json()["items"]
        assert any(q["queue"] == queue and q["paused"] for q in queues)
        tab.shot("paused")
