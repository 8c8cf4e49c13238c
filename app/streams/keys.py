"""Every Redis key name Conveyor uses is built here.

Layout (``P`` = ``CONVEYOR_REDIS_PREFIX``)::

    P:{queue:partition}:b0     stream of band 0 (priority > 0, read first)
    P:{queue:partition}:b1     stream of band 1 (priority == 0)
    P:{queue:partition}:b2     stream of band 2 (priority < 0)
    P:dlq                      stream of dead-lettered jobs (a notification; Postgres is the record)
    P:{queue:partition}:epoch  marker whose loss means that partition's node lost its data
    P:rl:<principal>           rate-limit bucket of one API key
    P:jobs-changed             pub/sub channel: ids of jobs that changed (app/streams/notify.py)
    P:metrics                  hash of the counters and histogram buckets all processes add to

The ``{queue:partition}`` hash tag puts the band streams of one partition in one Redis Cluster
slot, so one XREADGROUP can read all bands of a partition, while partitions spread over slots.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from uuid import UUID

GROUP = "conveyor"
BANDS = (0, 1, 2)
HIGH_BAND, DEFAULT_BAND, LOW_BAND = BANDS


def band_for(priority: int) -> int:
    """Map the integer priority to a band: >0 high, 0 default, <0 low."""
    if priority > 0:
        return HIGH_BAND
    if priority < 0:
        return LOW_BAND
    return DEFAULT_BAND


def partition_for(job_id: UUID, partitions: int) -> int:
    """Stable partition of a job: a hash of its id, so retries land on the same stream."""
    if partitions <= 1:
        return 0
    return zlib.crc32(job_id.bytes) % partitions


@dataclass(frozen=True)
class Keys:
    prefix: str

    def stream(self, queue: str, partition: int, band: int) -> str:
        return f"{self.prefix}:{{{queue}:{partition}}}:b{band}"

    def partition_streams(self, queue: str, partition: int) -> list[str]:
        """The band streams of one partition, highest band first."""
        return [self.stream(queue, partition, band) for band in BANDS]

    def queue_streams(self, queue: str, partitions: int) -> list[str]:
        return [s for p in range(partitions) for s in self.partition_streams(queue, p)]

    @property
    def dlq(self) -> str:
        return f"{self.prefix}:dlq"

    def epoch(self, queue: str, partition: int) -> str:
        """Lives in the partition's slot, so a Redis Cluster node's loss shows on its own."""
        return f"{self.prefix}:{{{queue}:{partition}}}:epoch"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}:metrics"

    def history(self, minute: int) -> str:
        """The tallies' totals as first seen in one minute (since the epoch): the dashboard's
        per-minute charts are their differences. One hash slot for all (one MGET on a cluster)."""
        return f"{{{self.prefix}:history}}:{minute}"

    def rate_limit(self, principal: str) -> str:
        return f"{self.prefix}:rl:{principal}"

    @property
    def changes(self) -> str:
        """The pub/sub channel of job changes (a broadcast: every node of a cluster has it)."""
        return f"{self.prefix}:jobs-changed"
