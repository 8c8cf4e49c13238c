"""Operator commands over the HTTP API: submit, status, queues, queue pause/resume, workers,
dlq."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from typing import Any

import httpx

from app.cli import output
from app.cli.output import Render
from app.jobs.status import TERMINAL, JobStatus

SUBMIT_ATTEMPTS = 5
RETRY_PAUSE_SECONDS = 0.5
WAIT_SECONDS = 30  # one `?wait=` request of `submit --wait`


def _client(args: argparse.Namespace) -> httpx.Client:
    url = args.url or os.environ.get("CONVEYOR_URL", "http://127.0.0.1:8000")
    key = args.api_key or os.environ.get("CONVEYOR_API_KEY")
    # X-Requested-With: with auth off, a bodiless POST or DELETE needs it (cross-site check)
    headers = {"X-Requested-With": "conveyor-cli"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.Client(base_url=url, headers=headers, timeout=30)


def post_submission(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    """POST /v1/jobs; a request that failed in transit (a reset, a timeout) or met a 503 is
    sent again with the same idempotency key, so a retry can never make a second job: the
    API answers the repeat with the job the first attempt made."""
    for attempt in range(1, SUBMIT_ATTEMPTS):
        try:
            response = client.post("/v1/jobs", json=body)
        except httpx.TransportError as exc:
            print(f"submit: {type(exc).__name__}; retrying with the same key", file=sys.stderr)
            time.sleep(RETRY_PAUSE_SECONDS * attempt)
            continue
        if response.status_code != 503:
            return response
        wait = response.headers.get("Retry-After", "")
        time.sleep(float(wait) if wait.isdigit() else RETRY_PAUSE_SECONDS * attempt)
    return client.post("/v1/jobs", json=body)  # the last attempt: whatever it gives


def _show(response: httpx.Response) -> int:
    if response.status_code == 204:
        return 0
    try:
        print(json.dumps(response.json(), indent=2))
    except ValueError:
        print(response.text)
    return 0 if response.is_success else 1


def _submit(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        print(f"--payload is not valid JSON: {exc}", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"type": args.type, "payload": payload, "queue": args.queue}
    body["idempotency_key"] = args.idempotency_key or f"cli-{uuid.uuid4()}"
    if args.count < 1:
        print("--count must be at least 1", file=sys.stderr)
        return 2
    with _client(args) as client:
        if args.count > 1:
            from app.cli.bulk import submit_many

            return submit_many(client, args, body)
        try:
            response = post_submission(client, body)
        except httpx.TransportError as exc:
            print(f"submit: {exc!r}", file=sys.stderr)
            return 1
        if not args.wait or not response.is_success:
            return output.show(response, args, output.job_table)
        return _wait(client, response.json()["id"], args)


def _wait(client: httpx.Client, job_id: str, args: argparse.Namespace) -> int:
    """``GET /v1/jobs/{id}?wait=`` until the job is terminal: the API answers as soon as it
    is (one request per WAIT_SECONDS at most, no polling); exit 1 when it ends dead."""
    while True:
        try:
            response = client.get(
                f"/v1/jobs/{job_id}",
                params={"wait": WAIT_SECONDS},
                timeout=WAIT_SECONDS + 30,
            )
        except httpx.TransportError as exc:  # the API restarting: ask again
            print(f"wait: {type(exc).__name__}; asking again", file=sys.stderr)
            time.sleep(RETRY_PAUSE_SECONDS)
            continue
        if response.status_code == 503:
            time.sleep(RETRY_PAUSE_SECONDS)
            continue
        if not response.is_success or response.json()["status"] in TERMINAL:
            code = output.show(response, args, output.job_table)
            return code if response.json().get("status") != JobStatus.DEAD else 1


def _get(path: str, render: Render | None = None) -> Any:
    def run(args: argparse.Namespace) -> int:
        with _client(args) as client:
            return output.show(client.get(path.format(**vars(args))), args, render)

    return run


def _dlq(args: argparse.Namespace) -> int:
    if args.all and (args.action != "replay" or args.ids):
        print("--all goes with replay and no ids (filter with --queue/--type)", file=sys.stderr)
        return 2
    with _client(args) as client:
        if args.action == "ls":
            params = {k: v for k, v in (("queue", args.queue), ("type", args.type)) if v}
            if args.limit is not None:
                params["limit"] = str(args.limit)
            if args.cursor is not None:
                params["cursor"] = args.cursor
            return output.show(client.get("/v1/dlq", params=params), args, output.jobs_table)
        if args.all:
            from app.cli.bulk import replay_all

            return replay_all(client, args)
        if not args.ids:
            if args.action == "replay" and (args.type or args.queue):
                body = {k: v for k, v in (("queue", args.queue), ("type", args.type)) if v}
                return output.show(client.post("/v1/dlq/replay", json=body), args, _replayed)
            print("give job ids (or --type/--queue, or --all, for replay)", file=sys.stderr)
            return 2
        if args.action == "replay":
            response = client.post("/v1/dlq/replay", json={"ids": args.ids})
            return output.show(response, args, _replayed)
        return _remove(client, args)


def _replayed(body: dict[str, Any]) -> Any:
    return output.summary_table("DLQ replay", body)


def _remove(client: httpx.Client, args: argparse.Namespace) -> int:
    """DELETE each id, with a progress bar when there are many."""
    code = 0
    with output.progress(args) as bar:
        task = bar.add_task("removing", total=len(args.ids))
        for job_id in args.ids:
            code = max(code, _show(client.delete(f"/v1/dlq/{job_id}")))
            bar.advance(task)
    return code


def _queue(args: argparse.Namespace) -> int:
    """POST /v1/queues/{name}/pause or /resume (admin key)."""
    with _client(args) as client:
        return _show(client.post(f"/v1/queues/{args.name}/{args.action}"))


def _top(args: argparse.Namespace) -> int:
    from app.cli.top import run_top

    if args.interval < 0:
        print("--interval must not be negative", file=sys.stderr)
        return 2
    with _client(args) as client:
        return run_top(client, args)


def add_operator_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="API URL (or CONVEYOR_URL)")
    common.add_argument("--api-key", default=None, help="API key (or CONVEYOR_API_KEY)")
    output.add_output_option(common)

    p = sub.add_parser("submit", parents=[common], help="submit a job")
    p.add_argument("type")
    p.add_argument("--payload", default="{}")
    p.add_argument("--queue", default="default")
    p.add_argument(
        "--idempotency-key",
        default=None,
        help="the job's idempotency key (default: a new one; retries of this submission reuse it)",
    )
    p.add_argument("--wait", action="store_true", help="wait until the job(s) finish")
    p.add_argument(
        "--count",
        type=int,
        default=1,
        help="submit this many copies (in batches, with a progress bar; default 1)",
    )
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", parents=[common], help="show a job")
    p.add_argument("id")
    p.set_defaults(func=_get("/v1/jobs/{id}", output.job_table))

    p = sub.add_parser("queues", parents=[common], help="queue counts")
    p.set_defaults(func=_get("/v1/queues", output.queues_table))

    p = sub.add_parser("top", parents=[common], help="live queue counts and rates")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between frames")
    p.add_argument(
        "--once", action="store_true", help="print one frame (two samples --interval apart)"
    )
    p.set_defaults(func=_top)

    p = sub.add_parser("queue", parents=[common], help="pause or resume a queue (admin key)")
    p.add_argument("action", choices=["pause", "resume"])
    p.add_argument("name")
    p.set_defaults(func=_queue)

    p = sub.add_parser("workers", parents=[common], help="live workers")
    p.set_defaults(func=_get("/v1/workers", output.workers_table))

    p = sub.add_parser("dlq", parents=[common], help="dead-letter queue: ls, replay, rm")
    p.add_argument("action", choices=["ls", "replay", "rm"])
    p.add_argument("ids", nargs="*")
    p.add_argument("--queue", default=None)
    p.add_argument("--type", default=None)
    p.add_argument(
        "--all",
        action="store_true",
        help="replay every dead job matching --queue/--type (all without them), with progress",
    )
    p.add_argument("--limit", type=int, default=None, help="ls: jobs per page (1-500)")
    p.add_argument("--cursor", default=None, help="ls: the page after this next_cursor")
    p.set_defaults(func=_dlq)

    from app.cli.schedule_commands import add_schedule_commands

    add_schedule_commands(sub, common)
