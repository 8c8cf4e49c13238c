"""The stream layout (partition count and Redis prefix) is recorded in Postgres: a process
with other values refuses to start, and ``conveyor migrate --repartition`` changes it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from app.settings import Settings
from tests.faults.checker import drain
from tests.faults.harness import (
    Supervisor,
    create_effects_table,
    served_before,
    statuses,
    submit_marked,
)
from tests.support.processes import ROOT, Proc, Spawner, env_for


def _exited(proc: Proc, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while proc.alive():
        assert time.monotonic() < deadline, f"still running:\n{proc.output()}"
        time.sleep(0.1)
    return proc.proc.returncode


def _repartition(settings: Settings) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate", "--repartition"],
        env=env_for(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_a_worker_with_another_partition_count_refuses_to_start(
    spawn: Spawner, settings: Settings, queue: str
) -> None:
    await served_before(spawn, settings, queue)  # records partitions=1 and the prefix
    other = settings.model_copy(update={"partitions": 2})
    worker = spawn.worker([queue], settings=other)
    assert _exited(worker) == 2
    output = worker.output()
    assert "CONVEYOR_PARTITIONS=1" in output and "CONVEYOR_PARTITIONS=2" in output
    assert "conveyor migrate --repartition" in output
    assert "Traceback" not in output


async def test_an_api_with_another_prefix_refuses_to_start(
    spawn: Spawner, settings: Settings, queue: str
) -> None:
    await served_before(spawn, settings, queue)
    other = settings.model_copy(update={"redis_prefix": settings.redis_prefix + "-other"})
    with pytest.raises(RuntimeError, match="API did not start") as failed:
        spawn.api(settings=other)
    assert f"CONVEYOR_REDIS_PREFIX={settings.redis_prefix}-other" in str(failed.value)
    assert "conveyor migrate --repartition" in str(failed.value)
    spawn.api(settings=settings)  # the recorded layout starts


async def test_repartition_sends_queued_jobs_to_their_new_streams(
    spawn: Spawner, settings: Settings, queue: str
) -> None:
    """Queued jobs confirmed in the old layout (three partitions; the new one has one, so two
    of the old streams are never read again, while the data epoch of partition 0 stays the
    same) run once the deployment is repartitioned and restarted."""
    await create_effects_table(settings.database_url)
    old = settings.model_copy(update={"partitions": 3})
    await served_before(spawn, old, queue)
    elsewhere = Supervisor(spawn, [queue + "-elsewhere"], 1, settings=old)
    elsewhere.start()
    await elsewhere.ready(settings.database_url)
    refused = _repartition(settings)
    assert refused.returncode == 1 and "workers are running" in refused.stderr, refused
    await elsewhere.stop()
    body = {"type": "test.effect", "queue": queue, "payload": {"sleep_ms": 5}}
    ids = await submit_marked(old, [body] * 12)
    done = _repartition(settings)
    assert done.returncode == 0, done.stderr
    assert "CONVEYOR_PARTITIONS=3" in done.stdout and "CONVEYOR_PARTITIONS=1" in done.stdout
    workers = Supervisor(spawn, [queue], 1, settings=settings)
    workers.start()
    await drain(settings.database_url, queue, timeout=30.0)
    await workers.stop()
    assert await statuses(settings, ids) == ["succeeded"] * 12
