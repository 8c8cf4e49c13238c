"""Submitting and reading jobs over HTTP, run by a real worker process."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import wait_for_status
from tests.support.processes import Spawner


async def test_echo_runs_to_succeeded_with_payload_as_result(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    response = await client.post(
        "/v1/jobs", json={"type": "demo.echo", "queue": queue, "payload": {"hello": "world"}}
    )
    assert response.status_code == 202
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "queued"
    done = await wait_for_status(client, job["id"], {"succeeded", "dead"})
    assert done["status"] == "succeeded"
    assert done["result"] == {"hello": "world"}
    assert done["attempts"] == 1
    assert done["started_at"] is not None and done["finished_at"] is not None


async def test_sleep_passes_through_running(
    client: httpx.AsyncClient, spawn: Spawner, queue: str
) -> None:
    spawn.worker([queue])
    job = (
        await client.post(
            "/v1/jobs", json={"type": "demo.sleep", "queue": queue, "payload": {"seconds": 1.5}}
        )
    ).json()
    running = await wait_for_status(client, job["id"], {"running", "succeeded"})
    assert running["status"] == "running"
    done = await wait_for_status(client, job["id"], {"succeeded"})
    assert done["result"] == {"slept": 1.5}


async def test_unknown_type_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/jobs", json={"type": "no.such.type"})
    assert response.status_code == 422
    assert response.json()["error"] == "invalid"
    assert "unknown job type" in response.json()["message"]


async def test_payload_failing_schema_is_422(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs", json={"type": "demo.sleep", "payload": {"seconds": "forever"}}
    )
    assert response.status_code == 422
    body = response.json()
    assert body["error"] == "invalid"
    assert body["details"][0]["loc"] == ["seconds"]


async def test_malformed_json_is_4xx(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/jobs", content=b'{"type": "demo.echo",', headers={"content-type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    assert "error" in response.json()


async def test_unknown_id_is_404_and_malformed_id_is_422(client: httpx.AsyncClient) -> None:
    missing = await client.get(f"/v1/jobs/{uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    malformed = await client.get("/v1/jobs/not-a-uuid")
    assert malformed.status_code == 422


async def test_job_types_and_openapi_publish_payload_schemas(client: httpx.AsyncClient) -> None:
    types = {t["name"]: t for t in (await client.get("/v1/job-types")).json()["items"]}
    assert {"demo.echo", "demo.sleep", "demo.fail"} <= set(types)
    assert types["demo.sleep"]["payload_schema"]["properties"]["seconds"]["maximum"] == 3600
    schemas = (await client.get("/openapi.json")).json()["components"]["schemas"]
    assert "seconds" in schemas["Payload.demo.sleep"]["properties"]
    assert "fail_times" in schemas["Payload.demo.fail"]["properties"]


async def test_job_ids_are_uuid7_in_submission_order(client: httpx.AsyncClient, queue: str) -> None:
    """Ids are time-ordered (ADR 0024): singles and a batch, each later than the one before."""
    singles = [
        (await client.post("/v1/jobs", json={"type": "demo.echo", "queue": queue})).json()["id"]
        for _ in range(3)
    ]
    batch = await client.post(
        "/v1/jobs/batch",
        json={
            "jobs": [{"type": "demo.echo", "queue": queue, "payload": {"i": i}} for i in range(50)]
        },
    )
    assert batch.status_code == 202, batch.text
    ids = [uuid.UUID(i) for i in singles + [j["id"] for j in batch.json()["jobs"]]]
    assert {i.version for i in ids} == {7}
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
