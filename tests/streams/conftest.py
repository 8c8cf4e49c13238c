"""Fixtures of the stream tests: a real Redis Cluster of the test's own; the fault suite's
results file (scenario lines gather there)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import results
from tests.support.cluster import Cluster, running_cluster

__all__ = ["cluster", "results"]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_cluster(tmp_path) as found:
        yield found
