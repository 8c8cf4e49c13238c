"""Operator commands over the HTTP API: submit, status, queues, workers, dlq."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import httpx

from app.jobs.status import TERMINAL, JobStatus


def _client(args: argparse.Namespace) -> httpx.Client:
    url = args.url or os.environ.get("CONVEYOR_URL", "http://127.0.0.1:8000")
    key = args.api_key or os.environ.get("CONVEYOR_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=30)


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
    if args.idempotency_key:
        body["idempotency_key"] = args.idempotency_key
    with _client(args) as client:
        response = client.post("/v1/jobs", json=body)
        if not args.wait or not response.is_success:
            return _show(response)
        job_id = response.json()["id"]
        while True:
            response = client.get(f"/v1/jobs/{job_id}")
            if not response.is_success or response.json()["status"] in TERMINAL:
                code = _show(response)
                return code if response.json().get("status") != JobStatus.DEAD else 1
            time.sleep(0.2)


def _get(path: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        with _client(args) as client:
            return _show(client.get(path.format(**vars(args))))

    return run


def _dlq(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "ls":
            params = {k: v for k, v in (("queue", args.queue), ("type", args.type)) if v}
            return _show(client.get("/v1/dlq", params=params))
        if not args.ids:
            if args.action == "replay" and (args.type or args.queue):
                body = {k: v for k, v in (("queue", args.queue), ("type", args.type)) if v}
                return _show(client.post("/v1/dlq/replay", json=body))
            print("give job ids (or --type/--queue for replay)", file=sys.stderr)
            return 2
        if args.action == "replay":
            return _show(client.post("/v1/dlq/replay", json={"ids": args.ids}))
        codes = [_show(client.delete(f"/v1/dlq/{i}")) for i in args.ids]
        return max(codes)


def add_operator_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help="API URL (or CONVEYOR_URL)")
    common.add_argument("--api-key", default=None, help="API key (or CONVEYOR_API_KEY)")

    p = sub.add_parser("submit", parents=[common], help="submit a job")
    p.add_argument("type")
    p.add_argument("--payload", default="{}")
    p.add_argument("--queue", default="default")
    p.add_argument("--idempotency-key", default=None)
    p.add_argument("--wait", action="store_true", help="poll until the job finishes")
    p.set_defaults(func=_submit)

    p = sub.add_parser("status", parents=[common], help="show a job")
    p.add_argument("id")
    p.set_defaults(func=_get("/v1/jobs/{id}"))

    p = sub.add_parser("queues", parents=[common], help="queue counts")
    p.set_defaults(func=_get("/v1/queues"))

    p = sub.add_parser("workers", parents=[common], help="live workers")
    p.set_defaults(func=_get("/v1/workers"))

    p = sub.add_parser("dlq", parents=[common], help="dead-letter queue: ls, replay, rm")
    p.add_argument("action", choices=["ls", "replay", "rm"])
    p.add_argument("ids", nargs="*")
    p.add_argument("--queue", default=None)
    p.add_argument("--type", default=None)
    p.set_defaults(func=_dlq)

    from app.cli.schedule_commands import add_schedule_commands

    add_schedule_commands(sub, common)
