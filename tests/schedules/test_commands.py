"""``conveyor schedules ...`` against a real API process."""

from __future__ import annotations

import re
import uuid

from tests.support.processes import Spawner
from tests.test_cli import conveyor, out


def test_schedules_commands(spawn: Spawner) -> None:
    _, url = spawn.api()
    name = f"cli-{uuid.uuid4().hex[:8]}"

    def run(*args: str) -> tuple[int, str]:
        result = conveyor("schedules", *args, "--url", url)
        return result.returncode, result.stdout

    code, text = run(
        "add", name, "--cron", "@every 1h", "--type", "demo.echo", "--payload", '{"a": 1}',
        "--timezone", "Europe/Berlin", "--missed", "run_once",
    )  # fmt: skip
    assert code == 0, text
    created = out(conveyor("schedules", "ls", name, "--url", url))
    assert (created["cron"], created["payload"], created["timezone"], created["missed"]) == (
        "@every 1h",
        {"a": 1},
        "Europe/Berlin",
        "run_once",
    )
    listed = out(conveyor("schedules", "ls", "--url", url))
    assert name in [s["name"] for s in listed["items"]]
    assert out(conveyor("schedules", "ls", name, "-o", "json", "--url", url)) == created
    _assert_tables(url, name)

    assert out(conveyor("schedules", "pause", name, "--url", url))["enabled"] is False
    assert out(conveyor("schedules", "resume", name, "--url", url))["enabled"] is True
    job = out(conveyor("schedules", "trigger", name, "--url", url))
    assert (job["schedule"], job["status"]) == (name, "queued")

    code, text = run("add", f"{name}-bad", "--cron", "every hour", "--type", "demo.echo")
    assert code == 1 and '"invalid"' in text
    code, text = run("add", name, "--cron", "@every 1h", "--type", "demo.echo")
    assert code == 1 and '"conflict"' in text

    assert run("rm", name)[0] == 0
    assert run("ls", name)[0] == 1
    assert run("pause", "a/../../jobs")[0] == 1  # a name is one path segment, never a path


def _assert_tables(url: str, name: str) -> None:
    """``--output table``: the list as one row per schedule, one schedule as fields."""
    listed = conveyor("schedules", "ls", "--output", "table", "--url", url)
    assert listed.returncode == 0, listed.stderr
    header = next(line for line in listed.stdout.splitlines() if "next run" in line)
    assert all(c in header for c in ("name", "cron", "type", "queue", "enabled")), header
    row = next(line for line in listed.stdout.splitlines() if name in line)
    assert re.search(r"@every 1h \(Europe/Berlin\)\s.*demo\.echo\s.*default\s.*yes", row), row

    shown = conveyor("schedules", "ls", name, "-o", "table", "--url", url)
    assert shown.returncode == 0, shown.stderr
    assert re.search(r"missed\s+run_once", shown.stdout), shown.stdout
    assert re.search(r'payload\s+\{"a":1\}', shown.stdout), shown.stdout
    assert re.search(r"next_run_at\s+\d{4}-", shown.stdout), shown.stdout

    missing = conveyor("schedules", "ls", f"{name}-none", "-o", "table", "--url", url)
    assert missing.returncode == 1 and "404" in missing.stderr, missing.stderr
