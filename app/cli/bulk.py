"""Bulk operator commands, with a progress bar: ``dlq replay --all`` and ``submit --count N``.

Both work over the public HTTP API only, in bounded requests: the DLQ is listed page by page
and replayed by ids in chunks; many submissions go as batches (``POST /v1/jobs/batch``, one
idempotency key per job, so a batch sent again after a lost answer makes no second job) and
are waited for with ``GET /v1/jobs/{id}?wait=`` from a few threads at once.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import httpx

from app.cli.output import emit, progress, show, summary_table
from app.jobs.status import TERMINAL, JobStatus

PAGE = 500  # GET /v1/dlq's largest page
REPLAY_CHUNK = 1000  # ids per POST /v1/dlq/replay (the API takes up to 5000)
SUBMIT_CHUNK = 1000  # jobs per POST /v1/jobs/batch (the API's limit)
WAITERS = 16  # jobs waited for at once
WAIT_SECONDS = 30
ATTEMPTS = 5
PAUSE = 0.5


def post_retrying(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    """POST, sent again on a transport error or a 503 (only for requests that are safe to
    repeat: idempotency keys, or replays of jobs that are no longer dead)."""
    for attempt in range(1, ATTEMPTS):
        try:
            response = client.post(path, json=body)
        except httpx.TransportError as exc:
            print(f"{path}: {type(exc).__name__}; sending again", file=sys.stderr)
            time.sleep(PAUSE * attempt)
            continue
        if response.status_code != 503:
            return response
        time.sleep(PAUSE * attempt)
    return client.post(path, json=body)


def replay_all(client: httpx.Client, args: argparse.Namespace) -> int:
    """Every dead job matching ``--queue``/``--type`` (all of them without a filter)."""
    filters = {k: v for k, v in (("queue", args.queue), ("type", args.type)) if v}
    ids: list[str] = []
    with progress(args) as bar:
        listing = bar.add_task("listing", total=None)
        params: dict[str, Any] = {**filters, "limit": PAGE}
        while True:
            response = client.get("/v1/dlq", params=params)
            if not response.is_success:
                return show(response, args)
            page = response.json()
            ids += [job["id"] for job in page["items"]]
            bar.update(listing, completed=len(ids))
            if not page["next_cursor"]:
                break
            params["cursor"] = page["next_cursor"]
        bar.update(listing, total=len(ids))
        replaying = bar.add_task("replaying", total=len(ids))
        replayed = 0
        for at in range(0, len(ids), REPLAY_CHUNK):
            chunk = ids[at : at + REPLAY_CHUNK]
            response = post_retrying(client, "/v1/dlq/replay", {"ids": chunk})
            if not response.is_success:
                print(f"stopped after replaying {replayed} job(s)", file=sys.stderr)
                return show(response, args)
            replayed += int(response.json()["replayed"])
            bar.advance(replaying, len(chunk))
    result = {"matched": len(ids), "replayed": replayed}
    emit(result, args, lambda body: summary_table("DLQ replay", body))
    return 0


def submit_many(client: httpx.Client, args: argparse.Namespace, body: dict[str, Any]) -> int:
    """``--count`` copies of one job; with ``--wait``, until every one is terminal (exit 1 if
    any ended dead)."""
    key = body.pop("idempotency_key")
    jobs = [{**body, "idempotency_key": f"{key}-{i}"} for i in range(args.count)]
    with progress(args) as bar:
        ids = _submit(client, args, jobs, bar)
        if ids is None:
            return 1
        counts: Counter[str] = Counter()
        if args.wait:
            counts = _wait_all(client, ids, bar)
    result: dict[str, Any] = {"submitted": len(ids), **counts}
    emit({**result, "ids": ids}, args, lambda _: summary_table("submitted", result))
    return 1 if counts.get(JobStatus.DEAD, 0) else 0


def _submit(
    client: httpx.Client, args: argparse.Namespace, jobs: Sequence[dict[str, Any]], bar: Any
) -> list[str] | None:
    submitting = bar.add_task("submitting", total=len(jobs))
    ids: list[str] = []
    for at in range(0, len(jobs), SUBMIT_CHUNK):
        chunk = list(jobs[at : at + SUBMIT_CHUNK])
        try:
            response = post_retrying(client, "/v1/jobs/batch", {"jobs": chunk})
        except httpx.TransportError as exc:
            print(f"submit: {exc!r} after {len(ids)} job(s)", file=sys.stderr)
            return None
        if not response.is_success:
            print(f"stopped after submitting {len(ids)} job(s)", file=sys.stderr)
            show(response, args)
            return None
        ids += [job["id"] for job in response.json()["jobs"]]
        bar.advance(submitting, len(chunk))
    return ids


def _wait_all(client: httpx.Client, ids: Sequence[str], bar: Any) -> Counter[str]:
    waiting = bar.add_task("finishing", total=len(ids))
    counts: Counter[str] = Counter()
    with ThreadPoolExecutor(max_workers=min(WAITERS, len(ids)) or 1) as pool:
        for done in as_completed([pool.submit(_wait_one, client, i) for i in ids]):
            counts[done.result()] += 1
            bar.advance(waiting)
    return counts


def _wait_one(client: httpx.Client, job_id: str) -> str:
    """The job's terminal status (``GET ?wait=`` until it is; the API answers at once then)."""
    while True:
        try:
            response = client.get(
                f"/v1/jobs/{job_id}", params={"wait": WAIT_SECONDS}, timeout=WAIT_SECONDS + 30
            )
        except httpx.TransportError:
            time.sleep(PAUSE)
            continue
        if response.status_code == 503:
            time.sleep(PAUSE)
            continue
        if not response.is_success:
            return f"error {response.status_code}"
        status: str = response.json()["status"]
        if status in TERMINAL:
            return status
