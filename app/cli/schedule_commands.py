"""``conveyor schedules ls|add|rm|pause|resume|trigger``: schedules over the HTTP API."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote

from app.cli import output
from app.cli.operator_commands import _client, _show


def _ls(args: argparse.Namespace) -> int:
    """One schedule, or every page of them; a table or JSON as ``--output`` says."""
    with _client(args) as client:
        if args.name:
            response = client.get(f"/v1/schedules/{quote(args.name, safe='')}")
            return output.show(response, args, output.schedule_table)
        items: list[Any] = []
        params: dict[str, Any] = {"limit": 500}
        while True:
            response = client.get("/v1/schedules", params=params)
            if not response.is_success:
                return output.show(response, args)
            page = response.json()
            items += page["items"]
            if not page["next_cursor"]:
                break
            params["cursor"] = page["next_cursor"]
        output.emit({"items": items}, args, output.schedules_table)
        return 0


def _add(args: argparse.Namespace) -> int:
    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as exc:
        print(f"--payload is not valid JSON: {exc}", file=sys.stderr)
        return 2
    body = {
        "name": args.name,
        "cron": args.cron,
        "type": args.type,
        "payload": payload,
        "queue": args.queue,
        "priority": args.priority,
        "timezone": args.timezone,
        "missed": args.missed,
        "enabled": not args.paused,
    }
    with _client(args) as client:
        return _show(client.post("/v1/schedules", json=body))


def _rm(args: argparse.Namespace) -> int:
    with _client(args) as client:
        return max(
            _show(client.delete(f"/v1/schedules/{quote(name, safe='')}")) for name in args.names
        )


def _action(verb: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        with _client(args) as client:
            return _show(client.post(f"/v1/schedules/{quote(args.name, safe='')}/{verb}"))

    return run


def add_schedule_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("schedules", help="periodic jobs: ls, add, rm, pause, resume, trigger")
    actions = p.add_subparsers(dest="action", required=True)

    a = actions.add_parser("ls", parents=[common], help="list schedules, or show one")
    a.add_argument("name", nargs="?")
    a.set_defaults(func=_ls)

    a = actions.add_parser("add", parents=[common], help="create a schedule")
    a.add_argument("name")
    a.add_argument("--cron", required=True, help="'*/5 * * * *', '@daily' or '@every 30s'")
    a.add_argument("--type", required=True)
    a.add_argument("--payload", default="{}")
    a.add_argument("--queue", default="default")
    a.add_argument("--priority", type=int, default=0)
    a.add_argument("--timezone", default="UTC")
    a.add_argument("--missed", choices=["skip", "run_once"], default="skip")
    a.add_argument("--paused", action="store_true", help="create it paused")
    a.set_defaults(func=_add)

    a = actions.add_parser("rm", parents=[common], help="delete schedules")
    a.add_argument("names", nargs="+")
    a.set_defaults(func=_rm)

    for verb, text in [
        ("pause", "stop making jobs"),
        ("resume", "make jobs again, from the next slot"),
        ("trigger", "make one job now"),
    ]:
        a = actions.add_parser(verb, parents=[common], help=text)
        a.add_argument("name")
        a.set_defaults(func=_action(verb))
