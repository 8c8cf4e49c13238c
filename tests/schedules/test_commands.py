"""``conveyor schedules ...`` against a real API process."""

from __future__ import annotations

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
