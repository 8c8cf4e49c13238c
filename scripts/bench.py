#!/usr/bin/env python
"""Conveyor beside its peers, every figure a median over repetitions of one run on one machine.

    .venv/bin/pip install -e '.[bench]'     # PgQueuer, taskiq(-redis), dramatiq, matplotlib
    .venv/bin/python scripts/bench.py [--repeat 3] [--jobs 20000] [--smoke]

Systems: Conveyor (``conveyor api --workers 2``, ``conveyor worker``), a bare FastAPI POST
endpoint served the same way, PgQueuer (Postgres only), taskiq with taskiq-redis (Redis
Streams) and dramatiq (Redis). Peers that are not installed are skipped. Workloads:

- single POSTs at 64 connections (wrk), with the API's CPU per accepted request;
- open-loop submit→start latency at stepped offered rates (200 and 1,000 jobs/s always),
  p50/p99, and the knee: the highest rate whose p99 stays within 100 ms;
- drain of N pre-loaded no-op jobs with 1 and 2 worker processes (Conveyor's workers at
  ``--drain-concurrency``, 1,000 by default: two full claims of 500 in flight, so that one
  is claimed while the other's outcomes are written; PgQueuer with dequeue batches of
  100 and of 10, its default; the latency steps use ``--concurrency``, 64 by default);
- batch submit (POST /v1/jobs/batch, 1000 per request) against PgQueuer's batch enqueue;
- RSS of the API and worker processes after their runs.

Prints a table with Conveyor's ratio to each other system and writes docs/bench/<name>.json
and .png. Uses CONVEYOR_TEST_DATABASE_URL / CONVEYOR_TEST_REDIS_URL (throwaway databases,
unique Redis prefixes, all removed afterwards), or starts embedded servers.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from benchmark.run import main, parse

if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
