"""Slot arithmetic: cron in a time zone, @every aligned on the epoch, and what is refused."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import islice

import pytest

from app.errors import InvalidInput
from app.schedules.cron import parse


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0, us: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, us, tzinfo=UTC)


def test_cron_slots_are_strictly_after() -> None:
    timing = parse("*/15 * * * *")
    assert timing.next_after(utc(2025, 1, 1, 12, 0)) == utc(2025, 1, 1, 12, 15)
    assert timing.next_after(utc(2025, 1, 1, 11, 59, 59)) == utc(2025, 1, 1, 12, 0)


def test_cron_runs_in_its_time_zone() -> None:
    timing = parse("0 9 * * *", "America/New_York")
    # 09:00 in New York is 14:00 UTC in winter and 13:00 UTC in summer
    assert timing.next_after(utc(2025, 1, 10)) == utc(2025, 1, 10, 14)
    assert timing.next_after(utc(2025, 7, 10)) == utc(2025, 7, 10, 13)


def test_dst_fall_back_keeps_every_real_half_hour() -> None:
    timing = parse("*/30 * * * *", "America/New_York")
    slots = list(islice(timing.after(utc(2024, 11, 3, 4, 50)), 6))
    assert slots == [utc(2024, 11, 3, 5, 0) + timedelta(minutes=30 * i) for i in range(6)]


def test_dst_gap_and_repeat_of_a_daily_time() -> None:
    timing = parse("30 2 * * *", "Europe/Berlin")
    # 2025-03-30 02:30 does not exist in Berlin: it runs at 03:00 CEST (01:00 UTC)
    assert timing.next_after(utc(2025, 3, 29, 12)) == utc(2025, 3, 30, 1)
    # 2025-10-26 02:30 happens twice: it runs once, the first time (CEST, 00:30 UTC)
    slots = list(islice(timing.after(utc(2025, 10, 25, 12)), 2))
    assert slots == [utc(2025, 10, 26, 0, 30), utc(2025, 10, 27, 1, 30)]


def test_every_is_aligned_on_the_epoch_whatever_the_zone() -> None:
    timing = parse("@every 30s", "Asia/Kolkata")
    assert timing.next_after(utc(2025, 1, 1, 0, 0, 10)) == utc(2025, 1, 1, 0, 0, 30)
    assert timing.next_after(utc(2025, 1, 1, 0, 0, 30)) == utc(2025, 1, 1, 0, 1, 0)
    hourly = parse("@every 1h")
    assert hourly.next_after(utc(2025, 1, 1, 7, 59, 59, 999999)) == utc(2025, 1, 1, 8)
    assert list(islice(parse("@every 2m").after(utc(2025, 1, 1, 0, 1)), 2)) == [
        utc(2025, 1, 1, 0, 2),
        utc(2025, 1, 1, 0, 4),
    ]


def test_aliases_and_spacing() -> None:
    assert parse("@daily").next_after(utc(2025, 3, 1, 5)) == utc(2025, 3, 2)
    assert parse("  0   *  * * *  ").next_after(utc(2025, 3, 1, 5, 1)) == utc(2025, 3, 1, 6)


@pytest.mark.parametrize(
    "cron",
    ["", "bogus", "* * * *", "* * * * * *", "61 * * * *", "0 0 31 2 *", "@every 0s",
     "@every 1d", "@every", "@every -1s", "@every 9000h", "@often"],
)  # fmt: skip
def test_bad_cron_is_invalid_input(cron: str) -> None:
    with pytest.raises(InvalidInput):
        parse(cron)


@pytest.mark.parametrize("zone", ["", "Mars/Base", "../etc/passwd", "/etc/localtime", "UTC\x00"])
def test_bad_zone_is_invalid_input(zone: str) -> None:
    with pytest.raises(InvalidInput):
        parse("* * * * *", zone)
