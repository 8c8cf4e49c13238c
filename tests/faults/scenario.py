"""The set-up every load scenario shares: the effects table, an API process, supervised
workers, a ledger and its load generator (:func:`start_scenario`)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.settings import Settings
from tests.faults.harness import (
    Ledger,
    LoadGenerator,
    Supervisor,
    create_effects_table,
    effect_body,
)
from tests.support import db
from tests.support.processes import Proc, Spawner


async def wait_running(database_url: str, queue: str, count: int) -> None:
    """Wait until exactly ``count`` jobs of ``queue`` are running."""
    sql = "SELECT count(*) FROM jobs WHERE queue = $1 AND status = 'running'"
    await db.wait_for_value(database_url, sql, queue, expected=count)


@dataclass
class Scenario:
    """A running scenario: the API process and its URL, the workers, the ledger and its load."""

    api: Proc
    url: str
    workers: Supervisor
    ledger: Ledger
    gen: LoadGenerator
    rng: random.Random

    def effects(self, queue: str, count: int, **fields: Any) -> list[dict[str, Any]]:
        """``count`` ``test.effect`` bodies (see :func:`effect_body`)."""
        return [effect_body(queue, self.rng, **fields) for _ in range(count)]

    def load(self, bodies: Sequence[dict[str, Any]], rate: float) -> asyncio.Task[None]:
        """Submit ``bodies`` at ``rate`` per second in the background."""
        return asyncio.create_task(self.gen.run(bodies, rate))


async def start_scenario(
    spawn: Spawner, settings: Settings, queue: str, *, seed: int, workers: int = 2
) -> Scenario:
    """The effects table, an API process and ``workers`` supervised workers (registered)."""
    await create_effects_table(settings.database_url)
    api, url = spawn.api()
    supervisor = Supervisor(spawn, [queue], workers)
    supervisor.start()
    await supervisor.ready(settings.database_url)
    ledger = Ledger()
    return Scenario(api, url, supervisor, ledger, LoadGenerator(ledger, url), random.Random(seed))
