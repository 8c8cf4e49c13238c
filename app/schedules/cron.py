"""When a schedule's slots fall: 5-field cron expressions (cronsim) and ``@every <n>s|m|h``.

Pure functions of time: the caller passes the Postgres clock, never this process's.
Cron slots are computed in the schedule's time zone, with cronsim's DST rules: a daily
02:30 that a spring-forward skips runs at the end of the gap (03:00); one that a fall-back
repeats runs once, at its first occurrence; ``*/30 * * * *`` runs on every real half hour.
``@every`` slots are multiples of the interval since 1970-01-01T00:00:00Z, so ``@every 1h``
runs on the hour, whatever the zone.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from app.errors import InvalidInput

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_EVERY = re.compile(r"^@every\s+([1-9][0-9]{0,7})([smh])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_EVERY_SECONDS = 366 * 24 * 3600
_ZONE = re.compile(r"^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+){0,2}$")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Timing:
    """A parsed ``cron`` and ``timezone``: :meth:`after` gives the slots, in UTC."""

    cron: str
    zone: ZoneInfo
    every: int | None  # seconds, for ``@every``; None for a cron expression

    def after(self, moment: datetime) -> Iterator[datetime]:
        """The slots strictly after ``moment`` (aware), in order, as UTC datetimes."""
        if self.every is not None:
            n = self.every
            slot = _EPOCH + timedelta(seconds=((moment - _EPOCH) // timedelta(seconds=n) + 1) * n)
            while True:
                yield slot
                slot += timedelta(seconds=n)
        for local in CronSim(self.cron, moment.astimezone(self.zone)):
            yield local.astimezone(UTC)

    def next_after(self, moment: datetime) -> datetime:
        return next(self.after(moment))


def zone(name: str) -> ZoneInfo:
    """An IANA time zone, or 422."""
    if not _ZONE.match(name):
        raise InvalidInput(f"unknown time zone {name!r}", details={"timezone": name})
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidInput(f"unknown time zone {name!r}", details={"timezone": name}) from None


def parse(cron: str, timezone: str = "UTC") -> Timing:
    """Check a schedule's ``cron`` and ``timezone``; 422 (:class:`InvalidInput`) if bad."""
    tz = zone(timezone)
    text = " ".join(cron.split())
    every = _EVERY.match(text)
    if every is not None:
        seconds = int(every.group(1)) * _UNIT_SECONDS[every.group(2)]
        if seconds > MAX_EVERY_SECONDS:
            raise InvalidInput("an @every interval may be at most 366 days", details={"cron": cron})
        return Timing(text, tz, seconds)
    expression = ALIASES.get(text.lower(), text)
    if len(expression.split(" ")) != 5:
        raise InvalidInput(
            "cron must have 5 fields (minute hour day-of-month month day-of-week),"
            " or be @every <n>s|m|h",
            details={"cron": cron},
        )
    try:
        timing = Timing(expression, tz, None)
        timing.next_after(datetime.now(UTC))  # some errors only show when iterating
    except CronSimError as exc:
        raise InvalidInput(f"invalid cron expression: {exc}", details={"cron": cron}) from None
    except Exception:  # whatever else the parser trips on is still the input's fault
        raise InvalidInput("invalid cron expression", details={"cron": cron}) from None
    return timing
