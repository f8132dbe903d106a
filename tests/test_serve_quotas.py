"""Quotas, idempotency keys per client and what an ended session leaves in Redis, on the running service.

The shared service's quotas are far above what its tests send from 127.0.0.1, so this module deploys the
shipped application a second time beside it (its own route prefix and Redis database, small quotas, no
job workers, so the queue stays as the test fills it) and removes it afterwards; the shared application
is left as it runs. Clients are named by X-Forwarded-For (trusted in both).
"""

from __future__ import annotations

import time

import httpx
import pytest
import redis

from deployments.store import ENDED_TTL_S, EVENTS, SESSION
from longlive_client import Client, Retries, ServiceFull, TooManyRequests
from tests.service_fixture import BUCKET, FOREST, RED, SIZE, auth
from tests.serving import wait_ready

PREFIX = "/quotas"
SESSIONS, JOBS, QUEUE = 2, 2, 3  # per client, per client, all clients
JOB = {"schedule": [{"at": 0, "prompt": RED}], "seconds": 60}


def client(name: str) -> dict:
    return {"x-forwarded-for": f"203.0.113.{name}"}


@pytest.fixture(scope="module")
def quotas(service):
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve_client = _get_global_client()
    shared = serve_client.get_serve_details()["applications"]["longlive"]["deployed_app_config"]
    app = {**shared, "name": "quotas", "route_prefix": PREFIX}
    redis_url = service["redis_url"].rsplit("/", 1)[0] + "/1"
    app["args"] = {
        **shared["args"],
        "redis_url": redis_url,
        "s3_endpoint_url": service["s3"],
        "s3_bucket": BUCKET,
        "size": list(SIZE),
        "jobs": False,
        "max_sessions": 4,
        "max_sessions_per_client": SESSIONS,
        "max_queued_jobs_per_client": JOBS,
        "max_queued_jobs": QUEUE,
    }
    app["deployments"] = [{"name": "Generator", "num_replicas": 1}]
    serve_client.deploy_apps(ServeDeploySchema(applications=[shared, app]), _blocking=False)
    base = service["base"] + PREFIX
    try:
        wait_ready(base, timeout=240)
        yield {"base": base, "redis": redis.Redis.from_url(redis_url, decode_responses=True)}
    finally:
        serve_client.deploy_apps(ServeDeploySchema(applications=[shared]), _blocking=False)


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code and int(response.headers["retry-after"]) >= 1


def create(base: str, who: str, **body) -> httpx.Response:
    return httpx.post(f"{base}/v1/sessions", json={"prompt": RED, **body}, headers=client(who), timeout=60)


def end(base: str, session: dict) -> None:
    url = f"{base}/v1/sessions/{session['session_id']}"
    assert httpx.delete(url, headers=auth(session["token"]), timeout=30).status_code == 204


def submit(base: str, who: str, body: dict = JOB) -> httpx.Response:
    return httpx.post(f"{base}/v1/jobs", json=body, headers=client(who), timeout=30)


def cancel(base: str, job: dict) -> None:
    url = f"{base}/v1/jobs/{job['job_id']}"
    assert httpx.delete(url, headers=auth(job["token"]), timeout=30).json() == {"cancelled": True}


def test_a_clients_session_past_its_quota_gets_429_while_another_is_admitted(quotas):
    base = quotas["base"]
    mine = [create(base, "21", max_seconds=60) for _ in range(SESSIONS)]
    assert [r.status_code for r in mine] == [201] * SESSIONS
    refused(create(base, "21"), 429, "client_sessions")
    other = create(base, "22", max_seconds=60)
    assert other.status_code == 201, other.text
    end(base, mine[0].json())  # a DELETE gives its slot back at once
    again = create(base, "21", max_seconds=60)
    assert again.status_code == 201, again.text
    for session in (mine[1], other, again):
        end(base, session.json())


