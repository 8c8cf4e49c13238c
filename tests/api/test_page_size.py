"""List pages are bounded by bytes as well as by count, and paging still returns every item once.

A page of `GET /v1/jobs` or `GET /v1/dlq` stops before its items pass CONVEYOR_PAGE_MAX_BYTES
(but always holds one item); `next_cursor` then continues right after the last item returned.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from app.settings import Settings
from tests.conftest import Backends, make_settings, submit, wait_until
from tests.support.processes import Spawner

PAGE_BYTES = 1 << 20
BLOB = 200_000  # characters of a job's payload; a batch of such jobs would pass the body limit


@pytest.fixture
def settings(backends: Backends) -> Settings:
    return make_settings(backends, page_max_bytes=PAGE_BYTES)


async def pages(
    client: httpx.AsyncClient, path: str, params: dict[str, Any]
) -> list[httpx.Response]:
    responses: list[httpx.Response] = []
    cursor: str | None = None
    for _ in range(100):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, params=query)
        assert response.status_code == 200, response.text
        responses.append(response)
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return responses
    raise AssertionError("pagination did not end")


def check_pages(responses: list[httpx.Response], expected: list[str], sort_key: str) -> None:
    items = [item for r in responses for item in r.json()["items"]]
    assert sorted(i["id"] for i in items) == sorted(expected), "every item exactly once"
    keys = [(i[sort_key], i["id"]) for i in items]
    assert keys == sorted(keys, reverse=True)
    for response in responses:
        assert len(response.content) <= PAGE_BYTES or len(response.json()["items"]) == 1
    assert len(responses) >= 2, "big items are spread over several pages"


async def test_job_pages_are_bounded_by_bytes_and_still_complete(
    client: httpx.AsyncClient, queue: str
) -> None:
    ids: list[str] = []
    for n in range(12):
        big = await submit(
            client, {"type": "demo.echo", "queue": queue, "payload": {"n": n, "blob": "x" * BLOB}}
        )
        response = await client.post(
            "/v1/jobs/batch", json={"jobs": [{"type": "demo.echo", "queue": queue}] * 20}
        )
        ids += [big["id"], *(j["id"] for j in response.json()["jobs"])]
    responses = await pages(client, "/v1/jobs", {"queue": queue, "limit": 500})
    check_pages(responses, ids, "created_at")
    first = responses[0].json()
    assert len(first["items"]) < 500 and first["next_cursor"] is not None
    assert all(i["payload"] for r in responses for i in r.json()["items"] if "blob" in i["payload"])

    small = await pages(client, "/v1/jobs", {"queue": queue, "limit": 7})
    assert all(len(r.json()["items"]) <= 7 for r in small)
    assert sorted(i["id"] for r in small for i in r.json()["items"]) == sorted(ids)


async def test_dlq_pages_are_bounded_by_bytes_and_keep_the_error_history(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue], concurrency=8)  # no CONVEYOR_HTTP_ALLOWED_HOSTS: every call is refused
    ids = [
        (
            await submit(
                client,
                {
                    "type": "http.request",
                    "queue": queue,
                    "payload": {"url": "http://example.invalid/", "body": "x" * BLOB},
                },
            )
        )["id"]
        for _ in range(8)
    ]

    async def all_dead() -> bool:
        items = (await client.get("/v1/queues")).json()["items"]
        return any(q["queue"] == queue and q["dead"] == len(ids) for q in items)

    await wait_until(all_dead, timeout=60, interval=0.3)
    responses = await pages(client, "/v1/dlq", {"queue": queue, "limit": 500})
    check_pages(responses, ids, "finished_at")
    for response in responses:
        for item in response.json()["items"]:
            assert item["errors"], "the error history is in each item"
            assert item == (await client.get(f"/v1/jobs/{item['id']}")).json()
