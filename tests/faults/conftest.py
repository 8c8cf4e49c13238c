"""Fixtures of the fault-injection suite: each test gets its own Redis server to break.

The suite's Redis is an embedded server without persistence started for the test (so FLUSHALL,
kill -9 and SIGSTOP never touch a shared server); Postgres is the session's throwaway
database unless a test starts its own. Timings are short so that faults heal within seconds:
a 2 s lease/claim idle time, a 1.5 s reconcile period, a 1 s dispatch grace.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.devserver import EmbeddedRedis
from app.settings import Settings
from tests.conftest import Backends, make_settings


def fault_settings(database_url: str, redis_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "claim_idle_seconds": 2.0,
        "reconcile_seconds": 1.5,
        "dispatch_grace_seconds": 1.0,
        "redis_timeout_seconds": 1.0,
        "db_pool_size": 4,
        "db_max_overflow": 4,
        "log_level": "INFO",
    }
    values.update(overrides)
    return make_settings(Backends(database_url, redis_url), **values)


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", persistent=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def settings(backends: Backends, fault_redis: EmbeddedRedis) -> Settings:
    return fault_settings(backends.database_url, fault_redis.url)


@pytest.fixture(scope="session")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the scenario lines gather (besides being printed): the pytest temp directory."""
    return tmp_path_factory.getbasetemp() / "fault-results.txt"