def test_a_session_that_ends_on_its_own_gives_its_slot_back(quotas):
    base = quotas["base"]
    short = [create(base, "23", max_seconds=4) for _ in range(SESSIONS)]  # ~1 s of wall time at SPEED 4
    assert [r.status_code for r in short] == [201] * SESSIONS
    refused(create(base, "23", max_seconds=60), 429, "client_sessions")  # while they run
    deadline = time.monotonic() + 60
    while (response := create(base, "23", max_seconds=60)).status_code == 429:
        assert time.monotonic() < deadline, "the ended sessions kept their client's slots"
        time.sleep(0.2)
    assert response.status_code == 201, response.text
    end(base, response.json())


def refused_by_the_client(base: str, who: str, kind: type, code: str) -> None:
    """The client's typed exception, after its retries (its POST carries an Idempotency-Key)."""
    with Client(base, headers=client(who), retries=Retries(attempts=2, max_wait_s=0)) as api:
        with pytest.raises(kind) as refusal:
            api.jobs.submit(JOB["schedule"], seconds=JOB["seconds"])
    assert refusal.value.code == code and refusal.value.retry_after >= 1


def test_a_clients_queued_jobs_past_its_quota_get_429_and_a_full_queue_503(quotas):
    base = quotas["base"]
    mine = [submit(base, "31") for _ in range(JOBS)]
    assert [r.status_code for r in mine] == [201] * JOBS
    refused(submit(base, "31"), 429, "client_jobs")
    refused_by_the_client(base, "31", TooManyRequests, "client_jobs")
    theirs = submit(base, "32")
    assert theirs.status_code == 201, theirs.text  # the queue is full now: JOBS + 1 == QUEUE
    refused(submit(base, "33"), 503, "job_queue_full")
    refused_by_the_client(base, "33", ServiceFull, "job_queue_full")
    cancel(base, mine[0].json())  # a cancelled job leaves the queue's count
    late = submit(base, "33")
    assert late.status_code == 201, late.text
    assert quotas["redis"].get("jobs:queued") == str(QUEUE)
    for job in (mine[1], theirs, late):
        cancel(base, job.json())
    assert quotas["redis"].get("jobs:queued") == "0"


def test_an_idempotency_key_is_its_clients_and_a_changed_body_is_422(quotas):
    base = quotas["base"]
    body = {**JOB, "idempotency_key": "render-7"}
    first = submit(base, "41", body).json()
    assert first["token"] and not first["duplicate"]
    assert submit(base, "41", body).json() == {"job_id": first["job_id"], "token": None, "duplicate": True}
    theirs = submit(base, "42", body).json()  # another client's key of the same name: a job of its own
    assert theirs["job_id"] != first["job_id"] and theirs["token"] and not theirs["duplicate"]
    changed = submit(base, "41", {**body, "seconds": 30})
    assert changed.status_code == 422 and changed.json()["code"] == "idempotency_key_reused", changed.text
    for job in (first, theirs):
        cancel(base, job)


def test_an_ended_sessions_record_and_events_get_a_ttl(quotas):
    base, db = quotas["base"], quotas["redis"]
    deleted, on_its_own = create(base, "51", max_seconds=60).json(), create(base, "51", max_seconds=1).json()
    for session in (deleted, on_its_own):
        url = f"{base}/v1/sessions/{session['session_id']}/prompts"
        assert httpx.post(url, json={"prompt": FOREST}, headers=auth(session["token"])).status_code == 202
    end(base, deleted)
    deadline = time.monotonic() + 30  # the replica marks a session that ended on its own
    while db.hget(SESSION.format(on_its_own["session_id"]), "ended") is None:
        assert time.monotonic() < deadline, "the session that ended on its own was not marked ended"
        time.sleep(0.1)
    for session in (deleted, on_its_own):
        for key in (SESSION.format(session["session_id"]), EVENTS.format(session["session_id"])):
            assert 0 < db.ttl(key) <= ENDED_TTL_S, key
